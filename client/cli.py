"""`fleetmind client ...`: the site operator's commands.

`add_client_commands` plugs into the program's subparsers (fleetmind.cli.main). Handlers import
what they need when they run, so the program's start stays light (no torch).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from fleetmind.aggregation.manifest import DEFAULT_ALPHA, DEFAULT_RANK
from fleetmind.client.serve.cli import register as add_serve_commands


def add_client_commands(commands: Any) -> None:
    client = commands.add_parser("client", help="a site: its sessions and what it learns",
                                 description="Commands a site operator runs beside the "
                                             "serving stack.")
    # The group's own subcommands use the caller's parser class (one-line usage errors).
    sub = client.add_subparsers(dest="action", required=True, metavar="ACTION",
                                parser_class=type(client))
    add_serve_commands(sub)  # serve, sessions, forget: the endpoint and what it captured

    ingest = sub.add_parser(
        "ingest", help="store chat sessions from JSONL files",
        description="Store OpenAI chat JSONL sessions (one {\"id\", \"messages\", \"user\"} "
                    "object per line) in the site's session store. Sessions already stored "
                    "are skipped; malformed lines are reported by file and line and skipped. "
                    "Exit status 1 when any line was skipped as malformed.")
    ingest.add_argument("files", nargs="+", type=Path, metavar="FILE",
                        help="chat JSONL file(s)")
    ingest.add_argument("--store", required=True, metavar="DB",
                        help="the session store: a database file, or the site's data folder "
                             "(sessions.db inside; end the path with / to create the folder); "
                             "created if absent")
    ingest.set_defaults(run=_client_ingest)

    consolidate = sub.add_parser(
        "consolidate", help="distil new sessions into a LoRA delta (OPSD)",
        description="On-policy self-distillation of the store's unconsumed sessions into the "
                    "delta of LoRA's B: writes OUT/update.safetensors (what would be sent), "
                    "OUT/adapter/ (a PEFT folder for local use) and OUT/consolidation.json.")
    consolidate.add_argument("--model", type=Path, required=True,
                             help="local Hugging Face causal LM folder")
    consolidate.add_argument("--store", type=Path, required=True, help="the session store")
    consolidate.add_argument("--out", type=Path, required=True)
    consolidate.add_argument("--site", default="site", help="this site's name")
    consolidate.add_argument("--steps", type=int, default=None, help="optimiser steps")
    consolidate.add_argument("--seed", type=int, default=0,
                             help="the version's public frozen-A seed")
    consolidate.add_argument("--guard", type=Path, default=None, metavar="FILE",
                             help="general chat prompts (JSONL of {\"messages\": [...]}) the "
                                  "adapted model must answer as the base model does; default: "
                                  "the sessions themselves, which guard the model's reading of "
                                  "new context far less (docs/measurements.md, Consolidation)")
    consolidate.add_argument("--device", default=None, choices=("cpu", "cuda", "mps"),
                             help="where the model runs (default cpu)")
    consolidate.add_argument("--dtype", default=None,
                             help="the base model's dtype: float32 (default), bfloat16, "
                                  "float16 (or fp32, bf16, fp16); LoRA stays float32")
    consolidate.add_argument("--targets", default="mlp",
                             help="the layers LoRA adapts: mlp (default: each block's MLP), "
                                  "peft (PEFT's default for the family), all-linear, or "
                                  "comma-separated module names")
    consolidate.add_argument("--rank", type=int, default=DEFAULT_RANK,
                             help=f"LoRA rank (default {DEFAULT_RANK})")
    consolidate.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                             help=f"LoRA alpha (default {DEFAULT_ALPHA:g})")
    consolidate.add_argument("--per-session", action="store_true",
                             help="one delta per session, what session- and user-level DP "
                                  "clip (the site agent clips; this command does not)")
    consolidate.set_defaults(run=_client_consolidate)

    rollback = sub.add_parser(
        "rollback", help="return to the last good global version",
        description="Flip the site's `current` link back to the version it replaced (kept "
                    "as `previous`). One step: the version rolled back from is not kept as "
                    "a rollback target. Exit status 2 when there is nothing to roll back to.")
    rollback.add_argument("--site", type=Path, required=True, metavar="DIR",
                          help="the site folder (holds versions/, current, previous)")
    rollback.set_defaults(run=_client_rollback)

    run = sub.add_parser(
        "run", help="the site agent: follow versions, consolidate, join rounds",
        description="Run the site agent until interrupted: activate each new verified "
                    "version, and when the store holds min_new_sessions unconsumed sessions, "
                    "consolidate them and join the next round (the outbox records each upload "
                    "before it leaves). Reconnects with jittered exponential backoff. FILE is "
                    "JSON or TOML (.toml) with name, data_dir, model_dir, aggregator, "
                    "identity_key, aggregator_key and either tls or insecure = true (loopback "
                    "only); with metrics_listen = \"HOST:PORT\" it serves Prometheus metrics "
                    "there; see fleetmind.client.site.SiteConfig.")
    run.add_argument("--config", type=Path, required=True, metavar="FILE",
                     help="the site's config file (.json or .toml)")
    run.add_argument("--once", action="store_true",
                     help="one iteration, then exit (for cron or a first check)")
    run.set_defaults(run=_client_run)


def _client_ingest(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from fleetmind.client.store import MAX_PROBLEMS_KEPT, SessionStore

    missing = [str(path) for path in args.files if not path.is_file()]
    if missing:
        raise argparse.ArgumentError(
            None, f"no such file: {', '.join(missing)}; pass chat JSONL files")
    store_path = Path(args.store)
    if args.store.endswith(("/", os.sep)):
        store_path.mkdir(parents=True, exist_ok=True)
    try:
        store = SessionStore(store_path)
    except ValueError as error:
        raise argparse.ArgumentError(None, str(error)) from None
    with store:
        reports = [store.ingest_file(path) for path in args.files]
        total = len(store)

    table = Table("file", "stored", "duplicates", "skipped", title=f"sessions into {store.path}")
    for report in reports:
        table.add_row(str(report.path), str(report.stored), str(report.duplicates),
                      str(report.rejected))
    if len(reports) > 1:
        table.add_row("all files", *(str(sum(getattr(r, field) for r in reports))
                                     for field in ("stored", "duplicates", "rejected")),
                      style="bold")
    console = Console()
    console.print(table)
    # Plain `path:line: message` lines, one each, so editors and grep can jump to them.
    for report in reports:
        for problem in report.problems:
            print(problem)
        if report.rejected > len(report.problems):
            print(f"{report.path}: {report.rejected - len(report.problems)} more skipped lines "
                  f"(only the first {MAX_PROBLEMS_KEPT} are listed)")
    print(f"{total} session{'' if total == 1 else 's'} in the store")
    return 1 if any(report.rejected for report in reports) else 0


def _client_consolidate(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from fleetmind.client.consolidate import consolidate_store, read_prompts
    from fleetmind.client.distill_config import DistillConfig, per_unit_config
    from fleetmind.client.lora import TARGET_CHOICES

    try:
        # Sessions distilled alone get the per-unit settings, all together the joint ones
        # (`fleetmind bench consolidate` measured them: docs/benchmarks.md).
        cfg = per_unit_config() if args.per_session else DistillConfig()
        if args.steps is not None:
            cfg = replace(cfg, steps=args.steps)
        if args.device is not None:
            cfg = replace(cfg, device=args.device)
        if args.dtype is not None:
            cfg = replace(cfg, dtype=args.dtype)
        targets = args.targets if args.targets in TARGET_CHOICES else [
            name.strip() for name in args.targets.split(",") if name.strip()]
        guard = read_prompts(args.guard) if args.guard else []
        result = consolidate_store(args.model, args.store, args.out, cfg, site=args.site,
                                   seed=args.seed, rank=args.rank, alpha=args.alpha,
                                   targets=targets, per_session=args.per_session,
                                   guard=guard)
    except (FileNotFoundError, ValueError) as error:
        raise argparse.ArgumentError(None, str(error)) from None
    stats = result.stats
    print(f"consolidation {result.consolidation_id}: {result.update.metadata.sessions} sessions,"
          f" {stats.steps} steps, {stats.tokens_per_s:.0f} tokens/s, {stats.dreams_kept} dreams "
          f"kept; scrubbed {result.scrubbed.total}; written to {args.out}")
    return 0


def _client_rollback(args: argparse.Namespace) -> int:
    from fleetmind.client.versions import RollbackError, VersionError, rollback

    if not args.site.is_dir():
        raise argparse.ArgumentError(None, f"no such site folder: {args.site}; pass the folder "
                                           "that holds versions/ and current")
    try:
        was, now = rollback(args.site)
    except (RollbackError, VersionError) as error:
        raise argparse.ArgumentError(None, str(error)) from None
    print(f"rolled back {args.site} from version {was} to version {now}")
    return 0


def _client_run(args: argparse.Namespace) -> int:
    import logging
    import signal
    import sys
    import threading

    from fleetmind.client.site import ConfigError, SiteConfig, make_channel, run, run_once

    if not args.config.is_file():
        raise argparse.ArgumentError(None, f"no such config file: {args.config}; pass the "
                                           "site's .json or .toml config")
    try:
        config = SiteConfig.load(args.config)
    except ConfigError as error:
        raise argparse.ArgumentError(None, f"{args.config}: {error}") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        if args.once:
            channel = make_channel(config)
            try:
                outcome = run_once(config, channel)
            finally:
                channel.close()
            print(f"{config.name}: activated {list(outcome.activated)}, {outcome.pending} "
                  "unconsumed sessions, " + (f"round {outcome.round.round_id} published "
                                             f"version {outcome.round.version}"
                                             if outcome.round else "no round joined"))
            return 0
        stop = threading.Event()
        # SIGINT/SIGTERM end the loop between steps: a round in flight is left to finish or
        # time out, and its sessions stay unconsumed until a round completes.
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, lambda *_: stop.set())
        run(config, stop)
    except (ConfigError, ValueError, OSError) as error:  # OSError: metrics port taken
        print(f"fleetmind client run: {error}", file=sys.stderr)
        return 1
    return 0
