"""The site loop over real loopback gRPC: three sites, each with its own world sessions, run
one `run_once` each against the aggregator; the round publishes version 1, every site
verifies and activates it, each outbox holds one verified record and the store marks the
sessions consumed. Plus the config's and the identity key's validation at the edges."""

from __future__ import annotations

import json
import logging
import random
import stat
import threading
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from support.concurrent import each_returned, run_once_each, stocked
from support.sessions import chat
from support.toy_fleet import FAST, toy_server_config

from fleetmind.aggregation.records import verify_outbox
from fleetmind.client.identity import load_identity_key
from fleetmind.client.outbox import Outbox
from fleetmind.client.site import Backoff, Outcome, run, run_once
from fleetmind.client.site_config import ConfigError, SiteConfig
from fleetmind.client.store import SessionStore
from fleetmind.client.versions import current_version
from fleetmind.runtime.layout import verify_folder
from fleetmind.server.config import ServerConfig
from fleetmind.sim.world import WorldSpec, make_world, task_prompt


@pytest.fixture
def aggregator_config(tmp_path: Path) -> ServerConfig:
    """The config the shared `aggregator` fixture serves."""
    return toy_server_config(tmp_path / "aggregator")


def site_config(tmp_path: Path, site: str, model: Path, address: str, key: bytes,
                **changes) -> SiteConfig:
    values = dict(name=site, data_dir=tmp_path / site, model_dir=model,
                  aggregator=address, identity_key=tmp_path / site / "identity.pem",
                  aggregator_key=key, min_new_sessions=4, distill=FAST, insecure=True,
                  round_timeout_s=60.0)
    values.update(changes)
    return SiteConfig(**values)


def test_three_sites_run_once_publish_and_activate(aggregator, tmp_path, toy_model_dir) -> None:
    world = make_world(WorldSpec(seed=0, sites=3))
    guard = tmp_path / "guard.jsonl"
    guard.write_text("".join(json.dumps({"messages": task_prompt(task)}) + "\n"
                             for task in world.guard[:16]))
    key = aggregator.coordinator.registry.public_key.public_bytes_raw()
    configs = [site_config(tmp_path, f"site-{i}", toy_model_dir, aggregator.address, key,
                           guard_prompts=guard) for i in range(3)]
    stored = stocked(configs, world.sites)
    outcomes = each_returned(run_once_each(aggregator.address, configs), Outcome)

    for config, ids, outcome in zip(configs, stored, outcomes, strict=True):
        assert outcome.activated == (0, 1)  # genesis, then what the round published
        assert outcome.round is not None
        assert (outcome.round.version, outcome.round.cohort_size) == (1, 3)
        assert outcome.round.round_config.plain_sum \
            is not aggregator.coordinator.cohort_policy.secure_aggregation
        assert current_version(config.data_dir) == 1
        assert verify_folder(config.data_dir / "current", key).version == 1
        identity = load_identity_key(config.identity_key, create=False)
        with Outbox(config.data_dir / "outbox.sqlite", identity) as outbox:
            entries = list(outbox)
            assert len(entries) == 1
            verify_outbox(entries, identity.public_key())
            record = entries[0].record
            assert record.payload_sha256 == outcome.round.payload_sha256
            assert record.session_ids == ids
            assert record.base_version == 0
            # Each session clipped to the round's C (the default unit), then summed.
            assert (record.privacy_unit, record.clip_norm) == ("session", 1.0)
            assert record.norm_after_clip <= len(ids) * 1.0 + 1e-5
        with SessionStore(config.data_dir) as store:
            assert store.unconsumed() == []
            assert tuple(store.sessions_used_by(outcome.consolidation_id)) == ids

    # A second iteration has nothing new: it neither consolidates nor activates.
    channel = grpc.insecure_channel(aggregator.address)
    try:
        again = run_once(configs[0], channel)
    finally:
        channel.close()
    assert again == Outcome(activated=(), pending=0)


def test_a_site_on_loopback_allows_a_plain_sum_round_unasked(aggregator, tmp_path,
                                                            toy_model_dir,
                                                            monkeypatch) -> None:
    """A plain-sum round (the ablation without secure aggregation) runs end to end once, in
    tests/integration/test_plain_sum.py; what the site loop adds is the permission: run_once
    lets `participate` send unmasked to an aggregator on this machine."""
    from types import SimpleNamespace

    from fleetmind.client import site as site_module

    class AskedError(Exception):
        pass

    def participate(channel, identity, name, update, outbox, **kwargs):
        raise AskedError(kwargs["allow_plain_sum"])

    def consolidate(config, sessions, base_version, earlier):
        return SimpleNamespace(consolidation_id="c", stats=SimpleNamespace(tokens=0)), None

    monkeypatch.setattr(site_module, "participate", participate)
    monkeypatch.setattr(site_module, "consolidate", consolidate)
    key = aggregator.coordinator.registry.public_key.public_bytes_raw()
    config = site_config(tmp_path, "near", toy_model_dir, aggregator.address, key,
                         min_new_sessions=1)
    config.data_dir.mkdir()
    with SessionStore(config.data_dir) as store:
        store.add(chat(0))
    with grpc.insecure_channel(aggregator.address) as channel, \
            pytest.raises(AskedError) as asked:
        run_once(config, channel)
    assert asked.value.args == (True,)
    with SessionStore(config.data_dir) as store:  # the round never ran: nothing consumed
        assert [s.id for s in store.unconsumed()] == ["s00000"]


def test_below_the_threshold_only_activates(aggregator, tmp_path, toy_model_dir) -> None:
    key = aggregator.coordinator.registry.public_key.public_bytes_raw()
    config = site_config(tmp_path, "lonely", toy_model_dir, aggregator.address, key,
                         min_new_sessions=100)
    channel = grpc.insecure_channel(aggregator.address)
    try:
        outcome = run_once(config, channel)
    finally:
        channel.close()
    assert outcome == Outcome(activated=(0,), pending=0)
    assert current_version(config.data_dir) == 0
    assert not (config.data_dir / "outbox.sqlite").exists()


def test_the_identity_key_is_created_private_once(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "identity.pem"
    first = load_identity_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = load_identity_key(path)
    assert first.public_key().public_bytes_raw() == again.public_key().public_bytes_raw()
    raw = tmp_path / "raw.key"
    raw.write_bytes(Ed25519PrivateKey.generate().private_bytes_raw())
    raw.chmod(0o600)
    load_identity_key(raw)
    raw.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_identity_key(raw)
    with pytest.raises(ConfigError, match="does not exist"):
        load_identity_key(tmp_path / "absent.pem", create=False)


def test_config_loads_from_toml_and_json(tmp_path: Path, toy_model_dir, monkeypatch) -> None:
    key = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    (tmp_path / "aggregator.pub").write_text(key.hex() + "\n")
    (tmp_path / "site.toml").write_text(
        f'name = "a"\ndata_dir = "data"\nmodel_dir = "{toy_model_dir}"\n'
        'aggregator = "127.0.0.1:7443"\nidentity_key = "id.pem"\n'
        'aggregator_key = "aggregator.pub"\ninsecure = true\nmin_new_sessions = 3\n'
        '[distill]\nsteps = 5\ndreams_per_lesson = 2\n')
    config = SiteConfig.load(tmp_path / "site.toml")
    assert config.data_dir == tmp_path / "data"
    assert config.aggregator_public_key() == key
    assert (config.distill.steps, config.distill.dreams_per_lesson) == (5, 2)
    (tmp_path / "site.json").write_text(json.dumps({
        "name": "a", "data_dir": "data", "model_dir": str(toy_model_dir),
        "aggregator": "[::1]:7443", "identity_key": "id.pem",
        "aggregator_key": "aggregator.pub", "insecure": True}))
    assert SiteConfig.load(tmp_path / "site.json").min_new_sessions == 8
    # The environment wins over the file, typed as the setting is, tables included.
    monkeypatch.setenv("FLEETMIND_MIN_NEW_SESSIONS", "5")
    monkeypatch.setenv("FLEETMIND_NAME", "007")
    monkeypatch.setenv("FLEETMIND_DISTILL__STEPS", "9")
    config = SiteConfig.load(tmp_path / "site.toml")
    assert (config.min_new_sessions, config.name, config.distill.steps) == (5, "007", 9)
    assert config.distill.dreams_per_lesson == 2  # the rest of the table is the file's
    monkeypatch.setenv("FLEETMIND_AGGREGATOR", "agg.example:7443")
    with pytest.raises(ConfigError, match="plaintext refused"):
        SiteConfig.load(tmp_path / "site.json")


@pytest.mark.parametrize("change, message", [
    ({"aggregator": "agg.example:7443"}, "plaintext refused"),
    ({"insecure": False}, "no tls"),
    ({"aggregator": "127.0.0.1"}, "must be host:port"),
    ({"min_new_sessions": 0}, "min_new_sessions"),
    ({"clip_norm": float("nan")}, "clip_norm"),
    ({"name": ""}, "name"),
    ({"aggregator_key": b"short"}, "Ed25519 public key"),
    ({"model_dir": Path("/nonexistent")}, "config.json"),
    ({"guard_prompts": Path("/nonexistent.jsonl")}, "guard_prompts"),
    ({"privacy_unit": "household"}, "privacy_unit"),
])
def test_bad_configs_are_refused(tmp_path: Path, toy_model_dir, change, message) -> None:
    key = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    with pytest.raises(ConfigError, match=message):
        site_config(tmp_path, "a", toy_model_dir, "127.0.0.1:7443", key, **change)


def test_unknown_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown setting"):
        SiteConfig.from_mapping({"name": "a", "colour": "blue"})
    # The setting privacy_unit replaced says what to write instead.
    with pytest.raises(ConfigError, match='write privacy_unit = "session"'):
        SiteConfig.from_mapping({"name": "a", "per_session": True})


def test_run_backs_off_and_logs_while_the_aggregator_is_away(tmp_path, toy_model_dir,
                                                              caplog) -> None:
    key = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    config = site_config(tmp_path, "away", toy_model_dir, "127.0.0.1:1", key)
    stop = threading.Event()
    retries: list[str] = []

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "retry" in record.getMessage():
                retries.append(record.getMessage())
                if len(retries) == 3:
                    stop.set()

    watch = Watch()
    logging.getLogger("fleetmind.client.site").addHandler(watch)
    try:
        worker = threading.Thread(target=run, args=(config, stop),
                                  kwargs={"backoff": Backoff(first_s=0.01, cap_s=0.05)})
        worker.start()
        worker.join(30)
    finally:
        logging.getLogger("fleetmind.client.site").removeHandler(watch)
    assert not worker.is_alive()
    assert [m.split(" in ")[0] for m in retries] == [f"away: retry {n}" for n in (1, 2, 3)]
    assert "UNAVAILABLE" in retries[0]
    assert Backoff(first_s=1, cap_s=8).delay(10, random.Random(0)) <= 8


def test_cli_runs_one_iteration_and_refuses_bad_configs(aggregator, tmp_path, toy_model_dir,
                                                        capsys) -> None:
    from fleetmind.cli import main as cli

    key = aggregator.coordinator.registry.public_key.public_bytes_raw()
    (tmp_path / "aggregator.pub").write_bytes(key)
    config = {"name": "cli-site", "data_dir": "data", "model_dir": str(toy_model_dir),
              "aggregator": aggregator.address, "identity_key": "id.pem",
              "aggregator_key": "aggregator.pub", "insecure": True, "min_new_sessions": 5}
    (tmp_path / "site.json").write_text(json.dumps(config))
    assert cli.main(["client", "run", "--config", str(tmp_path / "site.json"), "--once"]) == 0
    assert "cli-site: activated [0], 0 unconsumed sessions, no round joined" in \
        capsys.readouterr().out
    assert current_version(tmp_path / "data") == 0
    (tmp_path / "bad.json").write_text(json.dumps({**config, "aggregator": "agg.example:1"}))
    assert cli.main(["client", "run", "--config", str(tmp_path / "bad.json")]) == 2
    assert "plaintext refused" in capsys.readouterr().err


def test_per_session_updates_are_clipped_per_session(tmp_path, toy_model_dir) -> None:
    from types import SimpleNamespace

    import numpy as np

    from fleetmind.aggregation.update import Update, UpdateMetadata
    from fleetmind.client.contribution import site_update
    from fleetmind.client.scrub import ScrubReport
    from fleetmind.client.store import Session

    key = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    config = site_config(tmp_path, "dp", toy_model_dir, "127.0.0.1:7443", key,
                         privacy_unit="session", clip_norm=1.0)
    deltas = {"s1": {"m": np.full((2, 2), 3.0, np.float32)},   # norm 6: clipped to 1
              "s2": {"m": np.full((2, 2), 0.1, np.float32)}}   # norm 0.2: kept
    result = SimpleNamespace(
        update=Update({"m": np.zeros((2, 2), np.float32)}, UpdateMetadata(
            site="dp", base_version=2, sessions=2, tokens=1, seed=7)),
        session_updates=tuple(deltas.items()), scrubbed=ScrubReport())
    sessions = [Session.from_dict({"id": sid, "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
        for sid in deltas]
    update = site_update(config, result, sessions, base_version=2, latest_version=5)
    want = deltas["s1"]["m"] / 6.0 + deltas["s2"]["m"]
    np.testing.assert_allclose(update.delta["m"], want, rtol=1e-6)
    assert update.contributing_units == 2
    assert update.weight == pytest.approx(0.5)  # staleness 3: 1 / sqrt(4)
    assert update.norm_before_clip == pytest.approx(6.2, rel=1e-6)
    assert update.session_ids == ("s1", "s2")


def test_a_users_sessions_are_clipped_together(tmp_path, toy_model_dir, caplog) -> None:
    from types import SimpleNamespace

    import numpy as np

    from fleetmind.aggregation.update import Update, UpdateMetadata
    from fleetmind.client.contribution import site_update
    from fleetmind.client.scrub import ScrubReport
    from fleetmind.client.store import Session

    key = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    config = site_config(tmp_path, "dp", toy_model_dir, "127.0.0.1:7443", key,
                         privacy_unit="user", clip_norm=1.0)
    deltas = {"s1": {"m": np.full((2, 2), 1.0, np.float32)},   # alice: with s2, norm 4
              "s2": {"m": np.full((2, 2), 1.0, np.float32)},
              "s3": {"m": np.full((2, 2), 0.1, np.float32)}}   # no user id: its own unit
    users = {"s1": "alice", "s2": "alice", "s3": None}
    result = SimpleNamespace(
        update=Update({"m": np.zeros((2, 2), np.float32)}, UpdateMetadata(
            site="dp", base_version=0, sessions=3, tokens=1, seed=7)),
        session_updates=tuple(deltas.items()), scrubbed=ScrubReport())
    sessions = [Session.from_dict({"id": sid, **({"user": users[sid]} if users[sid] else {}),
                                   "messages": [{"role": "user", "content": "hi"},
                                                {"role": "assistant", "content": "hello"}]})
                for sid in deltas]
    update = site_update(config, result, sessions, base_version=0, latest_version=0)
    # Clipped per session, alice would count twice: 2 x 1.0 + 0.2.
    want = (deltas["s1"]["m"] + deltas["s2"]["m"]) / 4.0 + deltas["s3"]["m"]
    np.testing.assert_allclose(update.delta["m"], want, rtol=1e-6)
    assert (update.contributing_units, update.privacy_unit, update.clip_norm) == (2, "user", 1.0)
    assert "1 of 3 sessions have no user id" in caplog.text



def test_a_site_config_with_a_serve_table_still_loads(tmp_path: Path, toy_model_dir) -> None:
    # `client serve` reads [serve] from the same SITE.toml that `client run` loads.
    key = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    (tmp_path / "aggregator.pub").write_text(key.hex() + "\n")
    config = tmp_path / "site.toml"
    config.write_text(
        f'name = "s"\ndata_dir = "data"\nmodel_dir = "{toy_model_dir}"\n'
        'aggregator = "127.0.0.1:7443"\nidentity_key = "id.pem"\n'
        'aggregator_key = "aggregator.pub"\ninsecure = true\n'
        '[serve]\nlisten = "127.0.0.1:0"\n')
    assert SiteConfig.load(config).name == "s"
    config.write_text(config.read_text().replace("[serve]", "[served]"))
    with pytest.raises(ConfigError, match="served"):
        SiteConfig.load(config)
