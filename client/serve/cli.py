"""`fleetmind client serve | sessions | forget`: the site endpoint and what it captured.

`register(subparsers)` adds the three to the `client` group's subparsers (as
client/cli.py's commands are); `python -m fleetmind.client.serve.cli ...` runs them alone.
Handlers import what they need when they run (no torch at start), and report bad input by
raising `argparse.ArgumentError(None, message)`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_s(text: str) -> float:
    """"3600", "90m", "12h", "30d" in seconds."""
    match = _DURATION.fullmatch(text.strip())
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: write e.g. 3600, 90m, "
                                         "12h or 30d")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def register(commands: Any) -> None:
    """Adds `serve`, `sessions` and `forget` to `commands` (the client group's subparsers)."""
    serve = commands.add_parser(
        "serve", help="the site's OpenAI-compatible endpoint (captures sessions)",
        description="Serve the site's active version at an OpenAI-compatible endpoint "
                    "(POST /v1/chat/completions, GET /v1/models, /health, /ready, /metrics), "
                    "embedded on the local model or through --upstream (vLLM), swapping in "
                    "each newly activated version without a restart, and store every "
                    "completed conversation as a session. Quick start: --model DIR --store "
                    "DIR --listen HOST:PORT; a whole site: --config SITE.toml (its data_dir, "
                    "model_dir and [serve] table; flags given here win).")
    serve.add_argument("--config", type=Path, metavar="SITE.toml",
                       help="the site's config file")
    serve.add_argument("--model", type=Path, metavar="DIR",
                       help="local Hugging Face causal LM folder (embedded mode)")
    serve.add_argument("--store", type=Path, metavar="DIR",
                       help="the site's data folder: session store, versions/ and current")
    serve.add_argument("--listen", metavar="HOST:PORT", help="default 127.0.0.1:8000")
    serve.add_argument("--upstream", metavar="URL",
                       help="proxy mode: an OpenAI-compatible server (vLLM) to forward to")
    serve.add_argument("--upstream-model", metavar="NAME",
                       help="the base model's name upstream (default: its first /v1/models)")
    serve.add_argument("--served-model-name", metavar="NAME",
                       help="the one model name clients use (default fleetmind)")
    serve.add_argument("--device", help="auto (default), cpu, cuda, cuda:N or mps")
    serve.add_argument("--dtype", help="float32 (default), float16 or bfloat16")
    serve.add_argument("--max-concurrency", type=int, metavar="N",
                       help="requests in flight before 429 (default 16)")
    serve.add_argument("--keep-adapters", type=int, metavar="N",
                       help="adapters kept loaded (default 2)")
    serve.add_argument("--ttl", type=duration_s, metavar="AGE",
                       help="delete stored sessions older than AGE (e.g. 30d)")
    serve.add_argument("--no-capture", action="store_true",
                       help="store no conversations (the site-wide switch)")
    serve.add_argument("--runtime-lora", action="store_true",
                       help="accept /v1/load_lora_adapter (as vLLM does), to stand in as "
                            "another endpoint's upstream")
    serve.set_defaults(run=_serve)

    sessions = commands.add_parser(
        "sessions", help="what the site's store holds",
        description="Count the sessions in the site's store: sessions, distinct users, "
                    "unconsumed (no consolidation used them yet), without_user (no end-user "
                    "id: each is its own user to user-level DP), consolidations.")
    sessions.add_argument("--store", type=Path, required=True, metavar="DIR",
                          help="the site's data folder or its sessions.db")
    sessions.add_argument("--json", action="store_true", help="print one JSON object")
    sessions.set_defaults(run=_sessions)

    forget = commands.add_parser(
        "forget", help="delete an end user's sessions",
        description="Delete every session of an end user from the site's store (the right "
                    "to erasure). What a published version already learned from them stays "
                    "in it, bounded by the round's differential privacy; the command says how "
                    "many of the deleted sessions were already used.")
    forget.add_argument("--user", required=True, help="the end-user id sessions are keyed to")
    forget.add_argument("--store", type=Path, required=True, metavar="DIR",
                        help="the site's data folder or its sessions.db")
    forget.add_argument("--json", action="store_true", help="print one JSON object")
    forget.set_defaults(run=_forget)


def _open_store(path: Path) -> Any:
    from fleetmind.client.store import STORE_FILENAME, SessionStore

    if not path.exists() or (path.is_dir() and not (path / STORE_FILENAME).exists()):
        raise argparse.ArgumentError(None, f"no session store at {path}; pass the site's data "
                                           "folder (holding sessions.db) or the file")
    try:
        return SessionStore(path)
    except ValueError as error:
        raise argparse.ArgumentError(None, str(error)) from None


def _serve(args: argparse.Namespace) -> int:
    from fleetmind.client.serve.runner import serve_forever
    from fleetmind.client.serve.settings import ServeConfig, ServeConfigError

    overrides = {"model_dir": args.model, "data_dir": args.store, "listen": args.listen,
                 "upstream": args.upstream, "upstream_model": args.upstream_model,
                 "served_model_name": args.served_model_name, "device": args.device,
                 "dtype": args.dtype, "max_concurrency": args.max_concurrency,
                 "keep_adapters": args.keep_adapters, "ttl_s": args.ttl,
                 "capture": False if args.no_capture else None,
                 "runtime_lora": True if args.runtime_lora else None}
    try:
        if args.config is not None:
            if not args.config.is_file():
                raise ServeConfigError(f"no such config file: {args.config}")
            config = ServeConfig.load(args.config, **overrides)
        else:
            config = ServeConfig(**{k: v for k, v in overrides.items() if v is not None})
    except ServeConfigError as error:
        raise argparse.ArgumentError(None, str(error)) from None
    if config.data_dir is None:
        print("fleetmind client serve: no --store: serving the base model, capturing nothing",
              file=sys.stderr)
    serve_forever(config)
    return 0


def _sessions(args: argparse.Namespace) -> int:
    with _open_store(args.store) as store:
        stats = store.stats().as_dict()
        stats["store"] = str(store.path)
    if args.json:
        print(json.dumps(stats))
        return 0
    print(f"{stats['sessions']} sessions from {stats['users']} users in {stats['store']}: "
          f"{stats['unconsumed']} not yet consolidated, {stats['without_user']} without a "
          f"user id, {stats['consolidations']} consolidations recorded")
    return 0


def _forget(args: argparse.Namespace) -> int:
    with _open_store(args.store) as store:
        try:
            ids = store.user_sessions(args.user)
            used = sorted({s for s in ids if store.consolidations_using(s)})
            deleted = store.delete_user(args.user)
        except ValueError as error:
            raise argparse.ArgumentError(None, str(error)) from None
    # The outbox (client/outbox.py) has no record type for a deletion yet: until it does,
    # this command says so rather than pretend it was recorded.
    result = {"user": args.user, "deleted": len(deleted), "already_consolidated": len(used),
              "session_ids": deleted, "recorded_in_outbox": False}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"deleted {len(deleted)} sessions of user {args.user!r} ({len(used)} of them "
              "were already used by consolidations: published versions keep what they "
              "learned, within the rounds' privacy bound)")
        print("note: not recorded in the outbox (it has no deletion record yet)",
              file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleetmind client", exit_on_error=False)
    register(parser.add_subparsers(dest="action", required=True, metavar="ACTION"))
    try:
        args = parser.parse_args(argv)
        return args.run(args)
    except argparse.ArgumentError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
