"""`fleetmind audit`: on real outboxes, ledgers and versions made by the classes that write
them, every command passes on good data and, on tampered data, exits 1 naming the first bad
entry or file; bad input is one line and exit 2; --json parses; the ledger is read from a
real loopback aggregator too."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sqlite3
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from support.concurrent import at_once
from support.no_torch import REFUSE_TORCH

from fleetmind.aggregation.participation import ParticipationRecord
from fleetmind.aggregation.records import OutboxRecord, RoundRecord, StoppedRound
from fleetmind.cli.main import main
from fleetmind.client.outbox import Outbox
from fleetmind.client.scrub import ScrubReport
from fleetmind.server.ledger import Ledger
from fleetmind.server.versions import (
    Release,
    Version,
    VersionRegistry,
)
from fleetmind.sim.bench.wire import MODULES, SPEC

ROUNDS = 4


def raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["audit", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv: str) -> tuple[int, dict, str]:
    code, out, err = run(capsys, *argv, "--json")
    return code, json.loads(out), err


def tamper(path: Path, index: int, column: str) -> None:
    """Flips the last byte of one stored column, as someone with the file (not the key)
    could: the append-only triggers stop honest code, not an editor of the file."""
    db = sqlite3.connect(path)
    db.execute("DROP TRIGGER entries_never_updated")
    value = db.execute(f"SELECT {column} FROM entries WHERE idx = ?", (index,)).fetchone()[0]
    db.execute(f"UPDATE entries SET {column} = ? WHERE idx = ?",
               (value[:-1] + bytes([value[-1] ^ 1]), index))
    db.commit()
    db.close()


def delete_last(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("DROP TRIGGER entries_never_deleted")
    db.execute("DELETE FROM entries WHERE idx = (SELECT MAX(idx) FROM entries)")
    db.commit()
    db.close()


# ---- fixtures: an aggregator's versions and ledger, a site's outbox ---------------------


@pytest.fixture
def aggregator(tmp_path: Path) -> dict:
    """Genesis plus ROUNDS published versions, the ledger recording each, and the public
    key in three files: hex, raw, PEM."""
    key = Ed25519PrivateKey.generate()
    registry = VersionRegistry(tmp_path / "aggregator", key)
    registry.genesis(SPEC)
    rng = np.random.default_rng(0)
    published: list[Version] = []
    with Ledger(tmp_path / "aggregator" / "ledger.sqlite", key) as ledger:
        for round_id in range(ROUNDS):
            b = {m.name: rng.normal(size=(m.out_features, 2)).astype(np.float32)
                 for m in MODULES}
            epsilon = 0.5 * (round_id + 1)
            version = registry.publish(b, Release(round_id=round_id, cohort_size=3,
                                                  clip_norm=1.0, noise_multiplier=0.8,
                                                  noise_mode="distributed", epsilon=epsilon,
                                                  delta=1e-5))
            ledger.append(RoundRecord(
                round_id=round_id, cohort_size=3, dropouts=round_id % 2, clip_norm=1.0,
                noise_multiplier=0.8, noise_mode="distributed", epsilon_round=0.5,
                epsilon_total=epsilon, delta=1e-5, version=version.number,
                version_hash=version.manifest_sha256(),
                # round 1 lists its receipts (the site's payload among them); the others
                # are entries from before receipts were recorded
                payload_sha256s=(f"{2:064x}", f"{7:064x}") if round_id == 1 else ()))
            published.append(version)
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "aggregator.hex").write_text(raw_public(key).hex() + "\n")
    (keys / "aggregator.raw").write_bytes(raw_public(key))
    (keys / "aggregator.pem").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return {"key": key, "ledger": tmp_path / "aggregator" / "ledger.sqlite",
            "versions": published, "pub": str(keys / "aggregator.hex"),
            "pub_raw": str(keys / "aggregator.raw"), "pub_pem": str(keys / "aggregator.pem")}


def outbox_record(round_id: int) -> OutboxRecord:
    return OutboxRecord(round_id=round_id, payload_sha256=f"{round_id + 1:064x}",
                        norm_before_clip=2.5, norm_after_clip=1.0, noise_mode="distributed",
                        noise_multiplier=0.8, session_ids=[f"s-{round_id}-a", f"s-{round_id}-b"],
                        scrubbed={"email": round_id, "phone": 1}, base_version=round_id,
                        created_at_ms=1_700_000_000_000 + round_id)


@pytest.fixture
def site(tmp_path: Path) -> dict:
    """A site folder whose outbox records rounds 0, 1 and 3 (it sat out round 2)."""
    key = Ed25519PrivateKey.generate()
    folder = tmp_path / "site"
    with Outbox(folder / "outbox.sqlite", key) as outbox:
        for round_id in (0, 1, 3):
            outbox.append(outbox_record(round_id))
    keys = tmp_path / "site-keys"
    keys.mkdir()
    (keys / "site.pub").write_bytes(raw_public(key))
    identity = keys / "identity.key"
    identity.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return {"key": key, "dir": folder, "pub": str(keys / "site.pub"),
            "identity": str(identity)}


# ---- audit ledger -----------------------------------------------------------------------


def test_ledger_verifies_and_reports_every_round(capsys, aggregator) -> None:
    code, report, err = run_json(capsys, "ledger", "--file", str(aggregator["ledger"]),
                                 "--aggregator-key", aggregator["pub"])
    assert code == 0, err
    assert report["ok"] and report["error"] is None and report["verified"] == ROUNDS
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == list(range(ROUNDS))
    assert [r["epsilon_total"] for r in rounds] == [0.5, 1.0, 1.5, 2.0]
    assert [r["dropouts"] for r in rounds] == [0, 1, 0, 1]
    assert [r["version_hash"] for r in rounds] == [
        v.manifest_sha256() for v in aggregator["versions"]]
    assert report["head"] == rounds[-1]["entry_hash"]

    # Every key format a site's aggregator_key accepts works here too; and the table.
    for key in (aggregator["pub_raw"], aggregator["pub_pem"]):
        code, out, _ = run(capsys, "ledger", "--file", str(aggregator["ledger"]),
                           "--aggregator-key", key)
        assert code == 0
        assert f"{ROUNDS} of {ROUNDS} entries verified" in out
        # What ε is, in words, never a bare "epsilon X" (these entries carry no cap).
        assert ("privacy spent (signed): ε per unit, every round composed (no participation "
                "cap): 2 at δ 1e-05 over 4 round(s)") in out and report["head"] in out
        assert "1 (unit not recorded)" in out  # entries from before the unit was recorded


@pytest.mark.parametrize("column, index, message", [
    ("body", 2, "altered"),
    ("signature", 1, "signature does not verify"),
    ("prev_hash", 3, "does not follow"),
])
def test_a_tampered_ledger_fails_naming_the_first_bad_entry(capsys, aggregator, column, index,
                                                            message) -> None:
    tamper(aggregator["ledger"], index, column)
    code, report, err = run_json(capsys, "ledger", "--file", str(aggregator["ledger"]),
                                 "--aggregator-key", aggregator["pub"])
    assert code == 1
    assert not report["ok"] and report["bad_entry"] == index
    assert f"ledger entry {index}" in report["error"] and message in report["error"]
    # What came before the break still verified and is still reported.
    assert [r["round"] for r in report["rounds"]] == list(range(index))
    assert f"FAILED: ledger entry {index}" in err and err.count("\n") == 1

    code, out, err = run(capsys, "ledger", "--file", str(aggregator["ledger"]),
                         "--aggregator-key", aggregator["pub"])
    assert code == 1 and f"{index} of {ROUNDS} entries verified" in out
    assert f"ledger entry {index}" in err


def test_another_aggregators_key_fails_at_entry_0(capsys, aggregator, tmp_path) -> None:
    other = tmp_path / "other.pub"
    other.write_bytes(raw_public(Ed25519PrivateKey.generate()))
    code, report, err = run_json(capsys, "ledger", "--file", str(aggregator["ledger"]),
                                 "--aggregator-key", str(other))
    assert code == 1 and report["bad_entry"] == 0 and report["rounds"] == []
    assert "ledger entry 0: signature does not verify with the aggregator key" in err


def test_a_kept_head_finds_entries_cut_off_the_end(capsys, aggregator) -> None:
    _, report, _ = run_json(capsys, "ledger", "--file", str(aggregator["ledger"]),
                            "--aggregator-key", aggregator["pub"])
    head = report["head"]
    delete_last(aggregator["ledger"])
    # Without the head the shorter chain is valid; with it the cut shows.
    code, _, _ = run_json(capsys, "ledger", "--file", str(aggregator["ledger"]),
                          "--aggregator-key", aggregator["pub"])
    assert code == 0
    code, report, err = run_json(capsys, "ledger", "--file", str(aggregator["ledger"]),
                                 "--aggregator-key", aggregator["pub"], "--expect-head", head)
    assert code == 1 and report["bad_entry"] is None and "cut off" in err


def test_the_ledger_file_is_read_without_changing_it(capsys, aggregator) -> None:
    before = aggregator["ledger"].read_bytes()
    assert run(capsys, "ledger", "--file", str(aggregator["ledger"]),
               "--aggregator-key", aggregator["pub"])[0] == 0
    assert aggregator["ledger"].read_bytes() == before


@pytest.mark.parametrize("argv, message", [
    (["--file", "{missing}"], "no such file"),
    (["--file", "{notalog}"], "not a fleetmind ledger"),
    (["--file", "{ledger}", "--insecure"], "only apply with --server"),
    (["--server", "127.0.0.1:1"], "pass --ca, --cert and --key"),
    (["--server", "127.0.0.1:1", "--ca", "{ledger}"], "together"),
    (["--server", "192.0.2.7:7443", "--insecure"], "only for a loopback aggregator"),
    (["--server", "nonsense", "--insecure"], "must be host:port"),
])
def test_ledger_bad_input_is_one_line_and_exit_2(capsys, aggregator, tmp_path, argv,
                                                 message) -> None:
    (tmp_path / "notalog").write_text("not sqlite " * 50)
    paths = {"missing": str(tmp_path / "missing.sqlite"), "notalog": str(tmp_path / "notalog"),
             "ledger": str(aggregator["ledger"])}
    argv = [a.format(**paths) for a in argv]
    code, out, err = run(capsys, "ledger", *argv, "--aggregator-key", aggregator["pub"])
    assert code == 2 and out == ""
    assert err.startswith("fleetmind: error: ") and err.count("\n") == 1 and message in err


@pytest.mark.parametrize("content, message", [
    (b"\x01" * 31, "not an Ed25519 public key"),
    (b"-----BEGIN PUBLIC KEY-----\nxx\n-----END PUBLIC KEY-----\n", "unreadable PEM"),
])
def test_a_malformed_aggregator_key_is_one_line(capsys, aggregator, tmp_path, content,
                                                message) -> None:
    bad = tmp_path / "bad.pub"
    bad.write_bytes(content)
    code, _, err = run(capsys, "ledger", "--file", str(aggregator["ledger"]),
                       "--aggregator-key", str(bad))
    assert code == 2 and message in err and err.count("\n") == 1
    code, _, err = run(capsys, "ledger", "--file", str(aggregator["ledger"]),
                       "--aggregator-key", str(tmp_path / "absent.pub"))
    assert code == 2 and "no such file" in err


def test_ledger_from_a_loopback_aggregator(capsys, tmp_path) -> None:
    from fleetmind.server.config import ServerConfig
    from fleetmind.server.service import serve

    running = serve(ServerConfig(data_dir=tmp_path / "data", insecure=True))
    try:
        registry = running.coordinator.registry
        for round_id in range(3):
            running.coordinator.ledger.append(RoundRecord(
                round_id=round_id, cohort_size=4, dropouts=1, clip_norm=1.0,
                noise_multiplier=1.1, noise_mode="central", epsilon_round=0.3,
                epsilon_total=0.3 * (round_id + 1), delta=1e-5, version=round_id + 1,
                version_hash=f"{round_id:064x}"))
        public = tmp_path / "aggregator.pub"
        public.write_bytes(registry.public_key.public_bytes_raw())
        code, report, err = run_json(capsys, "ledger", "--server", running.address,
                                     "--insecure", "--aggregator-key", str(public))
        assert code == 0, err
        assert [r["round"] for r in report["rounds"]] == [0, 1, 2]
        assert report["rounds"][-1]["epsilon_total"] == pytest.approx(0.9)
        assert report["source"] == f"aggregator {running.address}"
        assert set(report["aggregator_budget"]) >= {"epsilon_spent", "epsilon_budget"}
        code, out, _ = run(capsys, "ledger", "--server", running.address, "--insecure",
                           "--aggregator-key", str(public))
        assert code == 0 and "3 of 3 entries verified" in out and "budget" in out

        # The server's word is checked, not trusted: another key fails at entry 0.
        other = tmp_path / "other.pub"
        other.write_bytes(raw_public(Ed25519PrivateKey.generate()))
        code, report, _ = run_json(capsys, "ledger", "--server", running.address,
                                   "--insecure", "--aggregator-key", str(other))
        assert code == 1 and report["bad_entry"] == 0
    finally:
        running.stop(grace=None)


def test_an_unreachable_aggregator_is_one_line(capsys, aggregator) -> None:
    code, _, err = run(capsys, "ledger", "--server", "127.0.0.1:9", "--insecure",
                       "--timeout", "2", "--aggregator-key", aggregator["pub"])
    assert code == 2 and "did not answer" in err and err.count("\n") == 1


def test_ledger_text_says_what_epsilon_is_per_row(capsys, tmp_path: Path) -> None:
    # Rounds under a participation cap: ε is per user over the fleet's life under cap K.
    key = Ed25519PrivateKey.generate()
    path = tmp_path / "ledger.sqlite"
    with Ledger(path, key) as ledger:
        for round_id in range(2):
            ledger.append(RoundRecord(
                round_id=round_id, cohort_size=3, dropouts=0, clip_norm=1.0,
                noise_multiplier=0.8, noise_mode="distributed", epsilon_round=0.5,
                epsilon_total=1.25 * (round_id + 1), delta=1e-5, version=round_id + 1,
                version_hash=f"{round_id:064x}", privacy_unit="user", participation_cap=4))
    pub = tmp_path / "aggregator.pub"
    pub.write_bytes(raw_public(key))
    code, out, err = run(capsys, "ledger", "--file", str(path), "--aggregator-key", str(pub))
    assert code == 0, err
    assert "privacy spent (signed): ε per user under cap 4: 2.5 at δ 1e-05 over 2 round(s)" \
        in out
    assert "ε total is" in out and out.count("ε per user under cap 4") == 3  # 2 rows + total
    assert "epsilon 2.5" not in out


# ---- audit outbox -----------------------------------------------------------------------


def test_outbox_reports_every_record(capsys, site) -> None:
    code, report, err = run_json(capsys, "outbox", str(site["dir"]),
                                 "--site-key", site["pub"])
    assert code == 0, err
    assert report["ok"] and report["verified"] == 3 and not report["publications_checked"]
    first = report["records"][0]
    assert first["round"] == 0 and first["payload_sha256"] == f"{1:064x}"
    assert first["norm_before_clip"] == 2.5 and first["norm_after_clip"] == 1.0
    assert first["noise_mode"] == "distributed" and first["noise_multiplier"] == 0.8
    assert first["session_ids"] == ["s-0-a", "s-0-b"]
    assert report["records"][2]["scrubbed"]["email"] == 3
    assert first["sent_at"] == "2023-11-14 22:13:20"
    assert report["receipts_checked"] is False

    # The operator's own identity key (PEM private) stands in for the public key, and the
    # outbox file can be named directly.
    code, out, _ = run(capsys, "outbox", str(site["dir"] / "outbox.sqlite"),
                       "--site-key", site["identity"])
    assert code == 0 and "3 of 3 records verified" in out
    assert "s-3-a, s-3-b" in out and "email 3, phone 1" in out
    assert "participation: no upload ran under a participation cap" in out


def test_outbox_text_shows_participation(capsys, tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    folder = tmp_path / "site"
    with Outbox(folder / "outbox.sqlite", key) as outbox:
        outbox.append(outbox_record(0))  # before a cap: no participation
        for round_id, counts in ((1, (("alice", 1), ("bob", 1))), (2, (("alice", 2),))):
            outbox.append(dataclasses.replace(
                outbox_record(round_id), privacy_unit="user", clip_norm=1.0,
                participation=ParticipationRecord(round_id, "user", 4, counts)))
    pub = tmp_path / "site.pub"
    pub.write_bytes(raw_public(key))
    code, report, err = run_json(capsys, "outbox", str(folder), "--site-key", str(pub))
    assert code == 0, err
    assert report["participation_counts"] == {"alice": 2, "bob": 1}
    assert report["deletions"] == []
    code, out, err = run(capsys, "outbox", str(folder), "--site-key", str(pub))
    assert code == 0, err
    assert "participation" in out and "no cap" in out
    assert "cap 4: alice 1, bob 1" in out and "cap 4: alice 2" in out
    assert ("participation (rounds entered per unit, recounted from the records): alice 2, "
            "bob 1") in out
    assert "deletions recorded" not in out


def test_outbox_rounds_are_matched_to_their_publication(capsys, site, aggregator) -> None:
    # Rounds 0, 1, 3 published as versions 1, 2, 4 (ledger); round 2 had no outbox record.
    code, report, err = run_json(capsys, "outbox", str(site["dir"]), "--site-key",
                                 site["pub"], "--aggregator-key", aggregator["pub"],
                                 "--ledger", str(aggregator["ledger"]))
    assert code == 0, err
    assert report["publications_checked"]
    assert [(r["round"], r["published"]["version"], r["published"]["source"])
            for r in report["records"]] == [(0, 1, "ledger"), (1, 2, "ledger"),
                                             (3, 4, "ledger")]

    # Without a ledger, the site's own downloaded versions speak for the rounds they made.
    versions = site["dir"] / "versions"
    versions.mkdir()
    shutil.copytree(aggregator["versions"][1].folder, versions / "00000002")
    code, report, _ = run_json(capsys, "outbox", str(site["dir"]), "--site-key", site["pub"],
                               "--aggregator-key", aggregator["pub"])
    assert code == 0
    assert [r["published"] for r in report["records"]] == [
        None, {"version": 2, "cohort_size": 3, "source": "version"}, None]


def test_a_payload_the_aggregator_did_not_sum_fails(capsys, site, aggregator,
                                                    tmp_path) -> None:
    code, report, _ = run_json(capsys, "outbox", str(site["dir"]), "--site-key", site["pub"],
                               "--aggregator-key", aggregator["pub"],
                               "--ledger", str(aggregator["ledger"]))
    assert code == 0 and report["receipts_checked"]
    assert [r["receipt_matched"] for r in report["records"]] == [None, True, None]

    # A ledger (signed by the same aggregator) whose round 1 summed other payloads.
    with Ledger(aggregator["ledger"], aggregator["key"]) as source, \
            Ledger(tmp_path / "other.sqlite", aggregator["key"]) as other:
        for entry in source:
            record = entry.record
            if record.round_id == 1:
                record = RoundRecord(**{**asdict(record), "payload_sha256s": (f"{7:064x}",)})
            other.append(record)
    code, report, _ = run_json(capsys, "outbox", str(site["dir"]), "--site-key", site["pub"],
                               "--aggregator-key", aggregator["pub"],
                               "--ledger", str(tmp_path / "other.sqlite"))
    assert code == 1 and not report["ok"]
    assert report["records"][1]["receipt_matched"] is False
    assert "not among the aggregator's receipts" in report["error"]


def test_an_upload_whose_round_stopped_shows_how_the_ledger_says_it_ended(
        capsys, site, aggregator, tmp_path) -> None:
    code, report, _ = run_json(capsys, "outbox", str(site["dir"]), "--site-key", site["pub"],
                               "--aggregator-key", aggregator["pub"],
                               "--ledger", str(aggregator["ledger"]))
    assert code == 0 and [r["stopped"] for r in report["records"]] == [None, None, None]
    payload = report["records"][2]["payload_sha256"]  # round 3's upload
    # A ledger (signed by the same aggregator) in which round 3 aborted instead.
    with Ledger(aggregator["ledger"], aggregator["key"]) as source, \
            Ledger(tmp_path / "other.sqlite", aggregator["key"]) as other:
        last = None
        for entry in source:
            record = entry.record
            if record.round_id == 3:
                record = StoppedRound(
                    round_id=3, outcome="aborted", phase="unmasking", check=None,
                    measured=None, allowed=None, contributors=0, version=last.version,
                    epsilon_round=0.0, epsilon_total=last.epsilon_total, delta=last.delta,
                    payload_sha256s=(payload,), drop_reason="too_few_shares")
            other.append(record)
            last = record
    code, report, _ = run_json(capsys, "outbox", str(site["dir"]), "--site-key", site["pub"],
                               "--aggregator-key", aggregator["pub"],
                               "--ledger", str(tmp_path / "other.sqlite"))
    assert code == 0, report
    row = report["records"][2]
    assert row["published"] is None
    assert row["stopped"] == {"outcome": "aborted", "phase": "unmasking", "check": None,
                              "drop_reason": "too_few_shares", "epsilon_round": 0.0,
                              "receipt_listed": True}
    code = main(["audit", "outbox", str(site["dir"]), "--site-key", site["pub"],
                 "--aggregator-key", aggregator["pub"], "--ledger",
                 str(tmp_path / "other.sqlite")])
    assert code == 0
    assert "no: aborted in unmasking (too_few_shares)" in capsys.readouterr().out


@pytest.mark.parametrize("column, index, message", [
    ("body", 1, "altered"),
    ("signature", 2, "signature does not verify with the site's identity key"),
    ("hash", 0, "altered"),
])
def test_a_tampered_outbox_fails_naming_the_first_bad_entry(capsys, site, column, index,
                                                            message) -> None:
    tamper(site["dir"] / "outbox.sqlite", index, column)
    code, report, err = run_json(capsys, "outbox", str(site["dir"]), "--site-key",
                                 site["pub"])
    assert code == 1 and report["bad_entry"] == index and len(report["records"]) == index
    assert f"outbox entry {index}" in err and message in err


def test_another_sites_key_fails_at_entry_0(capsys, site, tmp_path) -> None:
    other = tmp_path / "other.pub"
    other.write_text(raw_public(Ed25519PrivateKey.generate()).hex())
    code, out, err = run(capsys, "outbox", str(site["dir"]), "--site-key", str(other))
    assert code == 1 and "0 of 3 records verified" in out and "outbox entry 0" in err


def test_a_broken_ledger_fails_the_outbox_audit(capsys, site, aggregator) -> None:
    tamper(aggregator["ledger"], 1, "body")
    code, report, err = run_json(capsys, "outbox", str(site["dir"]), "--site-key",
                                 site["pub"], "--aggregator-key", aggregator["pub"],
                                 "--ledger", str(aggregator["ledger"]))
    assert code == 1 and "the ledger does not verify: ledger entry 1" in err
    # Only the entries before the break count as evidence of publication.
    assert [r["published"] is not None for r in report["records"]] == [True, False, False]


@pytest.mark.parametrize("argv, message", [
    (["{missing}", "--site-key", "{pub}"], "no outbox here"),
    (["{dir}", "--site-key", "{missing}"], "no such file"),
    (["{dir}", "--site-key", "{pub}", "--ledger", "{missing}"], "need --aggregator-key"),
    (["{dir}", "--site-key", "{pub}", "--server", "127.0.0.1:1"], "need --aggregator-key"),
    (["{dir}", "--site-key", "{pub}", "--insecure"], "only apply with --server"),
])
def test_outbox_bad_input_is_one_line_and_exit_2(capsys, site, tmp_path, argv,
                                                 message) -> None:
    paths = {"missing": str(tmp_path / "absent"), "pub": site["pub"], "dir": str(site["dir"])}
    code, out, err = run(capsys, "outbox", *[a.format(**paths) for a in argv])
    assert code == 2 and out == "" and message in err and err.count("\n") == 1


# ---- audit version ----------------------------------------------------------------------


def test_version_verifies_and_matches_its_ledger_entry(capsys, aggregator) -> None:
    version = aggregator["versions"][2]
    code, report, err = run_json(capsys, "version", str(version.folder), "--aggregator-key",
                                 aggregator["pub"], "--ledger", str(aggregator["ledger"]))
    assert code == 0, err
    assert report["ok"] and report["ledger_entry"] == 2 and report["disagreements"] == []
    assert report["version_hash"] == version.manifest_sha256()
    assert report["manifest"]["version"] == 3 and report["manifest"]["round_id"] == 2
    assert report["manifest"]["files"] == dict(version.manifest.files)

    code, out, _ = run(capsys, "version", str(version.folder), "--aggregator-key",
                       aggregator["pub_pem"])
    assert code == 0 and "signature and files verified" in out
    assert version.manifest.files["adapter_model.safetensors"] in out


@pytest.mark.parametrize("victim, message", [
    ("adapter_model.safetensors", "adapter_model.safetensors does not match its sha256"),
    ("adapter_config.json", "adapter_config.json does not match its sha256"),
    ("manifest.sig", "manifest.sig does not verify"),
    ("manifest.json", "manifest.sig does not verify"),
])
def test_a_tampered_version_fails_naming_the_file(capsys, aggregator, victim, message) -> None:
    folder = aggregator["versions"][0].folder
    path = folder / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    code, report, err = run_json(capsys, "version", str(folder), "--aggregator-key",
                                 aggregator["pub"])
    assert code == 1 and not report["ok"] and message in report["error"] and message in err


def test_a_version_with_an_extra_or_missing_file_fails(capsys, aggregator) -> None:
    folder = aggregator["versions"][0].folder
    (folder / "extra.bin").write_bytes(b"x")
    code, _, err = run(capsys, "version", str(folder), "--aggregator-key", aggregator["pub"])
    assert code == 1 and "extra.bin" in err
    (folder / "extra.bin").unlink()
    (folder / "adapter_config.json").unlink()
    code, _, err = run(capsys, "version", str(folder), "--aggregator-key", aggregator["pub"])
    assert code == 1 and "adapter_config.json is missing" in err


def test_a_version_under_another_key_fails(capsys, aggregator, tmp_path) -> None:
    other = tmp_path / "other.pub"
    other.write_bytes(raw_public(Ed25519PrivateKey.generate()))
    code, _, err = run(capsys, "version", str(aggregator["versions"][0].folder),
                       "--aggregator-key", str(other))
    assert code == 1 and "does not verify with the aggregator key" in err


def test_a_version_the_ledger_does_not_record_fails(capsys, aggregator, tmp_path) -> None:
    # A ledger (same key) whose entry for version 2 names another manifest.
    with Ledger(tmp_path / "forged.sqlite", aggregator["key"]) as forged:
        for version in aggregator["versions"][:2]:
            record = RoundRecord(
                round_id=version.manifest.round_id, cohort_size=3, dropouts=0, clip_norm=1.0,
                noise_multiplier=0.8, noise_mode="distributed", epsilon_round=0.5,
                epsilon_total=version.manifest.epsilon, delta=1e-5, version=version.number,
                version_hash="f" * 64 if version.number == 2 else version.manifest_sha256())
            forged.append(record)
    code, report, err = run_json(capsys, "version", str(aggregator["versions"][1].folder),
                                 "--aggregator-key", aggregator["pub"],
                                 "--ledger", str(tmp_path / "forged.sqlite"))
    assert code == 1 and report["ledger_entry"] == 1
    assert any(d.startswith("version_hash") for d in report["disagreements"])
    code, _, err = run(capsys, "version", str(aggregator["versions"][3].folder),
                       "--aggregator-key", aggregator["pub"],
                       "--ledger", str(tmp_path / "forged.sqlite"))
    assert code == 1 and "is not in the ledger" in err


def test_version_bad_input_is_one_line(capsys, aggregator, tmp_path) -> None:
    code, _, err = run(capsys, "version", str(tmp_path / "absent"), "--aggregator-key",
                       aggregator["pub"])
    assert code == 2 and "no such folder" in err and err.count("\n") == 1


# ---- the auditor's install ----------------------------------------------------------------


def test_audit_runs_without_torch(aggregator, site) -> None:
    # REFUSE_TORCH stands in for an auditor's install without torch, transformers and peft
    # (tests/integration/test_boundaries.py does the same for the aggregator).
    script = (
        REFUSE_TORCH +
        "from fleetmind.cli.main import main\n"
        f"assert main(['audit', 'ledger', '--file', {str(aggregator['ledger'])!r}, "
        f"'--aggregator-key', {aggregator['pub']!r}, '--json']) == 0\n"
        f"assert main(['audit', 'outbox', {str(site['dir'])!r}, '--site-key', "
        f"{site['pub']!r}, '--json']) == 0\n"
        f"assert main(['audit', 'version', {str(aggregator['versions'][0].folder)!r}, "
        f"'--aggregator-key', {aggregator['pub']!r}, '--json']) == 0\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120, cwd=Path(__file__).resolve().parents[3])
    assert result.returncode == 0, result.stderr


# ---- the whole trail of one real round ------------------------------------------------------


def test_the_trail_of_a_real_round_verifies_end_to_end(capsys, tmp_path) -> None:
    """Three sites run `participate` against a loopback aggregator; then the auditor checks
    a site's outbox against the aggregator's ledger, the ledger itself, and the version the
    round published against its ledger entry, all over the Audit service."""

    import grpc

    from fleetmind.client.agent import SiteUpdate, participate
    from fleetmind.server.config import CohortPolicy, PrivacyPolicy, ServerConfig
    from fleetmind.server.service import serve

    shapes = {m.name: (m.out_features, 2) for m in MODULES}
    running = serve(ServerConfig(
        data_dir=tmp_path / "data", insecure=True, adapter=SPEC,
        cohort=CohortPolicy(min_size=3, target_size=3, deadline_s=30, phase_deadline_s=30),
        privacy=PrivacyPolicy(clip_norm=1.0, noise_multiplier=1.0, epsilon_budget=10.0,
                              fixed_point_clip=1.0)))
    try:
        rng = np.random.default_rng(1)
        keys = [Ed25519PrivateKey.generate() for _ in range(3)]

        def site(i: int) -> object:
            update = SiteUpdate(clip_norm=1.0, privacy_unit="session",
                delta={n: rng.uniform(-0.1, 0.1, s).astype(np.float32)
                       for n, s in shapes.items()},
                session_ids=(f"s{i}-a",), scrubbed=ScrubReport(email=i), norm_before_clip=2.0)
            with grpc.insecure_channel(running.address) as channel, \
                    Outbox(tmp_path / f"site-{i}" / "outbox.sqlite", keys[i]) as outbox:
                return participate(channel, keys[i], f"site-{i}", update, outbox, timeout=20)

        results = dict(enumerate(at_once(3, site)))
        assert all(getattr(results.get(i), "version", None) == 1 for i in range(3)), results

        public = tmp_path / "aggregator.pub"
        public.write_bytes(running.coordinator.registry.public_key.public_bytes_raw())
        server = ["--server", running.address, "--insecure", "--aggregator-key", str(public)]
        site_key = tmp_path / "site-0.pub"
        site_key.write_bytes(raw_public(keys[0]))

        code, report, err = run_json(capsys, "outbox", str(tmp_path / "site-0"),
                                     "--site-key", str(site_key), *server)
        assert code == 0, err
        [record] = report["records"]
        assert record["payload_sha256"] == results[0].payload_sha256
        assert record["published"] == {"version": 1, "cohort_size": 3, "source": "ledger"}
        assert report["receipts_checked"] and record["receipt_matched"] is True
        assert record["session_ids"] == ["s0-a"] and record["noise_mode"] == "distributed"
        assert (record["privacy_unit"], record["clip_norm"]) == ("session", 1.0)
        assert record["secure_aggregation"] is True
        code, out, _ = run(capsys, "outbox", str(tmp_path / "site-0"), "--site-key",
                           str(site_key), *server)
        assert code == 0 and "each session to 1" in out

        code, report, err = run_json(capsys, "ledger", *server)
        assert code == 0, err
        [round_] = report["rounds"]
        assert (round_["round"], round_["version"], round_["cohort_size"],
                round_["dropouts"]) == (results[0].round_id, 1, 3, 0)
        assert round_["epsilon_total"] > 0
        assert (round_["privacy_unit"], round_["clip_norm"]) == ("session", 1.0)
        assert report["aggregator_budget"]["epsilon_spent"] == pytest.approx(
            round_["epsilon_total"])

        folder = tmp_path / "data" / "versions" / "00000001"
        code, report, err = run_json(capsys, "version", str(folder), *server)
        assert code == 0, err
        assert report["ledger_entry"] == 0 and report["version_hash"] == round_["version_hash"]
    finally:
        running.stop(grace=None)


def test_ledger_over_mtls_with_an_auditor_certificate(capsys, tmp_path) -> None:
    from support.pki import aggregator_tls

    from fleetmind.server import identity
    from fleetmind.server.config import ServerConfig
    from fleetmind.server.service import serve

    certs = tmp_path / "certs"
    ca, tls = aggregator_tls(certs)
    identity.issue_site(ca, "auditor").save(certs, "auditor")
    identity.issue_site(identity.create_ca(), "auditor").save(tmp_path / "stranger", "auditor")
    running = serve(ServerConfig(data_dir=tmp_path / "data", tls=tls))
    try:
        public = tmp_path / "aggregator.pub"
        public.write_bytes(running.coordinator.registry.public_key.public_bytes_raw())
        flags = ["--server", running.address, "--aggregator-key", str(public),
                 "--ca", str(certs / "ca.crt")]
        code, report, err = run_json(capsys, "ledger", *flags, "--cert",
                                     str(certs / "auditor.crt"), "--key",
                                     str(certs / "auditor.key"))
        assert code == 0, err
        assert report["ok"] and report["rounds"] == []  # nothing published yet: empty, valid
        # A certificate from another CA never gets past the handshake: one line, exit 2.
        stranger = tmp_path / "stranger"
        code, _, err = run(capsys, "ledger", *flags, "--timeout", "5", "--cert",
                           str(stranger / "auditor.crt"), "--key", str(stranger / "auditor.key"))
        assert code == 2 and "UNAVAILABLE" in err and err.count("\n") == 1
    finally:
        running.stop(grace=None)
