"""The `bench` command group: `fleetmind bench aggregation|consolidate|wire|serve|all --out
DIR [--quick]`, `fleetmind bench consolidate --model DIR` (the cost alone, on any model folder),
and `fleetmind bench report --out DIR`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from fleetmind.sim.bench.batched import add_batched_command
from fleetmind.sim.bench.continual import add_continual_command
from fleetmind.sim.bench.scale import add_scale_command
from fleetmind.sim.cli import positive_int


def add_bench_commands(commands: Any) -> None:
    """Add `bench` to the top-level subparsers `commands` (sim/cli.py registers it)."""
    bench = commands.add_parser("bench", help="measure fleetmind against its peers",
                                description="Benchmarks, each side by side with its peer in "
                                            "one run; JSON plus a table of ratios.")
    # Sub-commands use the caller's parser class (one-line errors, exit 2).
    sub = bench.add_subparsers(dest="action", required=True, metavar="ACTION",
                               parser_class=type(bench))
    aggregation = sub.add_parser(
        "aggregation", help="sum, secure aggregation and merge exactness",
        description="Plain-sum GB/s against memcpy, SecAgg+ against Flower 1.42's primitives, "
                    "and the exact merge against FedIT; writes DIR/aggregation.json.")
    aggregation.add_argument("--out", type=Path, required=True)
    aggregation.add_argument("--quick", action="store_true",
                             help="small sizes, for a smoke run in seconds")
    aggregation.set_defaults(run=_bench_aggregation)

    consolidate = sub.add_parser(
        "consolidate", help="one site's OPSD against baselines and ablations",
        description="Recovery and forgetting of OPSD against SFT on transcripts and off-policy "
                    "distillation, and without dreams, replay or the guard, in one run; "
                    "writes DIR/consolidate.json. With --model, on that model folder, the "
                    "cost against TRL's SDFTTrainer alone (the rest needs the toy model), on "
                    "the CPU in fp32 or, with --device and --dtype, on a GPU; writes "
                    "DIR/consolidate-model.json.")
    consolidate.add_argument("--out", type=Path, required=True)
    consolidate.add_argument("--quick", action="store_true", help="a few steps, a smoke run")
    consolidate.add_argument("--model", type=Path, default=None,
                             help="a local model folder (e.g. from `fleetmind model "
                                  "build-random`): measure only the cost against the peer")
    consolidate.add_argument("--steps", type=positive_int, default=None,
                             help="distillation steps per half (default 90, 10 with --quick)")
    consolidate.add_argument("--runs", type=positive_int, default=None,
                             help="alternated runs of each method for the cost medians "
                                  "(default 3, 1 with --quick)")
    consolidate.add_argument("--threads", type=positive_int, default=1,
                             help="torch threads of each method's process (default 1)")
    consolidate.add_argument("--device", default="cpu",
                             help="with --model: where both methods train, cpu (default) or "
                                  "cuda; on cuda the memory measure is "
                                  "torch.cuda.max_memory_allocated")
    consolidate.add_argument("--dtype", default="fp32",
                             help="with --model: the base model's precision, fp32 (default), "
                                  "bf16 or fp16 (the peer under TRL's mixed precision of it)")
    consolidate.add_argument("--memory-only", action="store_true",
                             help="with --model: only the one memory run of each method, no "
                                  "timed runs (the rates are not measured)")
    consolidate.set_defaults(run=_bench_consolidate)

    wire = sub.add_parser(
        "wire", help="round latency and broadcast throughput over loopback gRPC",
        description="One round for cohorts of 10, 50 and 200 light sites, and 100 watchers "
                    "downloading the latest version against a plain gRPC stream of the same "
                    "bytes, all in-process on 127.0.0.1; writes DIR/wire.json.")
    wire.add_argument("--out", type=Path, required=True)
    wire.add_argument("--quick", action="store_true", help="10 sites and 10 watchers")
    wire.set_defaults(run=_bench_wire)
    add_scale_command(sub)
    add_continual_command(sub)
    add_batched_command(sub)

    serve = sub.add_parser(
        "serve", help="the site endpoint's overhead, proxy mode's and capture's",
        description="Requests per second and p50/p99 latency of `client serve` on the toy "
                    "model against its engine called in-process, of proxy mode against its "
                    "upstream called directly (apart, and paired: half the clients through "
                    "the proxy, half direct, at once), and with capture on against off, at 1, "
                    "8 and 32 concurrent clients; writes DIR/serve.json and DIR/serve.png.")
    serve.add_argument("--out", type=Path, required=True)
    serve.add_argument("--quick", action="store_true",
                       help="1 and 8 clients, 16 requests, one repeat: a smoke run")
    serve.add_argument("--requests", type=positive_int, default=None,
                       help="requests per arm, level and repeat (default 64)")
    serve.add_argument("--repeats", type=positive_int, default=None,
                       help="rotations of the arms per level, latencies pooled (default 2)")
    serve.add_argument("--threads", type=positive_int, default=1,
                       help="torch threads of each model's process (default 1)")
    serve.set_defaults(run=_bench_serve)

    every = sub.add_parser(
        "all", help="every benchmark, then one report",
        description="Runs aggregation, consolidate and wire into DIR (each writes its JSON, "
                    "the first two a plot), then writes DIR/report.json, DIR/report.md (the "
                    "headline ratios against the peers measured in the same run) and "
                    "DIR/wire.png.")
    every.add_argument("--out", type=Path, required=True)
    every.add_argument("--quick", action="store_true", help="every benchmark's smoke size")
    every.set_defaults(run=_bench_all)

    report = sub.add_parser(
        "report", help="rebuild DIR/report.json and report.md from DIR's benchmark JSON",
        description="Reads DIR/aggregation.json, consolidate.json and wire.json (nothing is "
                    "measured) and writes DIR/report.json, DIR/report.md and DIR/wire.png.")
    report.add_argument("--out", type=Path, required=True)
    report.set_defaults(run=_bench_report)


def _bench_aggregation(args: argparse.Namespace) -> int:
    from fleetmind.sim.bench import aggregation

    aggregation.run(args.out, quick=args.quick)
    return 0


def _bench_consolidate(args: argparse.Namespace) -> int:
    from fleetmind.sim.bench import consolidate

    if args.model is not None and not (args.model / "config.json").is_file():
        raise argparse.ArgumentError(None, f"--model {args.model}: no config.json there; pass "
                                           "a local Hugging Face model folder")
    try:
        consolidate.run(args.out, quick=args.quick, model_dir=args.model, steps=args.steps,
                        runs=args.runs, threads=args.threads, device=args.device,
                        dtype=args.dtype, memory_only=args.memory_only)
    except ValueError as error:  # a tokenizer that cannot encode the sessions, no GPU, ...
        raise argparse.ArgumentError(None, str(error)) from None
    return 0


def _bench_wire(args: argparse.Namespace) -> int:
    from fleetmind.sim.bench import wire

    wire.run(args.out, quick=args.quick)
    return 0


def _bench_serve(args: argparse.Namespace) -> int:
    from fleetmind.sim.bench import serve

    serve.run(args.out, quick=args.quick, requests=args.requests, repeats=args.repeats,
              threads=args.threads)
    return 0


def _bench_all(args: argparse.Namespace) -> int:
    from rich.console import Console

    from fleetmind.sim.bench import aggregation, consolidate, wire

    console = Console()
    started_all = time.perf_counter()
    for name, bench in (("aggregation", aggregation), ("consolidate", consolidate),
                        ("wire", wire)):
        console.rule(f"[bold]bench {name}[/bold]{' (quick)' if args.quick else ''}")
        started = time.perf_counter()
        bench.run(args.out, quick=args.quick)
        console.print(f"[green]{name} done[/green] in {time.perf_counter() - started:.0f} s")
    console.rule(f"[bold]report[/bold] (benchmarks took {time.perf_counter() - started_all:.0f} s)")
    return _bench_report(args)


def _bench_report(args: argparse.Namespace) -> int:
    # Imported here, not at the top: `bench all` only needs it once the benchmarks are done.
    from fleetmind.sim.bench import report

    try:
        json_path, md_path = report.write(args.out)
    except report.MissingBenchmarkError as error:
        raise argparse.ArgumentError(None, str(error)) from error  # one line, exit 2
    # The Markdown as it is, not rendered: it is what goes into a README, ready to copy.
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    return 0
