"""Any model, wired through: the aggregator's adapter from a model folder (`fleetmind server
adapter`, a config's adapter_file), the dev aggregator's default that fits the committed toy
model, and sites that refuse a version made for another base model."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from support.concurrent import each_returned, run_once_each, stocked
from support.toy_fleet import FAST

from fleetmind.aggregation.manifest import VersionError
from fleetmind.cli import main as cli
from fleetmind.client.adapter_spec import adapter_spec
from fleetmind.client.site import Outcome, run_once
from fleetmind.client.site_config import SiteConfig
from fleetmind.client.versions import current_version
from fleetmind.server import cli as server_cli
from fleetmind.server.config import (
    DEV_ADAPTER,
    CohortPolicy,
    ConfigError,
    ServerConfig,
    load_config,
)
from fleetmind.server.service import serve
from fleetmind.server.versions import AdapterSpec, TargetModule
from fleetmind.sim.world import WorldSpec, make_world


def as_spec(table: dict) -> AdapterSpec:
    values = {k: v for k, v in table.items() if k != "modules"}
    return AdapterSpec(modules=tuple(TargetModule(**m) for m in table["modules"]), **values)


def test_the_dev_adapter_is_the_toy_models(toy_model_dir) -> None:
    """server/ cannot read the model (no torch): its hard-coded default must be what the
    client reads from the committed toy model with `server adapter`'s defaults."""
    assert as_spec(adapter_spec(toy_model_dir)) == DEV_ADAPTER


def write_config(folder: Path, **keys: str) -> Path:
    lines = ['data_dir = "data"', "insecure = true", *(f"{k} = {v}" for k, v in keys.items())]
    path = folder / "aggregator.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_server_adapter_writes_what_server_run_accepts(tmp_path, toy_model_dir, capsys) -> None:
    out = tmp_path / "conf" / "adapter.toml"
    assert cli.main(["server", "adapter", "--model", str(toy_model_dir), "--out", str(out)]) == 0
    config = load_config(write_config(tmp_path / "conf", adapter_file='"adapter.toml"'))
    assert config.adapter == DEV_ADAPTER  # relative to the config file, the toy's defaults

    custom = tmp_path / "custom.json"
    assert cli.main(["server", "adapter", "--model", str(toy_model_dir), "--out", str(custom),
                     "--rank", "4", "--alpha", "8", "--seed", "3", "--targets", "gate_proj",
                     "--base-model-id", "toy-llama"]) == 0
    config = load_config(write_config(tmp_path, adapter_file=json.dumps(str(custom))))
    assert (config.adapter.rank, config.adapter.alpha, config.adapter.frozen_a_seed,
            config.adapter.base_model_id) == (4, 8.0, 3, "toy-llama")
    assert [m.name for m in config.adapter.modules] == [
        "model.layers.0.mlp.gate_proj", "model.layers.1.mlp.gate_proj"]
    assert config.adapter.base_model_sha256 == DEV_ADAPTER.base_model_sha256


def test_server_adapter_without_the_client_extra_says_what_to_install(
        tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(server_cli, "CLIENT_EXTRA", ("torch", "no_such_module_for_fleetmind"))
    assert cli.main(["server", "adapter", "--model", str(tmp_path), "--out",
                     str(tmp_path / "a.toml")]) == 2
    error = capsys.readouterr().err
    assert "needs the client extra: pip install 'fleetmind[client]'" in error
    assert not (tmp_path / "a.toml").exists()


def test_server_adapter_reports_a_bad_model_folder(tmp_path, capsys) -> None:
    assert cli.main(["server", "adapter", "--model", str(tmp_path / "none"), "--out",
                     str(tmp_path / "a.toml")]) == 2
    assert "config.json" in capsys.readouterr().err


def test_adapter_file_errors_are_clear(tmp_path) -> None:
    table = "{base_model_id = \"m\", base_model_sha256 = \"" + "ab" * 32 + "\", " \
            "frozen_a_seed = 0, fan_in_fan_out = true, modules = [{name = \"h.0.mlp.c_fc\", " \
            "in_features = 8, out_features = 32}]}"
    config = load_config(write_config(tmp_path, adapter=table))
    assert config.adapter.fan_in_fan_out is True  # [adapter] carries Conv1D's flag
    assert config.adapter.adapter_config()["fan_in_fan_out"] is True
    with pytest.raises(ConfigError, match="both \\[adapter\\] and adapter_file"):
        load_config(write_config(tmp_path, adapter=table, adapter_file='"adapter.toml"'))
    with pytest.raises(ConfigError, match=r"adapter_file='missing\.toml': cannot read"):
        load_config(write_config(tmp_path, adapter_file='"missing.toml"'))
    (tmp_path / "empty.toml").write_text("rank = 8\n")
    with pytest.raises(ConfigError, match="has no \\[adapter\\] table"):
        load_config(write_config(tmp_path, adapter_file='"empty.toml"'))
    (tmp_path / "bad.toml").write_text("[adapter]\nrank = 8\nshape = 3\n")
    with pytest.raises(ConfigError, match="unknown keys \\['shape'\\]"):
        load_config(write_config(tmp_path, adapter_file='"bad.toml"'))
    with pytest.raises(ConfigError, match="must be a path"):
        load_config(write_config(tmp_path, adapter_file="3"))
    # Neither: the dev default.
    assert load_config(write_config(tmp_path)).adapter == DEV_ADAPTER


def site_config(tmp_path: Path, name: str, model: Path, address: str, key: bytes) -> SiteConfig:
    return SiteConfig(name=name, data_dir=tmp_path / name, model_dir=model,
                      aggregator=address, identity_key=tmp_path / name / "identity.pem",
                      aggregator_key=key, min_new_sessions=4, distill=FAST, insecure=True,
                      round_timeout_s=60.0)


def test_the_dev_aggregator_and_sites_on_the_toy_model_complete_a_round(
        tmp_path, toy_model_dir) -> None:
    """`fleetmind server run --insecure --data DIR`'s config (a cohort of exactly three, so
    the test waits for no deadline): genesis fits the toy model, and a round completes."""
    config = ServerConfig(data_dir=tmp_path / "aggregator", listen="127.0.0.1:0",
                          insecure=True)
    assert config.adapter == DEV_ADAPTER
    running = serve(replace(config, cohort=CohortPolicy(min_size=3, target_size=3,
                                                        deadline_s=120)))
    try:
        key = running.coordinator.registry.public_key.public_bytes_raw()
        world = make_world(WorldSpec(seed=0, sites=3))
        configs = [site_config(tmp_path, f"site-{i}", toy_model_dir, running.address, key)
                   for i in range(3)]
        stocked(configs, world.sites)
        outcomes = each_returned(run_once_each(running.address, configs), Outcome)
        for i, outcome in enumerate(outcomes):
            assert outcome.activated == (0, 1) and outcome.round is not None
            assert current_version(configs[i].data_dir) == 1
    finally:
        running.stop(grace=None)


def test_a_site_on_another_model_refuses_the_version_and_activates_nothing(
        tmp_path, toy_model_dir, caplog) -> None:
    other = tmp_path / "other-model"
    other.mkdir()
    shutil.copy(toy_model_dir / "config.json", other / "config.json")
    (other / "model.safetensors").write_bytes(b"other weights")
    running = serve(ServerConfig(data_dir=tmp_path / "aggregator", listen="127.0.0.1:0",
                                 insecure=True))
    channel = grpc.insecure_channel(running.address)
    try:
        key = running.coordinator.registry.public_key.public_bytes_raw()
        config = site_config(tmp_path, "site", other, running.address, key)
        with pytest.raises(VersionError, match="is for base model 'toy_model'"):
            run_once(config, channel)
        assert current_version(config.data_dir) is None
        assert "refused version 0" in caplog.text
    finally:
        channel.close()
        running.stop(grace=None)
