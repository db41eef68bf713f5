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
        "forget", help="delete an end user's sessions, recorded in the outbox",
        description="Delete every session of an end user from the site's store (the right "
                    "to erasure) and record the deletion in the site's signed outbox: the "
                    "user named only by HMAC-SHA256 under the site's forget salt "
                    "(forget.salt in the data folder; give it to an auditor to check a user "
                    "id), the deleted session ids and how many a consolidation had already "
                    "used. What a published version already learned from those stays in "
                    "it, bounded by the round's differential privacy: deletion cannot recall "
                    "an update already sent. A forget that finds no session records nothing.")
    forget.add_argument("--user", required=True, help="the end-user id sessions are keyed to")
    forget.add_argument("--store", type=Path, required=True, metavar="DIR",
                        help="the site's data folder or its sessions.db")
    forget.add_argument("--identity-key", type=Path, metavar="FILE",
                        help="the site's identity key, which signs its outbox (default: "
                             "identity.pem in the data folder, when there)")
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


def _forget_key(args: argparse.Namespace, data_dir: Path) -> Any:
    """The identity key that signs the site's outbox (None: none given or found, and the
    site has no outbox yet). Checked against the outbox before anything is deleted."""
    from cryptography.exceptions import InvalidSignature

    from fleetmind.client.identity import load_identity_key
    from fleetmind.client.outbox import Outbox
    from fleetmind.runtime.layout import OUTBOX_FILE

    path = args.identity_key
    if path is None and (data_dir / "identity.pem").is_file():
        path = data_dir / "identity.pem"
    outbox_path = data_dir / OUTBOX_FILE
    if path is None:
        if outbox_path.exists():
            raise argparse.ArgumentError(None, f"{outbox_path} exists but no identity key was "
                                               "given: pass --identity-key (the site's "
                                               "identity_key) so the deletion is recorded "
                                               "in its outbox; nothing was deleted")
        return None
    try:
        key = load_identity_key(path, create=False)
    except ValueError as error:
        raise argparse.ArgumentError(None, f"{error}; nothing was deleted") from None
    if outbox_path.exists():
        with Outbox(outbox_path, key) as outbox:
            head = outbox.head()
        if head is not None:
            try:
                key.public_key().verify(head.signature, head.hash)
            except InvalidSignature:
                raise argparse.ArgumentError(
                    None, f"{path} did not sign {outbox_path}: pass the site's own identity "
                          "key; nothing was deleted") from None
    return key


def _forget(args: argparse.Namespace) -> int:
    from fleetmind.aggregation.records import ForgetRecord
    from fleetmind.client.outbox import Outbox, forget_salt
    from fleetmind.runtime.layout import OUTBOX_FILE

    if not args.user.strip():
        raise argparse.ArgumentError(None, "--user is empty: name the end user whose sessions "
                                           "to delete")
    store_path = args.store
    data_dir = store_path if store_path.is_dir() else store_path.parent
    with _open_store(store_path) as store:
        key = _forget_key(args, data_dir)
        try:
            used = {s for s in store.user_sessions(args.user) if store.consolidations_using(s)}
            deleted = store.delete_user(args.user)
        except ValueError as error:
            raise argparse.ArgumentError(None, str(error)) from None
    already = len(used.intersection(deleted))
    result: dict[str, Any] = {"user": args.user, "deleted": len(deleted),
                              "already_consolidated": already, "session_ids": deleted,
                              "recorded_in_outbox": False, "outbox_entry": None}
    code = 0
    if not deleted:
        result["reason"] = ("no session of this user: nothing deleted, nothing recorded (an "
                            "earlier deletion stays in the outbox)")
    elif key is None:
        result["reason"] = ("no outbox and no identity key: nothing has left this site; pass "
                            "--identity-key to record deletions")
    else:
        outbox_path = data_dir / OUTBOX_FILE
        try:
            salt = forget_salt(data_dir)
            record = ForgetRecord.for_user(salt, args.user, deleted, already)
            with Outbox(outbox_path, key) as outbox:
                entry = outbox.append_forget(record)
        except (OSError, ValueError) as error:
            # The sessions are gone; say loudly that the record of it is not.
            result["reason"] = f"deleted, but not recorded in {outbox_path}: {error}"
            code = 1
        else:
            result.update(recorded_in_outbox=True, outbox_entry=entry.index,
                          user_hmac=record.user_hmac, outbox=str(outbox_path))
    if args.json:
        print(json.dumps(result))
    elif not deleted:
        print(f"no session of user {args.user!r}: nothing deleted, nothing recorded")
    else:
        print(f"deleted {len(deleted)} sessions of user {args.user!r} ({already} of them "
              "were already used by consolidations: an update already sent may carry them, "
              "and published versions keep what they learned, within the rounds' privacy "
              "bound)")
        if result["recorded_in_outbox"]:
            print(f"recorded in {result['outbox']} as entry {result['outbox_entry']} (user "
                  f"HMAC {result['user_hmac'][:12]})")
        else:
            print(f"note: not recorded in the outbox: {result['reason']}", file=sys.stderr)
    return code


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
