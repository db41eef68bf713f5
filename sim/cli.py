"""The simulator's commands: `model` (the toy world and base model, and random-initialised
models in real shapes), `bench` and `demo`.

`add_sim_commands` plugs them into the program's subparsers (fleetmind.cli.main registers
it). Heavy libraries (torch, transformers) are imported inside the commands that need them.
A command reports bad input by raising `argparse.ArgumentError(None, message)`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_sim_commands(commands: Any) -> None:
    """Add `model`, `bench` and `demo` to the top-level subparsers `commands`."""
    from fleetmind.sim.bench.cli import add_bench_commands
    from fleetmind.sim.demo import add_demo_command

    add_model_commands(commands)
    add_bench_commands(commands)
    add_demo_command(commands)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def add_model_commands(commands: Any) -> None:
    model = commands.add_parser("model", help="the toy world and base model",
                                description="Toy world, toy base model, random-initialised "
                                            "models in real shapes, and model evaluation.")
    # Sub-commands use the caller's parser class (one-line errors, exit 2).
    sub = model.add_subparsers(dest="action", required=True, metavar="ACTION",
                               parser_class=type(model))

    world = sub.add_parser("world", help="write a toy world to a folder",
                           description="Write sessions per site, probes, canaries, general "
                                       "tasks and spec.json, deterministically from a seed.")
    world.add_argument("--seed", type=int, default=0)
    world.add_argument("--sites", type=positive_int, default=4)
    world.add_argument("--facts-per-site", type=positive_int, default=6)
    world.add_argument("--users-per-fact", type=positive_int, default=3)
    world.add_argument("--canaries-per-site", type=int, default=2)
    world.add_argument("--out", type=Path, required=True)
    world.set_defaults(run=_model_world)

    build = sub.add_parser("build-toy", help="train the toy base model",
                           description="Train the toy Llama base model on the world's grammar "
                                       "and save a Hugging Face folder with report.json.")
    build.add_argument("--out", type=Path, required=True)
    build.add_argument("--steps", type=positive_int, default=None,
                       help="training steps (default: the committed model's recipe)")
    build.add_argument("--seed", type=int, default=None)
    build.set_defaults(run=_model_build)

    evaluate = sub.add_parser("eval", help="measure a model on a world",
                              description="In-context and closed-book accuracy of any local "
                                          "causal LM folder on a world folder.")
    evaluate.add_argument("--model", type=Path, required=True)
    evaluate.add_argument("--world", type=Path, required=True)
    evaluate.add_argument("--json", action="store_true", help="print JSON, not a table")
    evaluate.set_defaults(run=_model_eval)

    from fleetmind.sim.random_model import register as register_build_random

    register_build_random(sub, positive_int)


def _model_world(args: argparse.Namespace) -> int:
    from fleetmind.sim import world as W

    try:
        spec = W.WorldSpec(seed=args.seed, sites=args.sites, facts_per_site=args.facts_per_site,
                           users_per_fact=args.users_per_fact,
                           canaries_per_site=args.canaries_per_site)
    except ValueError as error:
        raise argparse.ArgumentError(None, str(error)) from None
    out = W.write_world(W.make_world(spec), args.out)
    print(f"world {spec.digest()} ({spec.sites} sites) written to {out}")
    return 0


def _model_build(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from fleetmind.sim import basemodel

    overrides = {k: v for k, v in (("steps", args.steps), ("seed", args.seed)) if v is not None}
    cfg = replace(basemodel.TrainConfig(), **overrides)
    report = basemodel.build_toy(args.out, cfg)
    _print_report(report)
    print(f"model written to {args.out}")
    return 0


def _model_eval(args: argparse.Namespace) -> int:
    from fleetmind.client.model import load_model
    from fleetmind.sim import basemodel
    from fleetmind.sim import world as W

    try:
        world = W.read_world(args.world)
        model, tokenizer = load_model(args.model)
    except (FileNotFoundError, ValueError) as error:
        raise argparse.ArgumentError(None, str(error)) from None
    report = {**basemodel.measure(model, tokenizer, world),
              "parameters": sum(p.numel() for p in model.parameters())}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report)
    return 0


def _print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("measure", "value")
    for facts, accuracy in report["incontext_by_facts"].items():
        table.add_row(f"in-context accuracy, {facts} fact(s)", f"{accuracy:.3f}")
    for key in ("incontext_accuracy", "closed_book_accuracy", "chance_accuracy",
                "build_seconds", "parameters"):
        if key in report:
            table.add_row(key, f"{report[key]:.3f}" if isinstance(report[key], float)
                          else str(report[key]))
    Console().print(table)
