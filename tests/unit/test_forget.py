"""`fleetmind client forget` records the deletion in the site's signed outbox: a ForgetRecord
naming the user only by an HMAC under the site's salt, the deleted session ids and how
many a consolidation had already used. It verifies in the chain, an edit to it is found,
outboxes from before deletions verify byte for byte as they did, and `audit outbox` lists
it."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleetmind.aggregation.records import (
    ForgetRecord,
    OutboxError,
    OutboxRecord,
    parse_outbox_body,
    user_hmac,
    verify_outbox,
)
from fleetmind.cli.main import main as fleetmind_main
from fleetmind.client.outbox import FORGET_ROUND, FORGET_SALT_FILE, Outbox, forget_salt
from fleetmind.client.serve.cli import main as cli_main
from fleetmind.client.store import Message, Session, SessionStore

SALT = bytes(range(32))
# A fixed identity (Ed25519 signatures are deterministic), so an outbox written from the
# records below has the same bytes and head under any fleetmind that writes them the same.
FIXED_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
# The head of upload(0..2) under FIXED_KEY, as written before deletion records existed.
GOLDEN_HEAD = "bb43844716dbb9b297ea2539f0eaf4b47e2812f03ca6702664891fcc173aba3e"
GOLDEN_BODY_0 = (
    b'{"base_version":0,"clip_norm":1.0,"created_at_ms":1700000000000,"noise_mode":'
    b'"distributed","noise_multiplier":0.8,"norm_after_clip":1.0,"norm_before_clip":2.5,'
    b'"payload_sha256":"0000000000000000000000000000000000000000000000000000000000000001",'
    b'"privacy_unit":"user","round_id":0,"scrubbed":{"api_key":0,"card":0,"email":0,'
    b'"ip":0,"national_id":0,"phone":1},"session_ids":["s-0-a","s-0-b"]}')


def upload(round_id: int, session_ids: tuple[str, ...] | None = None) -> OutboxRecord:
    return OutboxRecord(
        round_id=round_id, payload_sha256=f"{round_id + 1:064x}", norm_before_clip=2.5,
        norm_after_clip=1.0, noise_mode="distributed", noise_multiplier=0.8,
        session_ids=session_ids or (f"s-{round_id}-a", f"s-{round_id}-b"),
        scrubbed=(("email", round_id), ("phone", 1)), base_version=round_id,
        created_at_ms=1_700_000_000_000 + round_id, clip_norm=1.0, privacy_unit="user")


def forget(user: str = "alice@example.com", ids: tuple[str, ...] = ("s-1-a",),
           used: int = 1) -> ForgetRecord:
    return ForgetRecord.for_user(SALT, user, ids, used, created_at_ms=1_700_000_100_000)


def tamper(path: Path, index: int) -> None:
    db = sqlite3.connect(path)
    db.execute("DROP TRIGGER entries_never_updated")
    body = db.execute("SELECT body FROM entries WHERE idx = ?", (index,)).fetchone()[0]
    db.execute("UPDATE entries SET body = ? WHERE idx = ?",
               (body.replace(b'"already_consolidated":1', b'"already_consolidated":0'), index))
    db.commit()
    db.close()


# ---- the record ---------------------------------------------------------------------------


def test_record_names_the_user_only_by_its_hmac() -> None:
    record = forget()
    body = record.to_body()
    assert b"alice" not in body and b'"kind":"forget"' in body
    assert record.user_hmac == user_hmac(SALT, "alice@example.com")
    assert parse_outbox_body(body) == ForgetRecord.from_body(body) == record
    # The auditor's check: with the site's salt and the id, the record is recognised.
    assert record.names("alice@example.com", SALT)
    assert not record.names("bob@example.com", SALT)
    with pytest.raises(ValueError, match="not the salt"):
        record.names("alice@example.com", bytes(32))


@pytest.mark.parametrize("change, message", [
    ({"session_ids": ()}, "names the sessions"),
    ({"already_consolidated": 3}, "exceeds"),
    ({"user_hmac": "alice"}, "64 lowercase hex"),
    ({"session_ids": ("hello there",)}, "not a session id"),
])
def test_record_is_validated(change: dict, message: str) -> None:
    values = dict(user_hmac=user_hmac(SALT, "a"), salt_sha256="0" * 64,
                  session_ids=("s-1",), already_consolidated=1)
    with pytest.raises(ValueError, match=message):
        ForgetRecord(**{**values, **change})
    with pytest.raises(ValueError, match="non-empty"):
        user_hmac(SALT, " ")


def test_salt_is_made_once_and_kept(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no forget salt"):
        forget_salt(tmp_path, create=False)
    salt = forget_salt(tmp_path)
    assert len(salt) == 32 and forget_salt(tmp_path) == salt
    assert (tmp_path / FORGET_SALT_FILE).stat().st_mode & 0o077 == 0


# ---- in the chain -------------------------------------------------------------------------


def test_deletion_is_chained_signed_and_exempt_from_round_order(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    with Outbox(tmp_path / "outbox.sqlite", key) as outbox:
        outbox.append(upload(3))
        deletion = outbox.append_forget(forget())
        outbox.append(upload(3))  # a retried send of the last round: still fine
        with pytest.raises(OutboxError, match="before the last recorded round 3"):
            outbox.append(upload(2))  # the rule holds across a deletion
        with pytest.raises(TypeError, match="append_forget"):
            outbox.append(forget())  # type: ignore[arg-type]
        assert deletion.index == 1 and deletion.is_forget and deletion.forget == forget()
        assert [e.index for e in outbox.chain()] == [0, 1, 2]
        assert [e.index for e in outbox] == [0, 2]  # iteration: the uploads
        assert [(e.index, r) for e, r in outbox.deletions()] == [(1, forget())]
        assert [e.index for e in outbox.for_round(3)] == [0, 2]
        assert outbox.for_round(FORGET_ROUND) == []
        with pytest.raises(ValueError, match="deletion record"):
            _ = deletion.record
        head = outbox.verify()
        assert verify_outbox(list(outbox.chain()), key.public_key()) == head
    db = sqlite3.connect(tmp_path / "outbox.sqlite")
    assert db.execute("SELECT round_id FROM entries WHERE idx = 1").fetchone() == (-1,)
    db.close()


def test_a_deletion_first_then_uploads(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    with Outbox(tmp_path / "outbox.sqlite", key) as outbox:
        outbox.append_forget(forget())
        outbox.append(upload(0))
        outbox.verify()


def test_an_altered_deletion_breaks_verification(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    path = tmp_path / "outbox.sqlite"
    with Outbox(path, key) as outbox:
        outbox.append(upload(0))
        outbox.append_forget(forget())
        outbox.append(upload(1))
        outbox.verify()
    tamper(path, 1)
    with Outbox(path, key) as outbox, pytest.raises(OutboxError, match=r"outbox entry 1.*altered"):
        outbox.verify()
    # Re-sealed by someone without the site's key: the signature gives it away.
    forger = Ed25519PrivateKey.generate()
    with Outbox(tmp_path / "forged.sqlite", forger) as forged:
        forged.append(upload(0))
        forged.append_forget(forget(used=0))
        with pytest.raises(OutboxError, match="signature does not verify"):
            verify_outbox(list(forged.chain()), key.public_key())


def test_outboxes_from_before_deletions_verify_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    with Outbox(path, FIXED_KEY) as outbox:
        for round_id in range(3):
            outbox.append(upload(round_id))
        before = list(outbox.chain())
        # The same bytes, and so the same head, as before deletion records existed.
        assert before[0].body == GOLDEN_BODY_0
        assert outbox.verify() == bytes.fromhex(GOLDEN_HEAD)
        outbox.append_forget(forget())
        after = list(outbox.chain())
        assert after[:3] == before  # a deletion rewrites nothing before it
        # The head an auditor kept from before the deletion is still found.
        assert outbox.verify(expected_head=bytes.fromhex(GOLDEN_HEAD)) == after[3].hash


# ---- `fleetmind client forget` and `fleetmind audit outbox` --------------------------------


def chat(text: str) -> tuple[Message, ...]:
    return (Message("user", text), Message("assistant", "noted"))


@pytest.fixture
def site(tmp_path: Path) -> dict:
    """A site folder with sessions of alice (three, one consolidated and sent in round 0)
    and bob (one), its identity key in identity.pem and an outbox of that round."""
    folder = tmp_path / "site"
    folder.mkdir()
    key = Ed25519PrivateKey.generate()
    with SessionStore(folder) as store:
        for i in range(3):
            store.add(Session(f"a{i}", chat(f"alice's question {i}"), user="alice@example.com"))
        store.add(Session("b0", chat("bob's question"), user="bob"))
        store.record_consolidation("c1", ["a0", "b0"])
    identity = folder / "identity.pem"
    identity.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    identity.chmod(0o600)
    with Outbox(folder / "outbox.sqlite", key) as outbox:
        outbox.append(upload(0, ("a0", "b0")))
    pub = tmp_path / "site.pub"
    pub.write_bytes(key.public_key().public_bytes_raw())
    return {"dir": folder, "key": key, "pub": str(pub)}


def client(capsys, *argv: str) -> tuple[int, dict | None, str]:
    code = cli_main(["forget", *argv, "--json"])
    out, err = capsys.readouterr()
    return code, json.loads(out) if out.strip() else None, err


def test_forget_deletes_and_records(capsys, site: dict) -> None:
    code, result, err = client(capsys, "--user", "alice@example.com", "--store",
                               str(site["dir"]))
    assert code == 0, err
    assert result is not None
    assert result["recorded_in_outbox"] and result["outbox_entry"] == 1
    assert (result["deleted"], result["already_consolidated"]) == (3, 1)
    assert result["session_ids"] == ["a0", "a1", "a2"]
    with SessionStore(site["dir"]) as store:
        assert store.user_sessions("alice@example.com") == []
        assert store.user_sessions("bob") == ["b0"]
    salt = (site["dir"] / FORGET_SALT_FILE).read_bytes()
    with Outbox(site["dir"] / "outbox.sqlite", site["key"]) as outbox:
        outbox.verify()
        [(_, record)] = outbox.deletions()
    assert record.names("alice@example.com", salt) and record.user_hmac == result["user_hmac"]
    assert record.session_ids == ("a0", "a1", "a2") and record.already_consolidated == 1
    assert b"alice" not in (site["dir"] / "outbox.sqlite").read_bytes()

    # A second forget finds nothing: nothing deleted, nothing new recorded.
    code, again, err = client(capsys, "--user", "alice@example.com", "--store",
                              str(site["dir"]))
    assert code == 0 and again is not None
    assert again["deleted"] == 0 and not again["recorded_in_outbox"]
    assert "nothing recorded" in again["reason"]
    with Outbox(site["dir"] / "outbox.sqlite", site["key"]) as outbox:
        assert len(list(outbox.chain())) == 2

    # The auditor sees the deletion, verified in the chain, and the round that sent a0.
    code = fleetmind_main(["audit", "outbox", str(site["dir"]), "--site-key", site["pub"],
                           "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["ok"] and report["verified"] == report["entries"] == 2
    assert [r["round"] for r in report["records"]] == [0]
    [shown] = report["deletions"]
    assert shown["entry"] == 1 and shown["user_hmac"] == record.user_hmac
    assert shown["session_ids"] == ["a0", "a1", "a2"] and shown["already_consolidated"] == 1
    assert shown["sent_in_rounds"] == [0] and shown["salt_sha256"] == record.salt_sha256
    code = fleetmind_main(["audit", "outbox", str(site["dir"]), "--site-key", site["pub"]])
    out = capsys.readouterr().out
    assert code == 0 and "2 of 2 records verified (1 uploads, 1 deletions)" in out
    assert "deletions recorded (fleetmind client forget): 1" in out
    assert record.user_hmac[:12] in out and "a0, a1, a2" in out

    # An edited deletion fails the audit, naming the entry.
    tamper(site["dir"] / "outbox.sqlite", 1)
    code = fleetmind_main(["audit", "outbox", str(site["dir"]), "--site-key", site["pub"]])
    _, err = capsys.readouterr()
    assert code == 1 and "outbox entry 1" in err and "altered" in err


@pytest.mark.parametrize("user", ["", "   "])
def test_an_empty_user_is_refused(capsys, site: dict, user: str) -> None:
    code, result, err = client(capsys, "--user", user, "--store", str(site["dir"]))
    assert code == 2 and result is None and "--user is empty" in err
    with SessionStore(site["dir"]) as store:
        assert len(store.user_sessions("alice@example.com")) == 3


def test_no_deletion_without_the_outbox_s_own_key(capsys, site: dict, tmp_path: Path) -> None:
    (site["dir"] / "identity.pem").unlink()
    code, _, err = client(capsys, "--user", "bob", "--store", str(site["dir"]))
    assert code == 2 and "pass --identity-key" in err and "nothing was deleted" in err
    other = tmp_path / "other.pem"
    other.write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    other.chmod(0o600)
    code, _, err = client(capsys, "--user", "bob", "--store", str(site["dir"]),
                          "--identity-key", str(other))
    assert code == 2 and "did not sign" in err
    with SessionStore(site["dir"]) as store:
        assert store.user_sessions("bob") == ["b0"]


def test_a_site_that_never_sent_deletes_and_says_it_recorded_nothing(capsys,
                                                                      tmp_path: Path) -> None:
    with SessionStore(tmp_path) as store:
        store.add(Session("x", chat("hi"), user="carol"))
    code, result, _ = client(capsys, "--user", "carol", "--store", str(tmp_path))
    assert code == 0 and result is not None
    assert result["deleted"] == 1 and not result["recorded_in_outbox"]
    assert "nothing has left this site" in result["reason"]
    assert not (tmp_path / "outbox.sqlite").exists()
