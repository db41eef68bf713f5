"""A reduced `fleetmind demo`: three site processes (the smallest cohort secure aggregation
allows) and the aggregator over real loopback gRPC, two rounds on a small world (each
site's first fact arriving in round 1, its second in round 2), and results.json holding
every field the README promises. Here the sites ingest the world's
transcripts (`--no-endpoints`); tests/test_demo_endpoints.py runs the demo through the
sites' endpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleetmind.aggregation.manifest import MANIFEST, Manifest
from fleetmind.cli.main import main
from fleetmind.sim.demo import (
    PLOT,
    RESULTS,
    DemoConfig,
    clear_previous_run,
    fedit_epsilon,
    plot,
    run_demo,
)

ROUND_FIELDS = ("round", "transfer_accuracy", "own_accuracy", "incontext_upper_bound",
                "recovery", "forgetting_points", "canary_exposure_bits", "epsilon",
                "facts_known", "facts_new", "recovery_known", "recovery_new",
                "recovery_round1", "retention_round1")
SITE_FIELDS = ("recovery", "recovery_known", "recovery_new", "recovery_round1")


def test_reduced_demo_transfers_knowledge_between_sites(tmp_path: Path) -> None:
    secure_aggregation = True  # the plain-sum ablation: the next test, and test_plain_sum.py
    cfg = DemoConfig(sites=3, rounds=2, facts_per_site=2, users_per_fact=8, canaries_per_site=1,
                     repeated_canaries_per_site=1, canary_repeats=2, steps=12, dp=False,
                     merge="exact", secure_aggregation=secure_aggregation,
                     endpoints=False, out=tmp_path / "demo")
    run_demo(cfg)
    manifest = Manifest.from_bytes((cfg.out / "site-00" / "current" / MANIFEST).read_bytes())
    assert manifest.secure_aggregation is secure_aggregation
    results = json.loads((cfg.out / RESULTS).read_text())
    assert results["sites"] == ["site-00", "site-01", "site-02"]
    assert [r["round"] for r in results["rounds"]] == [0, 1, 2]
    for measured in results["rounds"]:
        assert all(key in measured for key in ROUND_FIELDS)
        assert [s["site"] for s in measured["sites"]] == results["sites"]
        assert all(key in site for site in measured["sites"] for key in SITE_FIELDS)
        assert "served_transfer_accuracy" not in measured  # no endpoint served anything
    base, first, after = results["rounds"]
    assert "repeated_canary_exposure_bits" in after["sites"][0]
    assert first["version"] == 1 and after["version"] == 2 and after["epsilon"] > 0
    # Each site learned facts it never saw, from the other site, through the fleet.
    assert after["transfer_accuracy"] > base["transfer_accuracy"]
    # Knowledge arrives over the rounds: each site's first fact in round 1, its second in 2.
    assert [r["facts_known"] for r in results["rounds"]] == [0, 3, 6]
    assert [r["facts_new"] for r in results["rounds"]] == [0, 3, 3]
    assert base["recovery_known"] is None and base["recovery_round1"] is None
    assert first["recovery_known"] == first["recovery_new"] == first["recovery_round1"]
    # In round 2 every fact is said: recovery on them is the transfer recovery over all.
    assert after["recovery_known"] == pytest.approx(after["recovery"])
    for site in after["sites"]:
        assert site["recovery_known"] == pytest.approx(site["recovery"])
        # Two foreign facts, one from each round, under one upper bound where both are read.
        if site["incontext_upper_bound"] == 1.0:
            assert site["recovery_known"] == pytest.approx(
                (site["recovery_new"] + site["recovery_round1"]) / 2)
    # Round 1's facts: recovery now over their best so far, from round 2 on.
    assert base["retention_round1"] is None and first["retention_round1"] is None
    best = max(first["recovery_round1"], after["recovery_round1"])
    assert after["retention_round1"] == (after["recovery_round1"] / best if best else None)
    assert results["config"]["sites"] == 3 and results["config"]["dp"] is False
    assert (cfg.out / PLOT).stat().st_size > 0


def test_the_no_secagg_demo_serves_a_plain_sum_aggregator(tmp_path: Path, toy_model_dir,
                                                          monkeypatch) -> None:
    """`--no-secagg` (DemoConfig.secure_aggregation=False) reaches the aggregator the fleet
    serves; the plain-sum round itself runs end to end once, in test_plain_sum.py, and a
    site on loopback allows it (test_site_loop.py). The site processes are not started."""
    from types import SimpleNamespace

    from fleetmind.sim import fleet as fleet_module

    started: list[str] = []

    class Process:
        def __init__(self, name: str, **_: object) -> None:
            self.name = name

        def start(self) -> None:
            started.append(self.name)

        def join(self, timeout: float) -> None:
            pass

        def is_alive(self) -> bool:
            return False

    spawn = SimpleNamespace(Queue=lambda: SimpleNamespace(put=lambda item: None),
                            Process=Process)
    monkeypatch.setattr(fleet_module, "multiprocessing",
                        SimpleNamespace(get_context=lambda method: spawn))
    cfg = DemoConfig(sites=3, secure_aggregation=False, endpoints=False, out=tmp_path / "demo")
    guard = tmp_path / "guard.jsonl"
    guard.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    fleet = fleet_module.Fleet(cfg.fleet(), toy_model_dir, guard)
    fleet.start()
    try:
        assert fleet.server.coordinator.cohort_policy.secure_aggregation is False
        assert started == ["site-00", "site-01", "site-02"]
    finally:
        fleet.stop()


def test_fedit_merge_alone_runs_the_arm_in_place_of_the_fleet(tmp_path: Path) -> None:
    cfg = DemoConfig(sites=3, rounds=1, facts_per_site=2, users_per_fact=8, canaries_per_site=1,
                     repeated_canaries_per_site=0, steps=6, merge="fedit", out=tmp_path / "demo")
    run_demo(cfg)
    results = json.loads((cfg.out / RESULTS).read_text())
    _, after = results["rounds"]
    assert all(key in after for key in ROUND_FIELDS)
    # No aggregator ran: no version, no site folders; epsilon is the arm's own accounting.
    assert after["version"] is None and "fedit" not in after
    assert "repeated_canary_exposure_bits" not in after  # the world has none
    assert after["facts_known"] == after["facts_new"] == 6  # one round: every fact in it
    assert after["recovery_known"] == pytest.approx(after["recovery"])
    assert not (cfg.out / "site-00").exists()
    assert after["epsilon"] == pytest.approx(fedit_epsilon(cfg, 1))
    assert results["config"]["merge"] == "fedit"
    assert results["config"]["endpoints"] is False  # no site, so no endpoint
    # The arm's own server learning rate: by default the fleet's, at most one sum.
    assert results["config"]["server_learning_rate"] == 1.5
    assert results["config"]["fedit_server_learning_rate"] == 1.5
    assert DemoConfig(server_learning_rate=12).fedit_server_learning_rate == 4.0


@pytest.mark.parametrize("args, problem", [
    (["--sites", "2"], "smallest cohort is 3 sites"),
    (["--rounds", "0"], "--rounds 0"),
    (["--rounds", "3"], "--rounds 3 needs --facts-per-site 3 or more (it is 2)"),
    (["--steps", "0"], "--steps 0"),
    (["--noise-multiplier", "-1"], "noise_multiplier"),
    (["--fedit-server-lr", "-1"], "fedit_server_learning_rate"),
    (["--privacy-unit", "household"], "--privacy-unit"),
])
def test_impossible_settings_are_refused_in_one_line(args, problem, tmp_path, capsys) -> None:
    assert main(["demo", *args, "--out", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    assert problem in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "demo").exists()


def test_a_previous_run_is_cleared_and_a_foreign_folder_refused(tmp_path, capsys) -> None:
    previous = tmp_path / "previous"
    for folder in ("world", "aggregator/versions", "site-00/versions", "site-11"):
        (previous / folder).mkdir(parents=True)
    (previous / "site-00" / "sessions.db").write_bytes(b"old sessions")
    (previous / RESULTS).write_text("{}")
    clear_previous_run(previous)
    assert list(previous.iterdir()) == []  # the old fleet's state would carry on otherwise

    foreign = tmp_path / "foreign"
    (foreign / "site-00").mkdir(parents=True)
    (foreign / "thesis.tex").write_text("mine")
    assert main(["demo", "--out", str(foreign)]) == 2
    err = capsys.readouterr().err
    assert "thesis.tex" in err and len(err.strip().splitlines()) == 1
    assert sorted(e.name for e in foreign.iterdir()) == ["site-00", "thesis.tex"]


def test_the_plot_with_the_fedit_arms_rounds_is_a_png(tmp_path: Path) -> None:
    import matplotlib.image

    rounds = [{"round": r, "recovery": 0.4 * r, "forgetting_points": -r,
               "canary_exposure_bits": 0.1 * r, "repeated_canary_exposure_bits": 0.3 * r,
               "fedit": {"recovery": 0.0, "forgetting_points": 99.0 * r}} for r in range(3)]
    path = plot({"rounds": rounds, "sites": ["a", "b", "c"],
                 "config": {"merge": "both", "dp": True}}, tmp_path / PLOT)
    narrow = matplotlib.image.imread(path).shape[1]
    assert narrow > 100
    # With knowledge arriving over the rounds (None before a round has facts): a fourth panel.
    for r in rounds:
        r.update(facts_known=4 * r["round"], facts_new=4 if r["round"] else 0,
                 recovery_known=0.5 if r["round"] else None,
                 recovery_new=0.5 if r["round"] else None,
                 retention_round1=1.0 if r["round"] == 2 else None)
    path = plot({"rounds": rounds, "sites": ["a", "b", "c"],
                 "config": {"merge": "both", "dp": True}}, tmp_path / "continual.png")
    assert matplotlib.image.imread(path).shape[1] > narrow
