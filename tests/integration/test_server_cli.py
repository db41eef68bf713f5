"""`fleetmind server ...` commands and the aggregator's config file."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fleetmind.server import identity
from fleetmind.server.cli import add_server_commands
from fleetmind.server.config import DEV_ADAPTER, ConfigError, load_config


def run(argv: list[str]) -> int:
    # The program registers the group in fleetmind.cli.main; a bare parser stands in here.
    parser = argparse.ArgumentParser(prog="fleetmind")
    add_server_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except argparse.ArgumentError as error:  # as fleetmind.cli.main.main reports it
        print(f"fleetmind: error: {error}", file=sys.stderr)
        return 2


def test_certs_make_a_ca_an_aggregator_and_sites(tmp_path: Path, capsys) -> None:
    certs = tmp_path / "certs"
    assert run(["server", "certs", "ca", "--out", str(certs)]) == 0
    assert run(["server", "certs", "server", "--ca", str(certs), "--host", "127.0.0.1",
                "--host", "agg.example.org", "--out", str(certs)]) == 0
    assert run(["server", "certs", "site", "site-a", "--ca", str(certs),
                "--out", str(certs / "sites")]) == 0
    site = identity.Credentials.load(certs / "sites", "site-a")
    assert site.common_name == "site-a"
    assert identity.Credentials.load(certs, "aggregator").common_name == "127.0.0.1"
    for key in (certs / "ca.key", certs / "aggregator.key", certs / "sites" / "site-a.key"):
        assert key.stat().st_mode & 0o077 == 0
    capsys.readouterr()
    # Never overwritten; a bad name is one line and exit 2.
    assert run(["server", "certs", "ca", "--out", str(certs)]) == 2
    assert run(["server", "certs", "site", "no/slash", "--ca", str(certs),
                "--out", str(certs)]) == 2
    err = capsys.readouterr().err
    assert "exists" in err and "site name" in err


def test_run_refuses_plaintext_off_loopback_and_a_missing_data_dir(tmp_path: Path,
                                                                  capsys) -> None:
    assert run(["server", "run", "--insecure", "--listen", "0.0.0.0:0",
                "--data", str(tmp_path)]) == 2
    assert run(["server", "run", "--insecure"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "plaintext refused" in err[0] and "--data" in err[1]
    assert not (tmp_path / "ledger.sqlite").exists()


def test_a_toml_config_is_read_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "aggregator.toml"
    path.write_text('listen = "127.0.0.1:0"\ndata_dir = "data"\n'
                    '[tls]\ncertificate = "c/a.crt"\nprivate_key = "c/a.key"\n'
                    'ca_certificate = "c/ca.crt"\n'
                    '[cohort]\nmin_size = 3\ntarget_size = 5\ndeadline_s = 10\n'
                    '[privacy]\nclip_norm = 0.5\nnoise_multiplier = 1.2\nepsilon_budget = 8\n'
                    '[adapter]\nbase_model_id = "m"\nbase_model_sha256 = "' + "a" * 64 + '"\n'
                    'frozen_a_seed = 3\nrank = 2\n'
                    'modules = [{name = "model.layers.0.mlp.gate_proj", in_features = 4, '
                    'out_features = 6}]\n')
    config = load_config(path)
    assert config.data_dir == tmp_path / "data"
    assert config.tls.ca_certificate == tmp_path / "c" / "ca.crt"
    assert (config.cohort.min_size, config.cohort.target_size) == (3, 5)
    assert (config.privacy.clip_norm, config.privacy.epsilon_budget) == (0.5, 8)
    assert config.adapter.modules[0].out_features == 6

    bad = tmp_path / "bad.json"
    for document, message in (({"data_dir": "d", "insecure": True, "colour": 1}, "colour"),
                              ({"data_dir": "d", "insecure": True,
                                "cohort": {"min_size": 1}}, "min_size"),
                              ({"data_dir": "d", "insecure": True,
                                "privacy": {"noise_multiplier": 0}}, "noise_multiplier"),
                              ({"data_dir": "d"}, "no tls configured"),
                              ({"insecure": True}, "data_dir is missing")):
        bad.write_text(json.dumps(document))
        with pytest.raises(ConfigError, match=message):
            load_config(bad)


def test_dev_mode_serves_health_until_sigterm(tmp_path: Path) -> None:
    code = ("import sys, argparse\n"
            "from fleetmind.server.cli import add_server_commands\n"
            "p = argparse.ArgumentParser(prog='fleetmind')\n"
            "add_server_commands(p.add_subparsers(dest='command'))\n"
            "a = p.parse_args(sys.argv[1:])\n"
            "sys.exit(a.run(a))\n")
    process = subprocess.Popen(
        [sys.executable, "-c", code, "server", "run", "--insecure", "--listen", "127.0.0.1:0",
         "--data", str(tmp_path / "data")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = process.stdout.readline()
        assert "PLAINTEXT" in line, process.stderr.read()
        address = line.split(" on ")[1].split(" ")[0]
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                              timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert (tmp_path / "data" / "versions" / "00000000" / "manifest.sig").is_file()
    # The dev default is the committed toy model's adapter: a site on it activates version 0.
    manifest = json.loads((tmp_path / "data" / "versions" / "00000000" / "manifest.json")
                          .read_text())
    assert (manifest["base_model_id"], manifest["base_model_sha256"]) == (
        "toy_model", DEV_ADAPTER.base_model_sha256)


def test_adapter_help_names_its_options_and_loads_no_torch() -> None:
    code = ("import sys, argparse\n"
            "from fleetmind.server.cli import add_server_commands\n"
            "p = argparse.ArgumentParser(prog='fleetmind')\n"
            "add_server_commands(p.add_subparsers(dest='command'))\n"
            "try:\n"
            "    p.parse_args(['server', 'adapter', '--help'])\n"
            "except SystemExit:\n"
            "    pass\n"
            "assert 'torch' not in sys.modules and 'fleetmind.client' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    for option in ("--model", "--out", "--rank", "--alpha", "--targets", "--seed",
                   "--base-model-id"):
        assert option in done.stdout
