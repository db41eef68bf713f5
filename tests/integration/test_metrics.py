"""Prometheus metrics of the aggregator and of sites, read back the way Prometheus reads
them: over HTTP, parsed with `prometheus_client.parser`. The aggregator's rounds are driven
phase by phase with test_server_round's sites; the sites' own metrics come from real
site agents (the toy model) in a real round."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.concurrent import at_once, each_returned
from support.net import eventually
from support.secagg_rounds import Site, config, four_site_config, run_phases, run_round
from support.toy_fleet import FAST, TOY_SPEC

from fleetmind.aggregation.accountant import RoundCharge, epsilon_of
from fleetmind.aggregation.dp import DPConfig
from fleetmind.cli.main import main
from fleetmind.client.metrics import SiteMetrics
from fleetmind.client.site import Outcome, SiteConfig, run, run_once
from fleetmind.client.site_config import ConfigError as SiteConfigError
from fleetmind.client.store import SessionStore
from fleetmind.protos.fleetmind.v1 import audit_pb2, audit_pb2_grpc, models_pb2, models_pb2_grpc
from fleetmind.server import versions
from fleetmind.server.config import (
    CohortPolicy,
    ConfigError,
    PrivacyPolicy,
    ServerConfig,
    parse_config,
)
from fleetmind.server.service import serve
from fleetmind.sim.world import WorldSpec, make_world

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    """Every sample of a /metrics page, by (name, sorted labels)."""
    with urllib.request.urlopen(url, timeout=5) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"{name}{labels} not exposed; have {sorted(n for n, _ in samples)}"
    return samples[key]


def values(samples: Samples, wanted: dict[str, float]) -> dict[str, float]:
    """value() of each series `wanted` names (`name` or `name{label=value,...}`), by that
    name: compared with `wanted`, one assert shows every series that is off."""
    got = {}
    for series in wanted:
        name, _, labels = series.partition("{")
        got[series] = value(samples, name, **dict(
            pair.split("=") for pair in labels.rstrip("}").split(",") if pair))
    return got


def with_metrics(server_config: ServerConfig) -> ServerConfig:
    from dataclasses import replace
    return replace(server_config, metrics_listen="127.0.0.1:0")


# ---- the aggregator ----------------------------------------------------------------------


def test_a_round_shows_in_the_aggregators_metrics(tmp_path: Path) -> None:
    running = serve(with_metrics(config(tmp_path / "data")))
    try:
        assert running.metrics_endpoint is not None
        url = running.metrics_endpoint.url
        before = scrape(url)
        # Every series is there from the first scrape, at zero.
        at_start = {"fleetmind_aggregator_rounds_total{outcome=published}": 0,
                    "fleetmind_aggregator_dropouts_total{phase=unmasking}": 0,
                    "fleetmind_aggregator_latest_version": 0,
                    "fleetmind_aggregator_epsilon_spent": 0,
                    "fleetmind_aggregator_epsilon_budget": 10.0,
                    "fleetmind_aggregator_watchers": 0}
        assert values(before, at_start) == at_start

        with grpc.insecure_channel(running.address) as channel:
            watch = models_pb2_grpc.ModelsStub(channel).Watch(
                models_pb2.WatchRequest(after_version=0), timeout=30)
            eventually(lambda: value(scrape(url), "fleetmind_aggregator_watchers") == 1,
                       seconds=10.0)
            sites = [Site(channel, f"site-{i}", seed=i) for i in range(3)]
            run_round(sites)
            assert {s.expect("completed").completed.version for s in sites} == {1}
            assert next(iter(watch)).version == 1
            watch.cancel()
            chunks = list(models_pb2_grpc.ModelsStub(channel).Get(models_pb2.GetRequest(
                version=1, file=versions.ADAPTER_WEIGHTS), timeout=5))
            budget = audit_pb2_grpc.AuditStub(channel).Budget(audit_pb2.BudgetRequest(),
                                                               timeout=5)
        # A cancelled Watch leaves the gauge within the stream's poll interval.
        eventually(lambda: value(scrape(url), "fleetmind_aggregator_watchers") == 0,
                   seconds=10.0)

        after = scrape(url)
        one_round = {"fleetmind_aggregator_rounds_total{outcome=published}": 1,
                     "fleetmind_aggregator_rounds_total{outcome=aborted}": 0,
                     "fleetmind_aggregator_cohort_sites_count": 1,
                     "fleetmind_aggregator_cohort_sites_sum": 3,
                     "fleetmind_aggregator_contributors_sites_sum": 3,
                     "fleetmind_aggregator_round_duration_seconds_count": 1,
                     "fleetmind_aggregator_round_in_flight": 0,
                     "fleetmind_aggregator_latest_version": 1}
        for phase in ("advertise_keys", "share_keys", "masked_input_collection", "unmasking"):
            one_round[f"fleetmind_aggregator_phase_duration_seconds_count{{phase={phase}}}"] = 1
            one_round[f"fleetmind_aggregator_dropouts_total{{phase={phase}}}"] = 0
        assert values(after, one_round) == one_round
        assert value(after, "fleetmind_aggregator_epsilon_spent") == pytest.approx(
            budget.epsilon_spent)
        assert budget.epsilon_spent > 0
        # Bytes: at least each site's masked vector in, at least the weights file out.
        vector_bytes = sites[0].config.vector_length * sites[0].config.ring_bits // 8
        assert value(after, "fleetmind_aggregator_received_bytes_total",
                     method="SubmitMaskedVector") >= 3 * vector_bytes
        for method in ("AdvertiseKeys", "ShareKeys", "Unmask"):
            assert value(after, "fleetmind_aggregator_received_bytes_total", method=method) > 0
        weights = sum(len(c.data) for c in chunks)
        assert value(after, "fleetmind_aggregator_sent_bytes_total", method="Get") >= weights
        assert value(after, "fleetmind_aggregator_sent_bytes_total", method="Watch") > 0
        assert value(after, "fleetmind_aggregator_sent_bytes_total", method="JoinRound") > 0
    finally:
        running.stop(grace=None)
    with pytest.raises(urllib.error.URLError):  # stop() closed the endpoint
        scrape(url)


def test_a_dropout_is_counted_in_its_phase(tmp_path: Path) -> None:
    running = serve(four_site_config(tmp_path))  # no endpoint: read the registry itself
    try:
        assert running.metrics_endpoint is None
        with grpc.insecure_channel(running.address) as channel:
            sites = [Site(channel, f"site-{i}", seed=30 + i) for i in range(4)]
            run_phases(sites, last="share")
            survivors = sites[:3]  # the fourth never uploads: it misses the collection
            run_phases(survivors, first="upload")
            for s in survivors:
                s.expect("completed")
        registry = running.metrics.registry
        dropped = {phase: registry.get_sample_value("fleetmind_aggregator_dropouts_total",
                                                    {"phase": phase})
                   for phase in ("advertise_keys", "share_keys", "masked_input_collection",
                                 "unmasking")}
        assert dropped == {"advertise_keys": 0, "share_keys": 0,
                           "masked_input_collection": 1, "unmasking": 0}
        assert registry.get_sample_value("fleetmind_aggregator_cohort_sites_sum") == 4
        assert registry.get_sample_value("fleetmind_aggregator_contributors_sites_sum") == 3
        # The collection phase waited for its deadline (0.5 s) for the missing site.
        assert registry.get_sample_value("fleetmind_aggregator_phase_duration_seconds_sum",
                                         {"phase": "masked_input_collection"}) >= 0.5
    finally:
        running.stop(grace=None)


def test_a_round_lost_to_a_restart_counts_as_abandoned(tmp_path: Path) -> None:
    data = tmp_path / "data"
    running = serve(config(data))
    with grpc.insecure_channel(running.address) as channel:
        sites = [Site(channel, f"site-{i}", seed=20 + i) for i in range(3)]
        for s in sites:
            s.join()
        for s in sites:
            s.advertise()
        assert running.metrics.registry.get_sample_value(
            "fleetmind_aggregator_round_in_flight") == 1
    running.stop(grace=None)
    running = serve(config(data))
    try:
        registry = running.metrics.registry
        assert registry.get_sample_value("fleetmind_aggregator_rounds_total",
                                         {"outcome": "abandoned"}) == 1
        assert registry.get_sample_value("fleetmind_aggregator_rounds_total",
                                         {"outcome": "published"}) == 0
    finally:
        running.stop(grace=None)


def test_a_cohort_the_budget_cannot_pay_counts_as_refused(tmp_path: Path) -> None:
    """Sites queue while round 1 runs; once it has spent its epsilon, the budget cannot pay
    for their cohort, so it is refused without starting."""
    privacy = PrivacyPolicy(clip_norm=1.0, noise_multiplier=2.0, fixed_point_clip=1.0)
    # What the coordinator charges a three-site round (coordinator._charge_for).
    dp = DPConfig(privacy.clip_norm, privacy.noise_multiplier, privacy.privacy_unit,
                  privacy.noise_mode, 3)
    charge = RoundCharge(dp.effective_noise_multiplier(3), 1.0, privacy.unit_uses)
    one, two = (epsilon_of([charge] * n, privacy.delta, privacy.accountant) for n in (1, 2))
    budget = PrivacyPolicy(clip_norm=1.0, noise_multiplier=2.0, fixed_point_clip=1.0,
                           epsilon_budget=(one + two) / 2)
    running = serve(config(tmp_path / "data", budget))
    try:
        with grpc.insecure_channel(running.address) as channel:
            sites = [Site(channel, f"site-{i}", seed=40 + i) for i in range(6)]
            first, later = sites[:3], sites[3:]
            run_phases(first, last="advertise")
            run_phases(later, last="join")  # queued: round 1 is running
            run_phases(first, first="share")
            for s in first:
                s.expect("completed")
            for s in later:
                assert "privacy budget" in s.expect("aborted").aborted.reason
        registry = running.metrics.registry
        assert registry.get_sample_value("fleetmind_aggregator_rounds_total",
                                         {"outcome": "refused"}) == 1
        assert registry.get_sample_value("fleetmind_aggregator_rounds_total",
                                         {"outcome": "published"}) == 1
        assert registry.get_sample_value("fleetmind_aggregator_epsilon_spent") == \
            pytest.approx(one)
    finally:
        running.stop(grace=None)


def test_two_aggregators_in_one_process_keep_their_own_metrics(tmp_path: Path) -> None:
    a = serve(with_metrics(config(tmp_path / "a")))
    b = serve(with_metrics(config(tmp_path / "b")))
    try:
        with grpc.insecure_channel(a.address) as channel:
            run_round(sites := [Site(channel, f"site-{i}", seed=i) for i in range(3)])
            for s in sites:
                s.expect("completed")
        assert value(scrape(a.metrics_endpoint.url), "fleetmind_aggregator_latest_version") == 1
        assert value(scrape(b.metrics_endpoint.url), "fleetmind_aggregator_latest_version") == 0
    finally:
        a.stop(grace=None)
        b.stop(grace=None)


def test_metrics_listen_is_validated(tmp_path: Path) -> None:
    base = {"data_dir": "data", "insecure": True, "listen": "127.0.0.1:7443"}
    parsed = parse_config({**base, "metrics_listen": "127.0.0.1:9464"}, tmp_path)
    assert parsed.metrics_listen == "127.0.0.1:9464"
    assert parse_config(base, tmp_path).metrics_listen is None  # off unless asked for
    for bad, message in (("9464", "metrics_listen='9464' must be host:port"),
                         ("127.0.0.1:http", "must be host:port"),
                         (9464, "must be a \"host:port\" string"),
                         ("127.0.0.1:7443", "is the gRPC address")):
        with pytest.raises(ConfigError, match=message):
            parse_config({**base, "metrics_listen": bad}, tmp_path)


def test_a_taken_metrics_port_is_a_clear_error(tmp_path: Path) -> None:
    first = serve(with_metrics(config(tmp_path / "a")))
    try:
        taken = f"127.0.0.1:{first.metrics_endpoint.port}"
        from dataclasses import replace
        with pytest.raises(OSError, match=f"cannot serve metrics on {taken}"):
            serve(replace(config(tmp_path / "b"), metrics_listen=taken))
    finally:
        first.stop(grace=None)


# ---- sites -----------------------------------------------------------------------------


@pytest.fixture
def toy_aggregator(tmp_path: Path):
    running = serve(ServerConfig(
        data_dir=tmp_path / "aggregator", listen="127.0.0.1:0", insecure=True,
        cohort=CohortPolicy(min_size=3, target_size=3, deadline_s=120, phase_deadline_s=60),
        privacy=PrivacyPolicy(clip_norm=1.0, noise_multiplier=1.0, epsilon_budget=10.0),
        adapter=TOY_SPEC))
    yield running
    running.stop(grace=None)


def site_config(tmp_path: Path, name: str, model: Path, running, **changes) -> SiteConfig:
    values = dict(name=name, data_dir=tmp_path / name, model_dir=model,
                  aggregator=running.address, identity_key=tmp_path / name / "identity.pem",
                  aggregator_key=running.coordinator.registry.public_key.public_bytes_raw(),
                  min_new_sessions=4, distill=FAST, insecure=True, round_timeout_s=60.0)
    values.update(changes)
    return SiteConfig(**values)


def store_sessions(config: SiteConfig, sessions: list[dict]) -> int:
    config.data_dir.mkdir(parents=True, exist_ok=True)
    with SessionStore(config.data_dir) as store:
        for session in sessions:
            store.add(session)
        return len(store)


def test_sites_count_consolidations_tokens_and_rounds(toy_aggregator, tmp_path,
                                                      toy_model_dir) -> None:
    world = make_world(WorldSpec(seed=0, sites=3))
    configs = [site_config(tmp_path, f"site-{i}", toy_model_dir, toy_aggregator)
               for i in range(3)]
    stored = [store_sessions(c, site.sessions) for c, site in zip(configs, world.sites,
                                                                  strict=True)]
    metrics = [SiteMetrics() for _ in configs]
    def one(i: int) -> Outcome:
        with grpc.insecure_channel(toy_aggregator.address) as channel:
            return run_once(configs[i], channel, metrics=metrics[i])

    started = time.time()
    each_returned(at_once(3, one, join_s=180), Outcome)
    for m, count in zip(metrics, stored, strict=True):
        get = m.registry.get_sample_value
        assert get("fleetmind_site_consolidations_total") == 1
        assert get("fleetmind_site_distilled_tokens_total") > 0
        assert get("fleetmind_site_rounds_total") == 1
        assert get("fleetmind_site_sessions_stored") == count
        assert get("fleetmind_site_sessions_unconsumed") == 0  # the round consumed them
        assert get("fleetmind_site_active_version") == 1
        assert started - 1 <= get("fleetmind_site_last_activation_timestamp_seconds") \
            <= time.time() + 1


def test_the_site_agent_serves_its_metrics(toy_aggregator, tmp_path, toy_model_dir) -> None:
    world = make_world(WorldSpec(seed=1, sites=1))
    config = site_config(tmp_path, "site-0", toy_model_dir, toy_aggregator,
                         min_new_sessions=10_000, metrics_listen="127.0.0.1:0")
    stored = store_sessions(config, world.sites[0].sessions)
    metrics, stop = SiteMetrics(), threading.Event()
    agent = threading.Thread(target=run, args=(config, stop), kwargs={"metrics": metrics})
    agent.start()
    try:
        eventually(lambda: metrics.endpoint is not None, seconds=10.0)
        url = metrics.endpoint.url
        # Below the threshold the agent only activates genesis, and says so.
        eventually(lambda: value(scrape(url), "fleetmind_site_active_version") == 0,
                   seconds=10.0)
        samples = scrape(url)
        assert value(samples, "fleetmind_site_sessions_stored") == stored
        assert value(samples, "fleetmind_site_sessions_unconsumed") == stored
        assert value(samples, "fleetmind_site_consolidations_total") == 0
        assert value(samples, "fleetmind_site_failures_total") == 0
        assert abs(value(samples, "fleetmind_site_last_activation_timestamp_seconds")
                   - time.time()) < 60
    finally:
        stop.set()
        agent.join(30)
    assert not agent.is_alive()
    with pytest.raises(urllib.error.URLError):  # the loop's end closed the endpoint
        scrape(url)


def test_a_sites_metrics_listen_is_validated(tmp_path: Path, toy_model_dir) -> None:
    key = tmp_path / "aggregator.key"
    key.write_text("ab" * 32)
    raw = {"name": "s", "data_dir": "s", "model_dir": str(toy_model_dir),
           "aggregator": "127.0.0.1:7443", "identity_key": "s/id.pem",
           "aggregator_key": str(key), "insecure": True}
    assert SiteConfig.from_mapping({**raw, "metrics_listen": "0.0.0.0:9465"},
                                   tmp_path).metrics_listen == "0.0.0.0:9465"
    for bad in ("9465", "host:port", ":9465", "0.0.0.0:70000"):
        with pytest.raises(SiteConfigError, match="metrics_listen"):
            SiteConfig.from_mapping({**raw, "metrics_listen": bad}, tmp_path)
    (tmp_path / "site.json").write_text(json.dumps({**raw, "metrics_listen": 9465}))
    with pytest.raises(SiteConfigError, match="metrics_listen"):
        SiteConfig.load(tmp_path / "site.json")


# ---- the command line ------------------------------------------------------------------


def test_server_run_serves_metrics_with_the_flag(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "fleetmind.cli.main", "server", "run", "--insecure",
         "--listen", "127.0.0.1:0", "--data", str(tmp_path / "data"),
         "--metrics-listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = process.stdout.readline()
        assert "metrics on http://127.0.0.1:" in line, line + process.stderr.read()
        url = line.rsplit("metrics on ", 1)[1].strip()
        assert value(scrape(url), "fleetmind_aggregator_latest_version") == 0
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_server_key_prints_the_key_sites_pin(tmp_path: Path, capsys, toy_model_dir) -> None:
    data, out = tmp_path / "data", tmp_path / "aggregator.pub"
    assert main(["server", "key", "--data", str(data), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip()
    assert re.fullmatch(r"[0-9a-f]{64}", printed) and out.read_text() == printed + "\n"
    assert main(["server", "key", "--data", str(data)]) == 0  # the same key, not a new one
    assert capsys.readouterr().out.strip() == printed
    # It is the key the aggregator then signs with, and a site takes the file as it is.
    running = serve(ServerConfig(data_dir=data, insecure=True))
    try:
        assert running.coordinator.registry.public_key.public_bytes_raw().hex() == printed
    finally:
        running.stop(grace=None)
    site = SiteConfig(name="s", data_dir=tmp_path / "s", model_dir=toy_model_dir,
                      aggregator="127.0.0.1:7443", identity_key=tmp_path / "s" / "id.pem",
                      aggregator_key=out, insecure=True)
    assert site.aggregator_public_key().hex() == printed


