"""The shared floor (fleetmind.runtime): durable files, the signed log, config loading,
addresses, keys and TLS files, each tested where it could fail, in this process (the metrics
endpoint and a killed writer are in integration/)."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleetmind.aggregation.chain import GENESIS_HASH, ChainError
from fleetmind.runtime import addresses, config, durable, keys, signed_log

# ---- durable ----------------------------------------------------------------------------


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    durable.atomic_write(target, b"old")
    durable.atomic_write(target, b"new", mode=0o600)
    assert target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_crash_mid_write_leaves_the_old_file(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "state.json"
    durable.atomic_write(target, b"old")

    def power_cut(*args: object) -> None:
        raise OSError("the machine died before the rename")

    monkeypatch.setattr(os, "replace", power_cut)
    with pytest.raises(OSError, match="died"):
        durable.atomic_write(target, b"new" * 1000)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # partial removed


def test_atomic_write_without_replace_refuses_an_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "key.pem"
    durable.atomic_write(target, b"first", 0o600, replace=False)
    with pytest.raises(FileExistsError):
        durable.atomic_write(target, b"second", 0o600, replace=False)
    assert target.read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key.pem"]


def test_write_synced_never_widens_the_mode(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        durable.write_synced(tmp_path / "secret", b"x", 0o600)
    finally:
        os.umask(old)
    assert (tmp_path / "secret").stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        durable.write_synced(tmp_path / "secret", b"y", 0o600)


def test_the_server_and_the_manifest_use_the_one_implementation() -> None:
    from fleetmind.aggregation import manifest
    from fleetmind.client import versions as site_versions
    from fleetmind.server import coordinator, versions

    assert coordinator.atomic_write is durable.atomic_write
    assert versions.write_folder is site_versions.write_folder is durable.write_folder
    assert coordinator.canonical_json is versions.canonical_json is signed_log.canonical_json \
        is manifest.canonical_json
    assert signed_log.canonical_json({"b": 1, "a": [1.5, "é"]}) == b'{"a":[1.5,"\\u00e9"],"b":1}'
    with pytest.raises(ValueError):
        signed_log.canonical_json({"x": float("nan")})


def test_a_folder_is_written_whole_or_not_at_all(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "00000001"
    durable.write_folder(target, {"a": b"1", "b": b"22"}, tmp_path / ".partial-1")
    assert {p.name: p.read_bytes() for p in target.iterdir()} == {"a": b"1", "b": b"22"}
    assert not (tmp_path / ".partial-1").exists()
    with pytest.raises(OSError):  # a second writer of the same folder loses
        durable.write_folder(target, {"a": b"other"}, tmp_path / ".partial-2")
    assert (target / "a").read_bytes() == b"1" and not (tmp_path / ".partial-2").exists()

    def fail(path: Path, data: bytes, mode: int = 0o644) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(durable, "write_synced", fail)
    with pytest.raises(OSError, match="disk full"):
        durable.write_folder(tmp_path / "00000002", {"a": b"1"}, tmp_path / ".partial-3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000001"]


# ---- signed log -------------------------------------------------------------------------

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    idx INTEGER PRIMARY KEY, round_id INTEGER NOT NULL, prev_hash BLOB NOT NULL,
    body BLOB NOT NULL, hash BLOB NOT NULL, signature BLOB NOT NULL);
CREATE TRIGGER IF NOT EXISTS entries_never_updated BEFORE UPDATE ON entries
BEGIN SELECT RAISE(ABORT, 'append-only'); END;
"""


class Notes(signed_log.SignedLog):
    DOMAIN = b"fleetmind/test-notes/v1"
    SCHEMA = SCHEMA

    def add(self, round_id: int, text: str):
        def admit(head) -> None:
            if text == "refuse":
                raise ChainError(None, "refused")

        return self._append(round_id, signed_log.canonical_json({"text": text}), admit)


def test_signed_log_appends_pages_and_reads_back_read_only(tmp_path: Path, monkeypatch) -> None:
    from fleetmind.aggregation import chain

    monkeypatch.setattr(signed_log, "_PAGE", 3)  # several pages
    key = Ed25519PrivateKey.generate()
    with Notes(tmp_path / "notes.sqlite", key) as log:
        assert log.head() is None
        written = [log.add(i // 2, f"note {i}") for i in range(7)]
        with pytest.raises(ChainError, match="refused"):
            log.add(9, "refuse")
        assert list(log) == written
        assert list(log.entries(5)) == written[5:]
        assert log.head() == written[-1]
        assert log._for_round(1) == written[2:4]
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            log._db.execute("UPDATE entries SET body = x'00'")
    read = signed_log.read_log(tmp_path / "notes.sqlite")
    assert [e.hash for e in read] == [e.hash for e in written]
    assert chain.verify_chain(read, key.public_key(), domain=Notes.DOMAIN) == written[-1].hash
    assert chain.verify_chain([], key.public_key(), domain=Notes.DOMAIN) == GENESIS_HASH


def test_read_log_refuses_what_is_not_a_log(tmp_path: Path) -> None:
    with pytest.raises(signed_log.LogError, match="no such file"):
        signed_log.read_log(tmp_path / "absent.sqlite")
    (tmp_path / "text.sqlite").write_text("hello")
    with pytest.raises(signed_log.LogError, match="not a fleetmind ledger or outbox"):
        signed_log.read_log(tmp_path / "text.sqlite")
    sqlite3.connect(tmp_path / "other.sqlite").execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(signed_log.LogError, match="not a fleetmind ledger or outbox"):
        signed_log.read_log(tmp_path / "other.sqlite")
    assert not (tmp_path / "absent.sqlite").exists()  # reading never creates


def test_ledger_and_outbox_files_keep_their_schema(tmp_path: Path) -> None:
    # Existing files must open and verify unchanged: the tables and triggers are the same.
    from fleetmind.client.outbox import Outbox
    from fleetmind.server.ledger import Ledger

    key = Ed25519PrivateKey.generate()
    for cls, name, unique in ((Ledger, "ledger", " UNIQUE"), (Outbox, "outbox", "")):
        cls(tmp_path / f"{name}.sqlite", key).close()
        db = sqlite3.connect(tmp_path / f"{name}.sqlite")
        sql = dict(db.execute("SELECT name, sql FROM sqlite_master").fetchall())
        db.close()
        assert f"round_id INTEGER NOT NULL{unique}," in sql["entries"]
        assert f"'the {name} is append-only: entries are never deleted'" \
            in sql["entries_never_deleted"]


# ---- config -----------------------------------------------------------------------------


def test_toml_and_json_read_alike_and_other_endings_are_refused(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text('name = "a"\nport = 7\n[tls]\nkey = "k"\n')
    (tmp_path / "a.json").write_text(json.dumps({"name": "a", "port": 7, "tls": {"key": "k"}}))
    assert config.read_document(tmp_path / "a.toml") == config.read_document(tmp_path / "a.json")
    (tmp_path / "a.yaml").write_text("name: a\n")
    with pytest.raises(config.ConfigError, match=r"\.toml or \.json"):
        config.read_document(tmp_path / "a.yaml")
    (tmp_path / "bad.toml").write_text("name = \n")
    with pytest.raises(config.ConfigError, match="not valid TOML"):
        config.read_document(tmp_path / "bad.toml")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(config.ConfigError, match="top level must be a table"):
        config.read_document(tmp_path / "list.json")
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.read_document(tmp_path / "absent.toml")


def test_the_environment_overrides_the_file(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text('name = "file"\nsize = 3\n[privacy]\nclip = 1.0\n')
    environ = {"FLEETMIND_NAME": "123", "FLEETMIND_SIZE": "8", "FLEETMIND_ON": "true",
               "FLEETMIND_PRIVACY__CLIP": "0.5", "FLEETMIND_CACHE": "/elsewhere",
               "FLEETMIND_LISTEN": "127.0.0.1:7443"}
    raw = config.load_document(tmp_path / "c.toml",
                               {"name": "str", "size": "int", "on": "bool",
                                "listen": "str | None", "privacy": "PrivacyPolicy"},
                               {"privacy": {"clip": "float"}}, environ)
    # Text for str settings (even when it looks like a number); typed values otherwise;
    # variables for settings nobody declared (FLEETMIND_CACHE) are not read.
    assert raw == {"name": "123", "size": 8, "on": True, "listen": "127.0.0.1:7443",
                   "privacy": {"clip": 0.5}}
    assert config.load_document(tmp_path / "c.toml", {"size": "int"}, environ={}) == \
        {"name": "file", "size": 3, "privacy": {"clip": 1.0}}


def test_both_sides_raise_the_one_config_error_and_read_the_environment(
        tmp_path: Path, monkeypatch) -> None:
    from fleetmind.client import site_config
    from fleetmind.server import config as server_config

    assert site_config.ConfigError is server_config.ConfigError is config.ConfigError
    (tmp_path / "aggregator.toml").write_text('data_dir = "data"\ninsecure = true\n'
                                              '[privacy]\nclip_norm = 1.0\n')
    monkeypatch.setenv("FLEETMIND_PRIVACY__CLIP_NORM", "0.25")
    monkeypatch.setenv("FLEETMIND_LISTEN", "127.0.0.1:7555")
    loaded = server_config.load_config(tmp_path / "aggregator.toml")
    assert (loaded.privacy.clip_norm, loaded.listen) == (0.25, "127.0.0.1:7555")
    monkeypatch.setenv("FLEETMIND_LISTEN", "10.0.0.1:7555")  # insecure off loopback
    with pytest.raises(config.ConfigError, match="plaintext refused"):
        server_config.load_config(tmp_path / "aggregator.toml")


# ---- addresses --------------------------------------------------------------------------


@pytest.mark.parametrize("address, expected", [
    ("agg.example:7443", ("agg.example", 7443)),
    ("127.0.0.1:0", ("127.0.0.1", 0)),
    ("[::1]:7443", ("::1", 7443)),
    ("[2001:db8::1]:65535", ("2001:db8::1", 65535)),
])
def test_addresses_parse(address: str, expected: tuple[str, int]) -> None:
    assert addresses.split_host_port(address) == expected
    assert addresses.split_host_port(addresses.join_host_port(*expected)) == expected


@pytest.mark.parametrize("address", ["7443", "agg.example", ":7443", "[]:7443", "host:port",
                                     "host:70000", "host:-1", "host:7443 ", "host:²", "",
                                     7443, None])
def test_bad_addresses_are_refused_naming_the_setting(address: object) -> None:
    with pytest.raises(config.ConfigError, match=r"aggregator=.* must be .*host:port"):
        addresses.split_host_port(address, "aggregator")


def test_a_dialled_address_needs_a_real_port() -> None:
    assert addresses.split_host_port("127.0.0.1:0", "listen") == ("127.0.0.1", 0)
    with pytest.raises(config.ConfigError, match=r"aggregator='127\.0\.0\.1:0'"):
        addresses.split_host_port("127.0.0.1:0", "aggregator", any_port=False)


def test_loopback() -> None:
    assert all(map(addresses.is_loopback, ("localhost", "127.0.0.1", "127.8.0.1", "::1")))
    assert not any(map(addresses.is_loopback, ("0.0.0.0", "10.0.0.1", "agg.example", "::",
                                                "localhost.evil.example")))


# ---- keys -------------------------------------------------------------------------------


def test_a_public_key_reads_raw_hex_and_pem_alike() -> None:
    private = Ed25519PrivateKey.generate()
    raw = private.public_key().public_bytes_raw()
    pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    private_pem = private.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
    for form in (raw, raw.hex().encode(), b"  " + raw.hex().upper().encode() + b"\n", pem):
        assert keys.public_key_bytes(form, "k") == raw
    with pytest.raises(config.ConfigError, match="k holds a private key"):
        keys.public_key_bytes(private_pem, "k")  # a private key only where it is asked for
    assert keys.public_key_bytes(private_pem, "k", private_ok=True) == raw
    assert keys.private_key_from_bytes(private_pem, "k").public_key().public_bytes_raw() == raw


@pytest.mark.parametrize("content, message", [
    (b"\x01" * 31, "not an Ed25519 public key"),
    (b"zz" * 32, "not an Ed25519 public key"),
    (b"-----BEGIN PUBLIC KEY-----\nxx\n-----END PUBLIC KEY-----\n", "unreadable PEM"),
])
def test_bad_public_keys_are_refused_naming_the_source(content: bytes, message: str) -> None:
    with pytest.raises(config.ConfigError, match=f"^agg.pub: {message}"):
        keys.public_key_bytes(content, "agg.pub")


def test_key_files_that_cannot_be_read_are_named(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match=r"aggregator key .*absent: no such file"):
        keys.read_key_file(tmp_path / "absent", "aggregator key")
    with pytest.raises(config.ConfigError, match="is a folder"):
        keys.read_key_file(tmp_path, "aggregator key")
    with pytest.raises(config.ConfigError, match="not a raw or unencrypted PEM"):
        keys.private_key_from_bytes(b"not a key", "identity key x")


# ---- tls --------------------------------------------------------------------------------


def test_tls_files_read_in_grpc_order_and_name_what_is_missing(tmp_path: Path) -> None:
    from fleetmind.runtime.tls import TlsFiles

    for name in ("ca.crt", "site.crt", "site.key"):
        (tmp_path / name).write_bytes(name.encode())
    tls = TlsFiles(tmp_path / "ca.crt", tmp_path / "site.crt", tmp_path / "site.key")
    assert tls.read() == (b"ca.crt", b"site.key", b"site.crt")
    missing = TlsFiles(tmp_path / "ca.crt", tmp_path / "absent.crt", tmp_path / "absent.key")
    with pytest.raises(config.ConfigError, match=r"^tls\.certificate .*absent\.crt: No such"):
        missing.read()
    with pytest.raises(config.ConfigError, match=r"^--cert "):
        missing.read({"certificate": "--cert"})
