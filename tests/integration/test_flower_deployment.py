"""A Flower deployment on loopback: `flower-superlink` and three `flower-supernode`
processes under TLS (certificates from fleetmind's own CA helpers), the app submitted
with `flwr run` and its round secure-aggregated (fleetmind's SecAgg+ in Flower messages);
the test starts and stops every process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

import safetensors.numpy
from support.flower_rounds import quantisation_bound
from support.net import free_port

from fleetmind.aggregation import merge
from fleetmind.aggregation.update import Update
from fleetmind.flower.settings import FlowerRun
from fleetmind.server.identity import create_ca, issue_server
from fleetmind.sim import world as W
from fleetmind.sim.flower_run import TRANSFER_EVALUATION, write_toy_world

APP = Path(__file__).resolve().parents[2] / "flower" / "app"
BIN = Path(sys.executable).parent  # flower-superlink, flwr ... of this environment
SITES = 3


def wait_for_port(port: int, process: subprocess.Popen, log: Path, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"exited with {process.returncode}:\n{log.read_text()}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"nothing listens on {port} after {seconds} s:\n{log.read_text()}")


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[dict]:
    certs = tmp_path / "certs"
    ca = create_ca("fleetmind test CA")
    ca_file, _ = ca.save(certs, "ca")
    server_cert, server_key = issue_server(ca, ["127.0.0.1"]).save(certs, "superlink")
    world = write_toy_world(tmp_path / "world", SITES, facts_per_site=2, seed=5)
    link_port = free_port()
    home = tmp_path / "flwr-home"
    home.mkdir()
    # The `flwr` CLI's connection: TLS, verified against our CA (no `insecure`).
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "fleet"\n\n[superlink.fleet]\n'
        f'address = "127.0.0.1:{link_port}"\nroot-certificates = "{ca_file}"\n')
    # SuperLink and SuperNodes start their helpers (flower-superexec, flwr-serverapp,
    # flwr-clientapp) by name, so this environment's bin comes first.
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}:{os.environ['PATH']}"}
    processes: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"{name}.log"
        with open(log, "wb") as out:
            # Its own session, so stopping it reaches the helpers it spawned too.
            process = subprocess.Popen([str(BIN / args[0]), *args[1:]], stdout=out,
                                       stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                                       start_new_session=True)
        processes.append(process)
        return process, log

    try:
        link, link_log = start(
            "superlink", "flower-superlink", "--ssl-certfile", str(server_cert),
            "--ssl-keyfile", str(server_key), "--ssl-ca-certfile", str(ca_file),
            "--host", "127.0.0.1", "--port", str(link_port),
            # Nothing may be downloaded: the app's code is the installed fleetmind.
            "--disable-runtime-dependency-installation")
        wait_for_port(link_port, link, link_log)
        for index in range(SITES):
            name = f"site-{index:02d}"
            node_config = (f'site="{name}" sessions="{world}/sites/{name}/sessions.jsonl" '
                           f'state="{tmp_path}/state/{name}"')
            start(name, "flower-supernode", "--superlink", f"127.0.0.1:{link_port}",
                  "--root-certificates", str(ca_file), "--port", str(free_port()),
                  "--node-config", node_config)
        yield {"env": env, "world": world, "root": tmp_path, "link_log": link_log}
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def test_flwr_run_on_a_tls_deployment_merges_the_sites_deltas_under_secure_aggregation(
        fleet: dict, toy_model_dir: Path) -> None:
    root, out = fleet["root"], fleet["root"] / "out"
    eta = SITES / 2
    # The app knows no dataset: the run config names the model and the evaluation.
    run_config = (f'world="{fleet["world"]}" state="{root}/state" out="{out}" sites={SITES} '
                  f"steps=10 server-learning-rate={eta} prompts-per-step=2 samples-per-prompt=2 "
                  "dreams-per-lesson=2 "
                  f'model="{toy_model_dir}" evaluate="{TRANSFER_EVALUATION}"')
    finished = subprocess.run(
        [str(BIN / "flwr"), "run", str(APP), "fleet", "--stream", "--run-config", run_config],
        env=fleet["env"], cwd=root, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    # Every API the SuperNodes and `flwr` used was served over TLS only.
    assert "https://127.0.0.1" in fleet["link_log"].read_text()

    updates = [Update.from_bytes((root / "state" / site.name / "round-0001-update.safetensors")
                                 .read_bytes())
               for site in W.read_world(fleet["world"]).sites]
    zero = {name: np.zeros_like(t) for name, t in updates[0].tensors.items()}
    expected, _ = merge.exact_merge(zero, *merge.weighted_delta_sum(updates), merge.FedAvg(eta))
    got = safetensors.numpy.load_file(str(out / "global_b.safetensors"))
    # The ServerApp unmasked the three sites' sum: their merge, within the ring's rounding.
    bound = quantisation_bound(FlowerRun(sites=SITES, server_learning_rate=eta), SITES)
    for name in expected:
        assert np.abs(got[name] - expected[name]).max() <= bound
    result = json.loads((out / "result.json").read_text())
    assert result["config"]["secure-aggregation"] is True
    assert result["secure_rounds"]["1"] == {"contributors": SITES, "dropped": 0}
    evaluation = result["evaluation"]
    assert evaluation["1"]["transfer-accuracy"] > evaluation["0"]["transfer-accuracy"]
