"""A real Prometheus (Debian's `prometheus` package, which .ci/run installs) scrapes a real
aggregator on loopback with the shipped scrape config (deploy/prometheus/prometheus.yml,
its aggregator target pointed at the live endpoint), and the metric is read back through
Prometheus's HTTP API. `promtool` checks the shipped config and the live endpoint's text.
Skipped, saying why, only where the binaries are not installed."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import yaml
from support.net import free_port
from support.secagg_rounds import Site, config, run_round

from fleetmind.server.config import ServerConfig

SCRAPE_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "prometheus.yml"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
WAIT_S = 60.0
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="the prometheus binary is not installed (`apt-get install "
                               "prometheus`, as .ci/run does)")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (`apt-get install prometheus`, as "
                             ".ci/run does)")


@pytest.fixture
def aggregator_config(tmp_path: Path) -> ServerConfig:
    """The config the shared `aggregator` fixture serves."""
    return replace(config(tmp_path / "data"), metrics_listen="127.0.0.1:0")


def scrape_config_for(metrics_port: int) -> dict:
    """The shipped config, its aggregator job aimed at the live endpoint. The site jobs go:
    their targets are compose host names, which must not be looked up from a test."""
    shipped = yaml.safe_load(SCRAPE_CONFIG.read_text())
    (job,) = [j for j in shipped["scrape_configs"] if j["job_name"] == "fleetmind-aggregator"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
    shipped["scrape_configs"] = [job]
    shipped["global"].update(scrape_interval="1s", evaluation_interval="1s")
    return shipped


def query(base: str, expr: str) -> list[dict]:
    url = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    with urllib.request.urlopen(url, timeout=5) as reply:
        answer = json.loads(reply.read())
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


@needs_promtool
def test_promtool_accepts_the_shipped_scrape_config() -> None:
    checked = subprocess.run([PROMTOOL, "check", "config", str(SCRAPE_CONFIG)],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@needs_promtool
def test_promtool_finds_no_problem_in_the_live_metrics(aggregator) -> None:
    with urllib.request.urlopen(aggregator.metrics_endpoint.url, timeout=5) as reply:
        text = reply.read()
    assert b"fleetmind_aggregator_rounds_total" in text
    checked = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True,
                             timeout=60)
    # promtool lists each naming or format problem and exits non-zero on any.
    assert checked.returncode == 0, (checked.stdout + checked.stderr).decode()
    assert not checked.stdout.strip(), checked.stdout.decode()


@needs_prometheus
def test_prometheus_scrapes_a_live_aggregator(aggregator, tmp_path: Path) -> None:
    with grpc.insecure_channel(aggregator.address) as channel:
        sites = [Site(channel, f"site-{i}", seed=i) for i in range(3)]
        run_round(sites)
        assert {s.expect("completed").completed.version for s in sites} == {1}

    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(scrape_config_for(aggregator.metrics_endpoint.port)))
    if PROMTOOL is not None:  # the rewritten config is still one Prometheus accepts
        subprocess.run([PROMTOOL, "check", "config", str(config_file)], check=True,
                       capture_output=True, timeout=60)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "prometheus.log"
    with log.open("wb") as output:
        server = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config_file}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}",
             "--log.level=warn"], stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + WAIT_S
        expr = 'fleetmind_aggregator_rounds_total{job="fleetmind-aggregator",outcome="published"}'
        result: list[dict] = []
        while not result:
            assert server.poll() is None, f"prometheus exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, \
                f"no scrape within {WAIT_S} s; prometheus said: {log.read_text()[-2000:]}"
            time.sleep(0.5)
            try:
                result = query(base, expr)
            except (urllib.error.URLError, ConnectionError):
                continue  # not listening yet
        # What the aggregator counted is what Prometheus stored.
        assert float(result[0]["value"][1]) == 1.0
        assert result[0]["metric"]["instance"] == f"127.0.0.1:{aggregator.metrics_endpoint.port}"
        (up,) = query(base, 'up{job="fleetmind-aggregator"}')
        assert up["value"][1] == "1"
        (version,) = query(base, "fleetmind_aggregator_latest_version")
        assert version["value"][1] == "1"
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=5)
