"""`fleetmind bench continual`: the measures on hand-made numbers, and a reduced run (three
site processes and the aggregator over loopback gRPC with secure aggregation, two rounds of
arriving knowledge, every arm) writing every key the issue names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleetmind.sim import continual_world as CW
from fleetmind.sim import world as W
from fleetmind.sim.bench.continual import (
    ARMS,
    PLOT,
    RESULTS,
    ROUND_KEYS,
    ArmProcesses,
    ContinualConfig,
    ContinualEvaluator,
    add_continual_command,
    arm_epsilon,
    capped_epsilon,
    in_process_epsilon,
    most_rounds_entered,
    run,
)
from fleetmind.sim.evaluation import recovery, retention

SMALL = dict(sites=3, rounds=2, facts_per_site_per_round=1, users_per_fact=2, steps=2,
             canary_repeats=2, recalls_per_site_per_round=1, general_tasks=40, guard_tasks=40)


def test_recovery_is_closed_book_over_the_base_models_in_context_accuracy() -> None:
    assert recovery([True, False, True, False], [True, True, True, False]) == pytest.approx(2 / 3)
    assert recovery([], []) is None  # no facts known yet
    assert recovery([False, False], [False, False]) == 0.0  # the base reads none in context
    with pytest.raises(ValueError, match="same facts"):
        recovery([True], [True, False])


def test_retention_is_the_last_value_over_the_best_so_far() -> None:
    assert retention([0.5, 1.0, 0.8]) == pytest.approx(0.8)
    assert retention([0.4, 0.2, 0.4]) == 1.0
    assert retention([0.0, 0.0]) is None  # nothing learned, nothing to retain
    assert retention([None]) is None
    assert retention([0.5, None]) is None


def test_the_base_model_gains_no_exposure_on_canaries_or_controls() -> None:
    """Exposure is measured over the base model's, for the said canaries and the controls
    nobody said alike: the base model itself gains nothing on either."""
    from fleetmind.client.model import load_model
    from fleetmind.sim.basemodel import toy_model_path

    world = CW.make_continual_world(CW.ContinualSpec(sites=3, rounds=2, facts_per_site_per_round=1,
                                                   users_per_fact=2, control_canaries=5,
                                                   general_tasks=4, guard_tasks=4))
    evaluator = ContinualEvaluator(world, toy_model_path())
    assert len(evaluator.base_control_exposure) == 5
    assert len(evaluator.base_exposure) == len(world.canaries)
    model, tokenizer = load_model(toy_model_path())
    row = evaluator.measure(model, tokenizer, 2)
    assert row["control_canary_exposure_bits"] == 0.0
    assert row["control_canary_exposure_sd_bits"] == 0.0
    assert row["canary_exposure_bits"] == row["repeated_canary_exposure_bits"] == 0.0
    assert row["canary_exposure_over_twins_bits"] == 0.0
    assert row["repeated_canary_exposure_over_twins_bits"] == 0.0
    assert len(evaluator.base_twin_exposure) == len(world.canaries)


def test_the_cap_is_the_most_rounds_any_user_entered() -> None:
    world = CW.make_continual_world(CW.ContinualSpec(sites=3, rounds=3, facts_per_site_per_round=2,
                                                   users_per_fact=2, returning_share=1.0,
                                                   general_tasks=4, guard_tasks=4))
    assert most_rounds_entered(world, 0) == 1
    assert 2 <= most_rounds_entered(world, 2) <= 3  # returning users come back


def test_without_dp_no_arm_reports_an_epsilon() -> None:
    world = CW.make_continual_world(CW.ContinualSpec(sites=3, rounds=2, facts_per_site_per_round=1,
                                                   users_per_fact=2, general_tasks=4,
                                                   guard_tasks=4))
    assert in_process_epsilon(ContinualConfig(dp=False), 2) is None
    assert capped_epsilon(ContinualConfig(dp=False), world, 2) is None
    with_dp = ContinualConfig(sites=3, rounds=2)
    composed = in_process_epsilon(with_dp, 2)
    capped = capped_epsilon(with_dp, world, 2)
    assert composed > in_process_epsilon(with_dp, 1) > 0
    # a cap of K rounds never costs more than composing every round
    assert capped["max_rounds"] <= 2 and capped["epsilon"] <= composed + 1e-9


def test_impossible_settings_are_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--sites 2"):
        ContinualConfig(sites=2)
    with pytest.raises(ValueError, match="centralised"):
        ContinualConfig(arms=("centralised",))
    with pytest.raises(ValueError, match="users_per_fact"):
        ContinualConfig(users_per_fact=1)
    assert ContinualConfig(dp=False).privacy_unit == "session"
    with pytest.raises(ValueError, match="--participation-cap -1"):
        ContinualConfig(participation_cap=-1)
    with pytest.raises(ValueError, match="--server-step-units -5"):
        ContinualConfig(server_step_units=-5)
    with pytest.raises(ValueError, match="--targets q_proj: use one or more of gate_proj"):
        ContinualConfig(adapter_targets=("q_proj",))
    # Refused at the edge, before any process starts: the names no fact uses run out.
    with pytest.raises(ValueError, match=r"control_canaries=400: .* only \d+ are left"):
        ContinualConfig(control_canaries=400)


def test_the_adapters_targets_reach_the_fleet_from_the_command_line(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from fleetmind.sim.bench import continual

    class RanError(Exception):
        pass

    def capture(cfg: ContinualConfig) -> None:
        raise RanError(cfg)

    monkeypatch.setattr(continual, "run", capture)
    parser = argparse.ArgumentParser()
    add_continual_command(parser.add_subparsers(dest="action"))
    configs = []
    for argv in (["continual", "--out", "x"],
                 ["continual", "--out", "x", "--targets", "gate_proj, down_proj",
                  "--server-step-units", "0", "--participation-cap", "0",
                  "--noise-seed", "7"]):
        args = parser.parse_args(argv)
        with pytest.raises(RanError) as ran:
            args.run(args)
        configs.append(ran.value.args[0])
    default, chosen = configs[0].fleet(), configs[1].fleet()
    # The defaults are the measured ones (docs/continual.md): every MLP layer at rank 4, the
    # step scaled past 117 units a round, each user in one round.
    assert default.adapter_targets == ("gate_proj", "up_proj", "down_proj")
    assert default.rank == 4 and default.server_step_units == 117
    assert default.privacy["participation_cap"] == 1
    assert chosen.adapter_targets == ("gate_proj", "down_proj")
    assert chosen.server_step_units is None and chosen.privacy["participation_cap"] is None
    # Fresh noise unless asked (a seeded run repeats: the slow test below).
    assert default.noise_seed is None and chosen.noise_seed == 7


def test_an_enforced_cap_reaches_the_fleet_and_bounds_the_accounting() -> None:
    world = CW.make_continual_world(CW.ContinualSpec(sites=3, rounds=3, facts_per_site_per_round=2,
                                                   users_per_fact=2, returning_share=1.0,
                                                   general_tasks=4, guard_tasks=4))
    capped = ContinualConfig(sites=3, rounds=3, participation_cap=1)
    settings = capped.fleet()
    assert settings.privacy["participation_cap"] == 1  # the aggregator and every site get K
    uncapped = ContinualConfig(sites=3, rounds=3, participation_cap=0)
    assert uncapped.fleet().privacy["participation_cap"] is None
    assert most_rounds_entered(world, 2) >= 2  # without the cap some user entered twice
    one = capped_epsilon(capped, world, 3)
    assert one["max_rounds"] == 1
    assert one["epsilon"] == pytest.approx(in_process_epsilon(capped, 1))  # one round's
    # The in-process arms hold users at the cap too, so their epsilon is the capped one;
    # without a cap it composes every round.
    assert arm_epsilon(capped, world, 3) == pytest.approx(one["epsilon"])
    assert arm_epsilon(uncapped, world, 3) == pytest.approx(in_process_epsilon(uncapped, 3))
    assert arm_epsilon(uncapped, world, 3) > one["epsilon"]
    no_dp = ContinualConfig(dp=False, participation_cap=1).privacy()
    assert no_dp.get("participation_cap") is None  # no DP: nothing to cap


def test_the_command_is_registered_with_the_bench_group() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_continual_command(parser.add_subparsers(dest="action"))
    args = parser.parse_args(["continual", "--out", "x", "--sites", "3", "--arms", "oracle",
                              "--no-dp", "--users-per-fact-sweep", "2,4"])
    assert (args.sites, args.arms, args.dp, args.users_per_fact_sweep) == (3, "oracle", False,
                                                                          "2,4")


def _check_rounds(rows: list[dict], rounds: int, dp: bool) -> None:
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))
    for row in rows:
        assert all(key in row for key in ROUND_KEYS), sorted(set(ROUND_KEYS) - set(row))
        assert isinstance(row["facts_known"], int)
        assert isinstance(row["recovery_strict"], float)
        assert set(row["recovery_other_forms"]) == set(W.OTHER_FORMS)
        assert all(isinstance(v, float) for v in row["recovery_other_forms"].values())
        assert row["retention_first_round"] is None or \
            isinstance(row["retention_first_round"], float)
        for key in ("forgetting_points", "canary_exposure_bits",
                    "repeated_canary_exposure_bits", "control_canary_exposure_bits",
                    "canary_exposure_over_twins_bits",
                    "repeated_canary_exposure_over_twins_bits"):
            assert isinstance(row[key], float), key
        assert (row["epsilon_per_unit"] is None) is (not dp)
    known = [r["facts_known"] for r in rows]
    assert known == sorted(known) and known[0] < known[-1]  # knowledge keeps arriving


def test_a_reduced_run_writes_every_key_for_the_fleet_and_every_arm(tmp_path: Path) -> None:
    cfg = ContinualConfig(out=tmp_path / "continual", **SMALL)
    run(cfg)
    results = json.loads((cfg.out / RESULTS).read_text())
    config = results["config"]
    assert (config["sites"], config["facts_per_site_per_round"], config["rounds"],
            config["users_per_fact"], config["privacy_unit"]) == (3, 1, 2, 2, "user")
    assert isinstance(results["seconds"], float) and results["complete"] is True
    _check_rounds(results["rounds"], 2, dp=True)
    assert results["rounds"][0]["facts_known"] == 3  # one new fact at each of three sites
    assert results["rounds"][-1]["version"] == 2
    assert set(results["arms"]) == set(ARMS)
    for name in ARMS:
        _check_rounds(results["arms"][name], 2, dp=name != "oracle")
    assert results["arms"]["oracle"][0]["epsilon_per_unit"] is None  # no DP: the ceiling
    assert (cfg.out / PLOT).stat().st_size > 0


def test_an_arm_that_fails_or_dies_stops_the_run_naming_it(tmp_path: Path) -> None:
    """The arms run in processes of their own: a failure or a dead process is an error that
    names the arm, never a wait without end."""
    import multiprocessing

    arms = ArmProcesses(ContinualConfig(out=tmp_path, arms=(), **SMALL), None, [])  # type: ignore[arg-type]
    assert arms.rows(0) == []
    arms.delivered = {"sft": 0, "fedit": 0, "oracle": 0}
    row = {"round": 1}
    arms.queue.put(("sft", row, 2.5))
    assert arms.rows(5.0) == [("sft", row, 2.5)]
    arms.queue.put(("fedit", None, "ValueError: no sessions"))
    with pytest.raises(RuntimeError, match="the fedit arm failed: ValueError: no sessions"):
        arms.rows(5.0)
    ended = multiprocessing.get_context("spawn").Process(target=abs, args=(-1,))
    ended.start()
    ended.join()
    arms.processes = {"oracle": ended}
    with pytest.raises(RuntimeError, match="the oracle arm's process ended"):
        arms.rows(0.1)  # one round of two delivered
    arms.delivered["oracle"] = SMALL["rounds"]
    assert arms.rows(0.1) == []  # every round delivered: its process ending is no error
    arms.stop()


def test_the_arms_left_once_the_fleet_is_done_share_the_cores(tmp_path: Path,
                                                               monkeypatch) -> None:
    """Each arm starts on one thread; once the fleet's sites are done, the arms still running
    share the machine's cores, so the last one (FedIT) runs on all of them."""
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    arms = ArmProcesses(ContinualConfig(out=tmp_path, arms=(), **SMALL), None, [])  # type: ignore[arg-type]
    assert arms.threads.value == 1
    arms.delivered = {"sft": 0, "fedit": 0, "oracle": 0}
    assert arms.share_cores() == 1 and arms.threads.value == 1  # three arms, two cores
    arms.delivered = {"sft": SMALL["rounds"], "fedit": 1, "oracle": SMALL["rounds"]}
    assert arms.share_cores() == 2 and arms.threads.value == 2  # FedIT alone: both
    arms.stop()


@pytest.mark.slow
def test_a_run_with_seeded_noise_repeats_and_another_seed_does_not(tmp_path: Path) -> None:
    """The sites' DP noise is what varies between runs of the same settings: seeded, the
    fleet publishes the same adapter up to float rounding in the distillation (6e-8 seen,
    against B's values up to 0.7); another seed, another noise draw."""
    from safetensors.numpy import load_file

    def published(name: str, noise_seed: int) -> dict:
        cfg = ContinualConfig(out=tmp_path / name, arms=(), noise_seed=noise_seed,
                              **{**SMALL, "rounds": 1})
        run(cfg)
        version = cfg.out / "fleet" / "aggregator" / "versions" / "00000001"
        return load_file(version / "adapter_model.safetensors")

    first, again, other = published("a", 7), published("b", 7), published("c", 8)
    assert first.keys() == again.keys() == other.keys()
    assert max(float(abs(first[k] - again[k]).max()) for k in first) < 1e-6
    assert max(float(abs(first[k] - other[k]).max()) for k in first) > 1e-2


@pytest.mark.slow
def test_without_dp_epsilon_per_unit_is_null(tmp_path: Path) -> None:
    cfg = ContinualConfig(out=tmp_path / "continual", dp=False, arms=("sft",), **SMALL)
    run(cfg)
    results = json.loads((cfg.out / RESULTS).read_text())
    assert results["config"]["privacy_unit"] == "session"
    _check_rounds(results["rounds"], 2, dp=False)
    _check_rounds(results["arms"]["sft"], 2, dp=False)
    assert results["arms"]["oracle"] is None and results["arms"]["fedit"] is None


def test_the_users_per_fact_curve_collects_each_runs_last_round(tmp_path, monkeypatch) -> None:
    from fleetmind.sim.bench import continual

    def fake_run(cfg: ContinualConfig, console: object = None) -> dict:
        assert cfg.arms == () and cfg.out.parent == tmp_path / "sweep"
        share = cfg.users_per_fact / 16
        return {"rounds": [{"recovery_strict": share, "recovery_strict_earlier_rounds": share,
                            "recovery_other_forms": {form: share / 2 for form in W.OTHER_FORMS},
                            "forgetting_points": 0.0, "epsilon_per_unit": 9.2}]}

    monkeypatch.setattr(continual, "run", fake_run)
    curve = continual.users_per_fact_curve(ContinualConfig(out=tmp_path, sites=3), [2, 4, 8, 16])
    assert [p["users_per_fact"] for p in curve["points"]] == [2, 4, 8, 16]
    assert curve["points"][-1]["recovery_strict"] == 1.0
    assert json.loads((tmp_path / continual.SWEEP).read_text())["points"] == curve["points"]
    assert (tmp_path / continual.SWEEP_PLOT).stat().st_size > 0
