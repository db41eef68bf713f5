"""fleetmind as a Flower app: the strategy's merge is fleetmind's exact merge, DP is
fleetmind's (clipping per privacy unit, noise split among the sites under secure
aggregation), and a simulation on Flower's engine (Ray) with a few virtual sites merges,
under secure aggregation, what the sites' deltas merge to and raises transfer accuracy."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")
pytest.importorskip("ray")

import safetensors.numpy
from flwr.app import (
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from support.flower_rounds import quantisation_bound
from support.toy_fleet import FAST, TOY_SPEC

from fleetmind.aggregation import merge
from fleetmind.aggregation.update import Update, UpdateMetadata
from fleetmind.client.store import SessionStore
from fleetmind.flower.client_app import consolidate_site
from fleetmind.flower.secure import SecureLoRAMerge
from fleetmind.flower.server_app import load_evaluation, make_strategy, privacy_spent
from fleetmind.flower.settings import FlowerRun, SiteNode
from fleetmind.flower.strategy import (
    ARRAYS,
    METRICS,
    WEIGHT,
    ExactLoRAMerge,
    b_record,
    b_tensors,
)
from fleetmind.sim import world as W
from fleetmind.sim.flower_run import simulate, toy_run, write_toy_world

APP = Path(__file__).resolve().parents[2] / "flower" / "app" / "pyproject.toml"


class FakeGrid:
    """The one thing FedAvg's sampling asks of a Grid: which nodes are connected."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def reply(to: Message, adapted: dict[str, np.ndarray], weight: float) -> Message:
    return Message(RecordDict({ARRAYS: b_record(adapted),
                               METRICS: MetricRecord({WEIGHT: weight, "sessions": 3})}),
                   reply_to=to)


def test_aggregate_train_is_fleetmind_exact_merge_of_the_sites_deltas(task_identity: None
                                                                       ) -> None:
    rng = np.random.default_rng(0)
    sent = {"layer.b": rng.normal(size=(6, 4)).astype(np.float32),
            "layer.a": rng.normal(size=(3, 4)).astype(np.float32)}
    strategy = ExactLoRAMerge(merge.FedAvg(2.0), sites=3)
    messages = list(strategy.configure_train(1, b_record(sent), ConfigRecord(),
                                             FakeGrid([11, 12, 13])))
    assert sorted(m.metadata.dst_node_id for m in messages) == [11, 12, 13]
    weights = [1.0, 0.5, 0.25]
    replies, updates = [], []
    for message, weight in zip(messages, weights, strict=True):
        adapted = {n: (b + rng.normal(size=b.shape)).astype(np.float32)
                   for n, b in b_tensors(message.content[ARRAYS]).items()}
        replies.append(reply(message, adapted, weight))
        updates.append(Update({n: adapted[n] - sent[n] for n in sent},
                              UpdateMetadata(site=f"node-{message.metadata.dst_node_id}",
                                             base_version=0, weight=weight)))
    merged, _ = strategy.aggregate_train(1, replies)
    expected, _ = merge.exact_merge(sent, *merge.weighted_delta_sum(updates), merge.FedAvg(2.0))
    got = b_tensors(merged)
    assert set(got) == set(expected)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])
    # Not a plain average of what the sites hold (Flower's FedAvg): weights and eta count.
    plain = np.mean([b_tensors(r.content[ARRAYS])["layer.b"] for r in replies], axis=0)
    assert not np.allclose(got["layer.b"], plain)


def test_the_step_shrinks_with_the_units_the_replies_declare(task_identity: None) -> None:
    """server-step-units 2: three sites declaring 2, 3 and 3 units (8) step eta x 2/8,
    as the fleet's aggregator would; without the setting, eta."""
    sent = {"b": np.zeros((2, 2), np.float32)}
    for step_units, eta in ((2, 2.0 * 2 / 8), (None, 2.0)):
        strategy = ExactLoRAMerge(merge.FedAvg(2.0), sites=3, step_units=step_units)
        messages = strategy.configure_train(1, b_record(sent), ConfigRecord(),
                                            FakeGrid([1, 2, 3]))
        replies = []
        for message, units in zip(messages, (2, 3, 3), strict=True):
            answer = reply(message, {"b": np.ones((2, 2), np.float32)}, 1.0)
            answer.content[METRICS]["units"] = units
            replies.append(answer)
        merged, _ = strategy.aggregate_train(1, replies)
        np.testing.assert_allclose(b_tensors(merged)["b"], np.full((2, 2), eta, np.float32))
    assert make_strategy(FlowerRun(server_step_units=100)).step_units == 100
    assert make_strategy(FlowerRun()).step_units is None
    with pytest.raises(ValueError, match="server-step-units=-1"):
        FlowerRun(server_step_units=-1)


def test_a_reply_that_does_not_fit_is_left_out_as_a_dropout(task_identity: None) -> None:
    sent = {"b": np.zeros((2, 2), np.float32)}
    strategy = ExactLoRAMerge(merge.FedAvg(), sites=3)
    good, wrong_shape, not_finite = strategy.configure_train(
        1, b_record(sent), ConfigRecord(), FakeGrid([1, 2, 3]))
    replies = [reply(good, {"b": np.ones((2, 2), np.float32)}, 1.0),
               reply(wrong_shape, {"b": np.ones((3, 2), np.float32)}, 1.0),
               reply(not_finite, {"b": np.full((2, 2), np.nan, np.float32)}, 1.0)]
    merged, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_array_equal(b_tensors(merged)["b"], np.ones((2, 2), np.float32))


def test_secure_aggregation_is_the_default_and_dp_noise_needs_it() -> None:
    assert isinstance(make_strategy(FlowerRun()), SecureLoRAMerge)
    plain = make_strategy(FlowerRun(secure_aggregation=False, dp_clip_norm=1.0))
    assert type(plain) is ExactLoRAMerge
    with pytest.raises(ValueError, match="dp-noise-multiplier needs secure-aggregation"):
        FlowerRun(secure_aggregation=False, dp_clip_norm=1.0, dp_noise_multiplier=1.0)
    with pytest.raises(ValueError, match="min-cohort=3 must be >= 3"):
        FlowerRun(sites=2)
    assert FlowerRun(sites=2, secure_aggregation=False).sites == 2
    # Without clipping there is no finer unit and no epsilon.
    assert FlowerRun(privacy_unit="user").unit == "site"
    assert privacy_spent(FlowerRun(), [])["epsilon_per_unit"] is None


def test_run_config_is_typed_and_refuses_unknown_keys() -> None:
    declared = tomllib.loads(APP.read_text())["tool"]["flwr"]["app"]["config"]
    # The app's pyproject and FlowerRun's defaults are one set of values.
    assert FlowerRun.from_config(declared) == FlowerRun()
    with pytest.raises(ValueError, match=r"unknown .* keys \[.stepz.\]"):
        FlowerRun.from_config({"stepz": 3})
    with pytest.raises(ValueError, match="dp-noise-multiplier needs dp-clip-norm"):
        FlowerRun(dp_noise_multiplier=1.0)
    with pytest.raises(ValueError, match="secure-aggregation='false' must be true or false"):
        FlowerRun.from_config({"secure-aggregation": "false"})


def test_targets_device_and_dtype_are_run_config_settings(toy_model_dir) -> None:
    from fleetmind.client import lora
    from fleetmind.flower.server_app import adapted_model

    run = FlowerRun.from_config({"targets": "gate_proj, up_proj", "device": "cpu",
                                 "dtype": "bf16", "model": str(toy_model_dir)})
    assert run.lora_targets == ["gate_proj", "up_proj"] and FlowerRun().lora_targets == "mlp"
    assert (run.distill.device, run.distill.dtype) == ("cpu", "bfloat16")
    with pytest.raises(ValueError, match="targets=' , '"):
        FlowerRun(targets=" , ")
    with pytest.raises(ValueError, match="device='tpu'"):
        FlowerRun(device="tpu")
    model, _ = adapted_model(FlowerRun(model=str(toy_model_dir), targets="gate_proj"))
    assert sorted(lora.get_b(model)) == [f"model.layers.{i}.mlp.gate_proj" for i in (0, 1)]


def fixed_evaluation(run: FlowerRun, model: object, tokenizer: object):
    return lambda server_round: {"round": float(server_round), "sites": float(run.sites)}


def test_the_evaluation_and_the_model_are_parameters_of_the_run_config() -> None:
    # The app knows no dataset: no evaluation unless the run config names one.
    assert load_evaluation(FlowerRun(), model=None, tokenizer=None) is None
    named = FlowerRun(sites=3, evaluate=f"{__name__}:fixed_evaluation")
    assert load_evaluation(named, model=None, tokenizer=None)(2) == {"round": 2.0, "sites": 3.0}
    with pytest.raises(ValueError, match="must be 'module:function'"):
        FlowerRun(evaluate="fleetmind.sim.flower_run")
    with pytest.raises(ValueError, match=r"evaluate='fleetmind\.nowhere:f'"):
        load_evaluation(FlowerRun(evaluate="fleetmind.nowhere:f"), model=None, tokenizer=None)
    with pytest.raises(ValueError, match="names no model"):
        FlowerRun().model_path()


# ---- the simulation engine ----------------------------------------------------------------

SITES = 3
PYTHONPATH = os.environ.get("PYTHONPATH")


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory) -> tuple[FlowerRun, dict]:
    root = tmp_path_factory.mktemp("flower-sim")
    world = write_toy_world(root / "world", SITES, facts_per_site=2, seed=3)
    # The toy base model and the transfer evaluation: the simulator's, not the app's.
    run = toy_run(FlowerRun(world=str(world), state=str(root / "state"), out=str(root / "out"),
                            sites=SITES, steps=24, server_learning_rate=SITES / 2,
                            lora_seed=TOY_SPEC.frozen_a_seed, lora_rank=TOY_SPEC.rank,
                            lora_alpha=TOY_SPEC.alpha, prompts_per_step=FAST.prompts_per_step,
                            samples_per_prompt=FAST.samples_per_prompt,
                            dreams_per_lesson=FAST.dreams_per_lesson,
                            guard_prompts_per_step=FAST.guard_prompts_per_step))
    result = simulate(run)
    # Flower's Ray backend rewrites PYTHONPATH; later tests' subprocesses must not see it.
    assert os.environ.get("PYTHONPATH") == PYTHONPATH
    return run, result


def test_simulation_merges_under_secure_aggregation_what_the_sites_deltas_merge_to(
        simulated: tuple[FlowerRun, dict]) -> None:
    run, result = simulated
    assert run.secure_aggregation
    assert result["secure_rounds"]["1"] == {"contributors": SITES, "dropped": 0}
    names = [site.name for site in W.read_world(Path(run.world)).sites]
    updates = [Update.from_bytes((Path(run.state) / name / "round-0001-update.safetensors")
                                 .read_bytes()) for name in names]
    assert sorted(u.metadata.site for u in updates) == sorted(names)
    zero = {name: np.zeros_like(t) for name, t in updates[0].tensors.items()}
    expected, _ = merge.exact_merge(zero, *merge.weighted_delta_sum(updates),
                                    merge.FedAvg(run.server_learning_rate))
    got = safetensors.numpy.load_file(str(Path(run.out) / "global_b.safetensors"))
    assert set(got) == set(expected)
    bound = quantisation_bound(run, SITES)
    for name in expected:
        assert np.abs(got[name] - expected[name]).max() <= bound
    assert any(np.abs(t).max() > 100 * bound for t in got.values())


def test_simulation_raises_transfer_accuracy_above_the_base_model(
        simulated: tuple[FlowerRun, dict]) -> None:
    run, result = simulated
    facts = len(W.read_world(Path(run.world)).facts())
    assert result["base_transfer_accuracy"] * facts <= 1  # at most one guess at chance (1/40)
    assert result["transfer_accuracy"] > result["base_transfer_accuracy"]
    assert (Path(run.out) / "adapter" / "adapter_config.json").is_file()


def test_sites_remember_on_disk_which_sessions_they_consolidated(
        simulated: tuple[FlowerRun, dict]) -> None:
    run, _ = simulated
    for site in W.read_world(Path(run.world)).sites:
        with SessionStore(Path(run.state) / site.name) as store:
            # The store keeps one copy of sessions with identical messages.
            assert 0 < len(store) <= len(site.sessions)
            assert store.unconsumed() == []
            assert all(store.consolidations_using(session.id) for session in store)


def test_a_site_with_nothing_new_replies_with_an_error_not_a_stale_delta(
        simulated: tuple[FlowerRun, dict], task_identity: None) -> None:
    run, _ = simulated
    site = SiteNode.from_node_config({"partition-id": 1}, run)
    assert site.name == "site-01" and site.state == Path(run.state) / "site-01"
    merged = safetensors.numpy.load_file(str(Path(run.out) / "global_b.safetensors"))
    message = Message(RecordDict({ARRAYS: b_record(merged),
                                  "config": ConfigRecord({"server-round": 2})}),
                      dst_node_id=1, message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    answer = consolidate_site(message, run, site, 2, context)
    assert answer.has_error()
    assert "nothing new" in answer.error.reason
    assert not (site.state / "round-0002-update.safetensors").exists()
