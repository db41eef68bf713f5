"""`fleetmind bench batched`: batched distillation against one unit at a time (issue 17 item 3).

A site distils each privacy unit alone, so that each unit's delta can be clipped
(`consolidate_sessions(per_session=True)`). The peer is today's loop, one unit after another
(`units_per_pass=1`); the arms distil 2, 4, 8... units side by side in one pass, each with
its own delta (`lora.UnitDeltas`). Every arm consolidates the same sessions with the demo's
settings (`sim/demo_config.py`), in a process of its own on `--threads` torch threads (so
each peak RSS is its own), arms alternated over `--repeats` so each sees the machine alike;
the medians are reported.

Per arm: seconds, seconds per unit, distilled tokens per second, peak RSS, the speed-up over
one unit at a time (its seconds over the arm's), and max_relative_difference: the largest
difference of any unit's delta from the same unit's delta distilled alone, over that
delta's largest entry (0 up to float rounding: batching changes the cost, not the result).

Writes DIR/batched.json and DIR/batched.png (seconds per unit against units per pass).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_UNITS_PER_PASS = (1, 2, 4, 8, 16)
DEFAULT_SESSIONS = 32
DEFAULT_STEPS = 24  # the demo's distillation steps per session (sim/demo_config.py)
DEFAULT_RANK = 8


def add_batched_command(sub: Any) -> None:
    from fleetmind.sim.cli import positive_int

    parser = sub.add_parser(
        "batched", help="batched distillation of privacy units against one at a time",
        description="Per-unit distillation of the same sessions with 1 (one at a time, the "
                    "peer) and more units per pass, each arm in its own process; writes "
                    "DIR/batched.json and DIR/batched.png.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true",
                        help="8 sessions, 4 steps, 1 and 4 units per pass: a smoke run")
    parser.add_argument("--sessions", type=positive_int, default=None,
                        help=f"sessions, each its own unit (default {DEFAULT_SESSIONS})")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help=f"distillation steps per unit (default {DEFAULT_STEPS})")
    parser.add_argument("--units-per-pass", default=None,
                        help="comma-separated arms (default "
                             f"{','.join(map(str, DEFAULT_UNITS_PER_PASS))}; 1 always runs)")
    parser.add_argument("--rank", type=positive_int, default=DEFAULT_RANK,
                        help=f"LoRA rank on down_proj (default {DEFAULT_RANK}, the demo's)")
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help="alternated runs of every arm (default 2, 1 with --quick)")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch threads of each arm's process (default 1)")
    parser.set_defaults(run=_command)


def _command(args: argparse.Namespace) -> int:
    arms = None
    if args.units_per_pass is not None:
        try:
            arms = sorted({int(x) for x in args.units_per_pass.split(",") if x.strip()})
        except ValueError:
            arms = []
        if not arms or min(arms) < 1:
            raise argparse.ArgumentError(None, f"--units-per-pass {args.units_per_pass!r}: "
                                               "give positive whole numbers, e.g. 1,4,8")
    run(args.out, quick=args.quick, sessions=args.sessions, steps=args.steps, arms=arms,
        rank=args.rank, repeats=args.repeats, threads=args.threads)
    return 0


def bench_sessions(count: int) -> tuple[list[Any], list[Any]]:
    """`count` sessions of the toy world (one site, each fact said by 3 users) and its guard
    prompts; deterministic."""
    from fleetmind.client.store import Session
    from fleetmind.sim import world as W

    facts = max(2, -(-2 * count // 3))  # about 1.5 facts a session: enough sessions
    world = W.make_world(W.WorldSpec(seed=0, sites=1, facts_per_site=facts, users_per_fact=3,
                                     canaries_per_site=0))
    sessions = [Session.from_dict(s) for s in world.sites[0].sessions][:count]
    if len(sessions) < count:
        raise ValueError(f"the bench world has {len(sessions)} sessions, fewer than {count}")
    return sessions, [W.task_prompt(t) for t in world.guard]


def one_arm(units_per_pass: int, sessions: int, steps: int, rank: int,
            threads: int) -> dict[str, Any]:
    """In a process of its own: every session distilled alone, `units_per_pass` to a pass;
    the `measured` cost and each session's delta."""
    import torch

    from fleetmind.client import lora
    from fleetmind.client.consolidate import consolidate_sessions
    from fleetmind.client.model import load_model
    from fleetmind.sim import basemodel
    from fleetmind.sim.bench.consolidate import measured
    from fleetmind.sim.demo_config import distill_config

    torch.set_num_threads(threads)
    chosen, guard = bench_sessions(sessions)
    model, tokenizer = load_model(basemodel.toy_model_path(build=False))
    peft_model = lora.attach_lora(model, seed=0, rank=rank, alpha=2.0 * rank,
                                  targets=("down_proj",))
    cfg = dataclasses.replace(distill_config(steps, 1.0, 0, "opsd", True),
                              units_per_pass=units_per_pass)
    with measured(model) as cost:
        result = consolidate_sessions(peft_model, tokenizer, chosen, cfg, site="bench",
                                      base_version=0, seed=0, guard=guard, per_session=True,
                                      progress=False)
        cost["distilled_tokens"] += result.stats.tokens
    return {"cost": dict(cost), "deltas": [delta for _, delta in result.session_updates]}


def max_relative_difference(deltas: Sequence[dict[str, np.ndarray]],
                            alone: Sequence[dict[str, np.ndarray]]) -> float:
    """The largest |delta - alone| over any unit, over that unit's largest |alone| entry."""
    worst = 0.0
    for ours, theirs in zip(deltas, alone, strict=True):
        size = max(float(np.abs(t).max()) for t in theirs.values()) or 1.0
        worst = max(worst, max(float(np.abs(ours[n] - theirs[n]).max()) for n in theirs) / size)
    return worst


def run(out: Path, quick: bool = False, sessions: int | None = None, steps: int | None = None,
        arms: Sequence[int] | None = None, rank: int = DEFAULT_RANK, repeats: int | None = None,
        threads: int = 1) -> dict[str, Any]:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    sessions = sessions or (8 if quick else DEFAULT_SESSIONS)
    steps = steps or (4 if quick else DEFAULT_STEPS)
    arms = sorted({1, *(arms or ((4,) if quick else DEFAULT_UNITS_PER_PASS))})
    repeats = repeats or (1 if quick else 2)
    out.mkdir(parents=True, exist_ok=True)
    bench_sessions(sessions)  # a world too small is refused before any process starts
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    runs: dict[int, list[dict[str, Any]]] = {k: [] for k in arms}
    with Progress(transient=True) as progress:
        task = progress.add_task("batched distillation", total=repeats * len(arms))
        for repeat in range(repeats):
            for k in (arms if repeat % 2 == 0 else arms[::-1]):  # alternate the order
                progress.update(task, description=f"{k} unit(s) a pass, run {repeat + 1}")
                with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
                    runs[k].append(pool.submit(one_arm, k, sessions, steps, rank,
                                               threads).result())
                progress.advance(task)
    alone_seconds = statistics.median(r["cost"]["seconds"] for r in runs[1])
    alone = runs[1][0]["deltas"]
    rows = []
    for k in arms:
        seconds = statistics.median(r["cost"]["seconds"] for r in runs[k])
        difference = max(max_relative_difference(r["deltas"], alone) for r in runs[k])
        rows.append({
            "units_per_pass": k,
            "seconds": round(seconds, 2),
            "seconds_per_unit": round(seconds / sessions, 3),
            "distilled_tokens_per_s": round(statistics.median(
                r["cost"]["distilled_tokens_per_s"] for r in runs[k]), 1),
            "peak_rss_mb": statistics.median(r["cost"]["peak_rss_mb"] for r in runs[k]),
            "speedup_vs_one_at_a_time": round(alone_seconds / seconds, 2),
            "max_relative_difference": float(f"{difference:.2e}"),
            "seconds_each_run": [r["cost"]["seconds"] for r in runs[k]],
        })
    result = {"config": {"sessions": sessions, "steps": steps, "rank": rank,
                         "targets": ["down_proj"], "units_per_pass": arms, "repeats": repeats,
                         "threads": threads, "peer": "one unit at a time (units_per_pass=1)"},
              "arms": rows, "load_average": [round(load_before, 2),
                                             round(os.getloadavg()[0], 2)],
              "cpus": os.cpu_count(), "seconds": round(time.perf_counter() - started, 1)}
    (out / "batched.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "batched.png")
    table = Table(title=f"batched distillation: {sessions} units, {steps} steps each, rank "
                        f"{rank} (median of {repeats})")
    for column in ("units a pass", "seconds", "s / unit", "speed-up vs 1", "peak RSS MB",
                   "max rel. diff"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(str(row["units_per_pass"]), f"{row['seconds']:.1f}",
                      f"{row['seconds_per_unit']:.3f}",
                      f"{row['speedup_vs_one_at_a_time']:.2f}x", f"{row['peak_rss_mb']:.0f}",
                      f"{row['max_relative_difference']:.1e}")
    Console().print(table)
    return result


def plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = result["arms"]
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot([a["units_per_pass"] for a in arms], [a["seconds_per_unit"] for a in arms],
              marker="o", label="batched")
    axis.axhline(arms[0]["seconds_per_unit"], linestyle=":", color="grey",
                 label="one unit at a time (the peer)")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("units distilled in one pass")
    axis.set_ylabel("seconds per unit")
    axis.set_title(f"batched distillation, {result['config']['sessions']} units")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
