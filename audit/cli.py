"""`fleetmind audit ...`: the privacy auditor's commands.

    audit outbox DIR      what left a site: every upload and deletion record, its chain and
                          signatures
    audit ledger          the aggregator's ledger: chain, signatures, epsilon per round
    audit version DIR     a published version: signature, file hashes, its ledger entry
    audit canaries        exposure of known secrets in a published version

`add_audit_commands` plugs into the program's subparsers (fleetmind.cli.main registers it).
This file parses arguments and prints; what each command checks and reports is in
audit/ledger_report.py, outbox_report.py, version_report.py and canaries.py.
Exit status: 0 when everything verified, 1 when something did not (the message names the
first bad entry or file), 2 for bad input (`argparse.ArgumentError(None, message)`, which
the program prints as one line). Tables by default, `--json` for machines. Only
`audit canaries` loads torch, and only when it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: the CLI starts without loading every report
    from fleetmind.audit.ledger_report import LedgerReport

SHORT = 12  # hex digits of a hash shown in a table; --json carries the whole hash


def _usage(error: Exception | str) -> argparse.ArgumentError:
    return argparse.ArgumentError(None, str(error))


def _head(text: str) -> bytes:
    try:
        head = bytes.fromhex(text)
    except ValueError:
        head = b""
    if len(head) != 32:
        raise argparse.ArgumentTypeError(f"{text!r} is not a head hash (64 hex digits, as a "
                                         "previous audit printed it)")
    return head


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{value} must be a positive number of seconds")
    return value


def _connection_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connecting to the aggregator (with --server)")
    group.add_argument("--insecure", action="store_true",
                       help="plaintext gRPC; refused to any non-loopback address")
    group.add_argument("--ca", type=Path, help="the fleet CA certificate (PEM)")
    group.add_argument("--cert", type=Path, help="a client certificate the fleet CA issued")
    group.add_argument("--key", type=Path, help="that certificate's private key (PEM)")
    group.add_argument("--timeout", type=_seconds, default=60.0, metavar="SECONDS",
                       help="how long to wait for the aggregator (default 60)")


def add_audit_commands(commands: Any) -> None:
    audit = commands.add_parser(
        "audit", help="verify what left a site, the ledger, versions; test for leaks",
        description="Commands a privacy auditor runs: they read, verify and report, and "
                    "change nothing. Exit 0: all verified; 1: something did not (the first "
                    "bad entry or file is named); 2: bad input.")
    sub = audit.add_subparsers(dest="action", required=True, metavar="ACTION",
                               parser_class=type(audit))

    outbox = sub.add_parser(
        "outbox", help="what left a site: the outbox's records, chain and signatures",
        description="Every record of what a site sent: when, which round, the payload's "
                    "sha256, the update's norm before and after clipping, the noise, the "
                    "contributing session ids, what the scrubber removed and the "
                    "participation counts under a cap; every deletion the site recorded "
                    "(`fleetmind client forget`: the user's HMAC, the sessions deleted, how "
                    "many were already consolidated and the rounds that sent them); verifies "
                    "the outbox's hash chain and the site's signature on each entry. With "
                    "--aggregator-key, each record's round is matched to its publication in "
                    "the aggregator's signed records (the site's downloaded versions, and "
                    "--ledger or --server when given).")
    outbox.add_argument("dir", type=Path, metavar="DIR",
                        help="the site's data folder (holds outbox.sqlite), or the file")
    outbox.add_argument("--site-key", type=Path, required=True, metavar="FILE",
                        help="the site's Ed25519 public key (32 raw bytes, 64 hex digits or "
                             "PEM), or its PEM identity key (only the public half is used)")
    outbox.add_argument("--aggregator-key", type=Path, metavar="FILE",
                        help="the aggregator's Ed25519 public key, to check publications")
    source = outbox.add_mutually_exclusive_group()
    source.add_argument("--ledger", type=Path, metavar="FILE", help="a copy of ledger.sqlite")
    source.add_argument("--server", metavar="ADDR", help="the aggregator's HOST:PORT")
    outbox.add_argument("--expect-head", type=_head, metavar="HEX",
                        help="the head hash a previous audit printed: entries cut off the "
                             "end since then are found")
    outbox.add_argument("--json", action="store_true", help="print JSON, not tables")
    _connection_flags(outbox)
    outbox.set_defaults(run=_audit_outbox)

    led = sub.add_parser(
        "ledger", help="the aggregator's ledger: chain, signatures, epsilon per round",
        description="Verifies the ledger's hash chain and every signature against the "
                    "aggregator's public key, offline, and prints per round the cohort size, "
                    "dropouts, clip norm, noise, epsilon spent by the round and in total, and "
                    "the version hash. Exit 1 on any break, naming the first bad entry.")
    source = led.add_mutually_exclusive_group(required=True)
    source.add_argument("--file", type=Path, metavar="LEDGER",
                        help="the ledger file (ledger.sqlite in the aggregator's data folder)")
    source.add_argument("--server", metavar="ADDR",
                        help="read it from the aggregator's Audit service at HOST:PORT")
    led.add_argument("--aggregator-key", type=Path, required=True, metavar="FILE",
                     help="the aggregator's Ed25519 public key (32 raw bytes, 64 hex digits "
                          "or PEM): the one sites pin")
    led.add_argument("--expect-head", type=_head, metavar="HEX",
                     help="the head hash a previous audit printed: entries cut off the end "
                          "since then are found")
    led.add_argument("--json", action="store_true", help="print JSON, not tables")
    _connection_flags(led)
    led.set_defaults(run=_audit_ledger)

    version = sub.add_parser(
        "version", help="a published version: signature, file hashes, its ledger entry",
        description="Verifies a version folder's manifest.sig against the aggregator's public "
                    "key and every file against the manifest's sha256 (the check a site makes "
                    "before activating it). With --ledger or --server, also that the ledger "
                    "records this exact manifest for the version.")
    version.add_argument("dir", type=Path, metavar="DIR",
                         help="a version folder (versions/<n>/ at the aggregator or a site, or "
                              "a site's `current`)")
    version.add_argument("--aggregator-key", type=Path, required=True, metavar="FILE",
                         help="the aggregator's Ed25519 public key (raw, hex or PEM)")
    source = version.add_mutually_exclusive_group()
    source.add_argument("--ledger", type=Path, metavar="FILE", help="a copy of ledger.sqlite")
    source.add_argument("--server", metavar="ADDR", help="the aggregator's HOST:PORT")
    version.add_argument("--json", action="store_true", help="print JSON, not tables")
    _connection_flags(version)
    version.set_defaults(run=_audit_version)

    canaries = sub.add_parser(
        "canaries", help="exposure of known secrets in a published version",
        description="Exposure in bits (Carlini et al. 2019) of each canary in --canaries, in "
                    "the base model and in the base model with the version's adapter: "
                    "log2|R| - log2(rank of the secret among all |R| secrets of its shape). "
                    "A model that knows nothing scores about 1.4 bits; log2|R| means the "
                    "secret is ranked first. Loads torch; reports and exits 0.")
    canaries.add_argument("--model", type=Path, required=True, metavar="DIR",
                          help="the base model's local Hugging Face folder")
    canaries.add_argument("--version", type=Path, required=True, metavar="DIR",
                          help="the published version folder (a PEFT adapter)")
    canaries.add_argument("--canaries", type=Path, required=True, metavar="FILE",
                          help="JSONL of canaries with their slots (the toy world's "
                               "canaries.jsonl)")
    canaries.add_argument("--aggregator-key", type=Path, metavar="FILE",
                          help="verify the version with this key before measuring it")
    canaries.add_argument("--json", action="store_true", help="print JSON, not a table")
    canaries.set_defaults(run=_audit_canaries)


# ---- shared ---------------------------------------------------------------------------


def _key(path: Path, which: str) -> bytes:
    from fleetmind.audit import sources

    try:
        return sources.aggregator_key(path) if which == "aggregator" else sources.site_key(path)
    except ValueError as error:
        raise _usage(error) from None


def _channel(args: argparse.Namespace):
    from fleetmind.audit.sources import Tls, audit_channel

    given = [flag for flag, value in (("--ca", args.ca), ("--cert", args.cert),
                                      ("--key", args.key)) if value is not None]
    if given and len(given) < 3:
        raise _usage(f"mTLS needs --ca, --cert and --key together; got only {', '.join(given)}")
    tls = Tls(args.ca, args.cert, args.key) if given else None
    try:
        return audit_channel(args.server, insecure=args.insecure, tls=tls)
    except ValueError as error:
        raise _usage(error) from None


def _refuse_connection_flags(args: argparse.Namespace) -> None:
    given = [flag for flag, on in (("--insecure", args.insecure), ("--ca", args.ca),
                                   ("--cert", args.cert), ("--key", args.key)) if on]
    if given and args.server is None:
        raise _usage(f"{', '.join(given)} only apply with --server ADDR")


def _read_ledger(args: argparse.Namespace, file: Path | None) -> tuple[list, dict | None]:
    """The ledger's entries (from the file or the aggregator) and, from the aggregator, its
    unsigned budget status."""
    from fleetmind.audit import sources

    _refuse_connection_flags(args)
    if file is not None:
        try:
            return sources.read_log(file), None
        except sources.LogError as error:
            raise _usage(error) from None
    channel = _channel(args)
    try:
        return sources.ledger_from_aggregator(channel, args.server, args.timeout)
    except ValueError as error:
        raise _usage(error) from None
    finally:
        channel.close()


def _fail(message: str) -> int:
    print(f"fleetmind audit: FAILED: {message}", file=sys.stderr)
    return 1


def _emit(report: dict[str, Any]) -> None:
    print(json.dumps(report, indent=2))


def _console():
    from rich.console import Console

    console = Console()
    # Piped into a file or a ticket, nothing limits the width: rich's default of 80 would
    # cut hashes and session ids short, which is exactly what an auditor copies out.
    # The outbox table (participation) and the ledger's (what ε is) need more than 200.
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 320
    return console


def _noise(mode: str, multiplier: float) -> str:
    return "none" if mode == "none" else f"{mode} ×{multiplier:g}"


def _clipped(unit: str | None, clip_norm: float | None) -> str:
    """What one clip bounds, as a record says; records from before the unit was recorded
    give only the norm (or, for an outbox, nothing)."""
    if clip_norm is None:
        return "not recorded"
    return f"each {unit} to {clip_norm:g}" if unit else f"{clip_norm:g} (unit not recorded)"


def _stepped(row: dict) -> str:
    """The server step a round's merge applied, the privacy units its sum held and the rule
    that gave the step (rate, or rate x R / units past R); entries from before they were
    recorded have neither, or the step without its rule."""
    step, units = row["server_step"], row["units"]
    if step is None or units is None:
        return "not recorded"
    counted = f"{units} unit{'s' if units != 1 else ''}"
    rate, reference = row["server_learning_rate"], row["server_step_units"]
    if rate is None:
        return f"{step:.4g} ({counted}; rule not recorded)"
    if reference is None or units <= reference:
        return f"{step:.4g} = the rate ({counted})"
    return f"{step:.4g} = {rate:g} × {reference}/{counted}"


def _summed(secure_aggregation: bool) -> str:
    # Loud on purpose: a plain sum means the aggregator saw every site's update.
    return "secure aggregation" if secure_aggregation else "PLAIN (unmasked)"


# ---- audit ledger ---------------------------------------------------------------------


def _audit_ledger(args: argparse.Namespace) -> int:
    from fleetmind.audit.ledger_report import ledger_report

    key = _key(args.aggregator_key, "aggregator")
    entries, budget = _read_ledger(args, args.file)
    source = str(args.file) if args.file is not None else f"aggregator {args.server}"
    report = ledger_report(entries, key, source, args.expect_head, budget)
    if args.json:
        _emit(report.as_json())
    else:
        _print_ledger(report, source, budget)
    return 0 if report.ok else _fail(str(report.audit.error))


def _print_ledger(report: LedgerReport, source: str, budget: dict | None) -> None:
    from rich.table import Table

    rows, audit = report.rows, report.audit

    table = Table("entry", "round", "version", "cohort", "dropouts", "summed by", "clip",
                  "noise", "server step", "ε round", "ε total", "ε total is", "δ",
                  "version hash")
    for row in rows:
        table.add_row(str(row["entry"]), str(row["round"]), str(row["version"]),
                      str(row["cohort_size"]), str(row["dropouts"]),
                      _summed(row["secure_aggregation"]),
                      _clipped(row["privacy_unit"], row["clip_norm"]),
                      _noise(row["noise_mode"], row["noise_multiplier"]),
                      _stepped(row),
                      f"{row['epsilon_round']:.4g}", f"{row['epsilon_total']:.4g}",
                      row["epsilon_meaning"], f"{row['delta']:g}",
                      row["version_hash"][:SHORT])
    # Summary lines are plain prints, never a table title: a title wraps to the table's
    # width, and these are the lines an auditor greps and pastes.
    verified = len(rows) + len(report.stopped)
    print(f"ledger of {source}: {verified} of {audit.read} entries verified")
    _console().print(table)
    if report.stopped:
        _print_stopped(report.stopped)
    if report.last is not None:
        # What the number is per (unit, cap), never a bare "epsilon X": ledger_report's words.
        print(f"privacy spent (signed): {report.privacy_spent} over {verified} round(s)")
    if budget is not None:
        print(f"the aggregator's budget (its word, unsigned): spent "
              f"{budget['epsilon_spent']:.4g} of {budget['epsilon_budget']:g} "
              f"({budget['accountant'] or 'accountant not named'})")
    if audit.ok:
        print(f"head {audit.head.hex()} (keep it: --expect-head finds entries cut off later)")


def _print_stopped(stopped: list[dict[str, Any]]) -> None:
    """The rounds that ended after unmasking without a version: which check refused them,
    with its number against the range it had to lie in."""
    from rich.table import Table

    table = Table("entry", "round", "outcome", "phase", "check", "measured", "allowed",
                  "contributors", "ε round", "ε total", "quarantined")
    for row in stopped:
        allowed = row["allowed"]
        table.add_row(str(row["entry"]), str(row["round"]), row["outcome"], row["phase"],
                      row["check"] or "-",
                      "-" if row["measured"] is None else f"{row['measured']:.4g}",
                      "-" if allowed is None else f"[{allowed[0]:.4g}, {allowed[1]:.4g}]",
                      str(row["contributors"]), f"{row['epsilon_round']:.4g}",
                      f"{row['epsilon_total']:.4g}",
                      ", ".join(map(str, row["quarantined"])) or "-")
    print(f"rounds stopped without a version (signed): {len(stopped)}")
    _console().print(table)


# ---- audit outbox ---------------------------------------------------------------------


def _audit_outbox(args: argparse.Namespace) -> int:
    from fleetmind.audit import sources
    from fleetmind.audit.outbox_report import outbox_report
    from fleetmind.runtime.layout import OUTBOX_FILE

    path = args.dir / OUTBOX_FILE if args.dir.is_dir() else args.dir
    if not path.exists():
        raise _usage(f"{args.dir}: no outbox here (expected a site folder holding "
                     f"{OUTBOX_FILE}, or the file itself)")
    site = _key(args.site_key, "site")
    aggregator = None if args.aggregator_key is None else _key(args.aggregator_key,
                                                               "aggregator")
    if aggregator is None and (args.ledger is not None or args.server is not None):
        raise _usage("--ledger/--server need --aggregator-key: the ledger is only evidence "
                     "once its signatures verify")
    try:
        entries = sources.read_log(path)
    except sources.LogError as error:
        raise _usage(error) from None
    ledger_entries = None
    if aggregator is None:
        _refuse_connection_flags(args)
    elif args.ledger is not None or args.server is not None:
        ledger_entries = _read_ledger(args, args.ledger)[0]
    report = outbox_report(path, entries, site, expected_head=args.expect_head,
                           site_dir=args.dir if args.dir.is_dir() else None,
                           aggregator_key=aggregator, ledger_entries=ledger_entries)
    if args.json:
        _emit(report.as_json())
    else:
        _print_outbox(report, path)
    return 0 if report.ok else _fail(report.error)


def _counts(counts: dict[str, int], most: int) -> str:
    """`unit count, ...` for at most `most` units (--json lists every one)."""
    shown = ", ".join(f"{unit} {count}" for unit, count in sorted(counts.items())[:most])
    more = len(counts) - most
    return shown + (f" (+{more} more: --json lists all)" if more > 0 else "")


def _participation(row: dict[str, Any]) -> str:
    """An upload's participation: the cap and each unit's count of rounds entered."""
    if row["participation_cap"] is None:
        return "no cap"
    return f"cap {row['participation_cap']}: {_counts(row['participation'], 5) or 'no unit'}"


def _stopped_text(stopped: dict) -> str:
    """An upload's round that the ledger says ended without a version, in a cell."""
    why = stopped["check"] or stopped["drop_reason"]
    return f"no: {stopped['outcome']} in {stopped['phase']}" + (f" ({why})" if why else "")


def _print_outbox(report, path: Path) -> None:
    from rich.table import Table

    rows, audit, checked = report.rows, report.audit, report.checked
    table = Table("entry", "sent (UTC)", "round", "payload sha256", "norm before → after",
                  "clipped", "noise", "summed by", "sessions", "scrubbed", "participation",
                  "published")
    for row in rows:
        scrubbed = ", ".join(f"{kind} {count}" for kind, count in row["scrubbed"].items()
                             if count) or "nothing"
        publication, stopped = row["published"], row["stopped"]
        shown = (f"v{publication['version']} ({publication['source']})" if publication
                 else _stopped_text(stopped) if stopped else "no" if checked else "?")
        table.add_row(str(row["entry"]), row["sent_at"], str(row["round"]),
                      row["payload_sha256"][:SHORT],
                      f"{row['norm_before_clip']:.4g} → {row['norm_after_clip']:.4g}",
                      _clipped(row["privacy_unit"], row["clip_norm"]),
                      _noise(row["noise_mode"], row["noise_multiplier"]),
                      _summed(row["secure_aggregation"]), ", ".join(row["session_ids"]),
                      scrubbed, _participation(row), shown)
    deletions = report.deletions
    print(f"outbox {path}: {len(audit.verified)} of {audit.read} records verified"
          + (f" ({len(rows)} uploads, {len(deletions)} deletions)" if deletions else ""))
    _console().print(table)
    if report.participation:
        print("participation (rounds entered per unit, recounted from the records): "
              + _counts(report.participation, 20))
    else:
        print("participation: no upload ran under a participation cap")
    if deletions:
        _print_deletions(deletions)
    if not checked:
        print("publications not checked: pass --aggregator-key (and --ledger or --server)")
    matched = [row["receipt_matched"] for row in rows if row["receipt_matched"] is not None]
    if matched:
        print(f"payload hashes matched to the aggregator's receipts in the ledger: "
              f"{sum(matched)} of {len(rows)} records")
    else:
        print("payload hashes not matched to the aggregator's receipts: pass --ledger or "
              "--server (ledger entries from before receipts were recorded have none)")
    if audit.ok:
        print(f"head {audit.head.hex()} (keep it: --expect-head finds records cut off later)")


def _print_deletions(deletions: list[dict[str, Any]]) -> None:
    from rich.table import Table

    table = Table("entry", "deleted (UTC)", "user (HMAC)", "salt sha256", "sessions",
                  "already consolidated", "sent in rounds")
    for row in deletions:
        table.add_row(str(row["entry"]), row["deleted_at"], row["user_hmac"][:SHORT],
                      row["salt_sha256"][:SHORT], ", ".join(row["session_ids"]),
                      str(row["already_consolidated"]),
                      ", ".join(map(str, row["sent_in_rounds"])) or "none")
    print(f"deletions recorded (fleetmind client forget): {len(deletions)}; a user is named "
          "only by HMAC-SHA256 under the site's forget salt (ask the site for it to check "
          "a user id)")
    _console().print(table)
    if any(row["sent_in_rounds"] for row in deletions):
        print("sessions already sent in a round's update stay in what that round "
              "published, bounded only by its differential privacy")


# ---- audit version --------------------------------------------------------------------


def _audit_version(args: argparse.Namespace) -> int:
    from fleetmind.audit.version_report import version_report

    if not args.dir.is_dir():
        raise _usage(f"{args.dir}: no such folder; pass a version folder (versions/<n>/)")
    key = _key(args.aggregator_key, "aggregator")
    ledger_entries = None
    if args.ledger is not None or args.server is not None:
        ledger_entries = _read_ledger(args, args.ledger)[0]
    else:
        _refuse_connection_flags(args)
    report = version_report(args.dir, key, ledger_entries)
    if args.json:
        _emit(report.as_json())
    elif report.audit.manifest is not None:
        _print_version(report.audit, report.ledger_audit is not None)
    return _fail("; ".join(report.problems)) if report.problems else 0


def _print_version(audit, ledger_checked: bool) -> None:
    from rich.table import Table

    manifest = audit.manifest
    table = Table("field", "value")
    for name, value in (("version", manifest.version), ("parent", manifest.parent),
                        ("round", manifest.round_id), ("base model", manifest.base_model_id),
                        ("base model sha256", manifest.base_model_sha256),
                        ("frozen-A seed", manifest.frozen_a_seed),
                        ("cohort size", manifest.cohort_size),
                        ("summed by", _summed(manifest.secure_aggregation)),
                        ("clip norm", manifest.clip_norm),
                        ("noise", _noise(manifest.noise_mode, manifest.noise_multiplier)),
                        ("ε total, δ", f"{manifest.epsilon:.4g}, {manifest.delta:g}"),
                        ("version hash", audit.version_hash)):
        table.add_row(name, str(value))
    for name, digest in sorted(manifest.files.items()):
        table.add_row(f"sha256 {name}", digest)
    if ledger_checked and manifest.round_id is not None:
        table.add_row("ledger", "no entry" if audit.ledger_entry is None
                      else f"entry {audit.ledger_entry}" + (" (agrees)" if audit.ok
                                                            else " (DISAGREES)"))
    print(f"version {manifest.version} in {audit.folder}: signature and files verified")
    _console().print(table)


# ---- audit canaries -------------------------------------------------------------------


def _audit_canaries(args: argparse.Namespace) -> int:
    from fleetmind.audit import canaries

    for flag, folder in (("--model", args.model), ("--version", args.version)):
        if not folder.is_dir():
            raise _usage(f"{flag} {folder}: no such folder")
    try:
        said = canaries.read_canaries(args.canaries)
        canaries.check_adapter_folder(args.version)
    except ValueError as error:
        raise _usage(error) from None
    if args.aggregator_key is not None:
        from fleetmind.audit import trail

        verified = trail.audit_version(args.version, _key(args.aggregator_key, "aggregator"))
        if verified.error is not None:
            return _fail(verified.error)
    try:
        results = canaries.measure(args.model, args.version, said)
    except (FileNotFoundError, ValueError) as error:
        raise _usage(error) from None
    report = canaries.exposure_report(args.model, args.version, results)
    if args.json:
        _emit(report)
        return 0
    from rich.table import Table

    table = Table("site", "session", "sessions saying it", "secret", "base (bits)",
                  "version (bits)", "at most")
    for r in results:
        table.add_row(r.said.site, r.said.session, str(r.said.repeats), r.said.canary.secret,
                      f"{r.base_bits:.2f}", f"{r.version_bits:.2f}", f"{r.said.max_bits:.2f}")
    table.add_row("mean", "", "", "", f"{report['mean_base_bits']:.2f}",
                  f"{report['mean_version_bits']:.2f}", "",
                  style="bold")
    print(f"canary exposure of {args.version} against the base model {args.model} (a model "
          "that knows nothing scores about 1.4 bits)")
    _console().print(table)
    return 0
