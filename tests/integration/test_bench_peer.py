"""The consolidation benchmark's peer, TRL's SDFTTrainer, trains our adapter (skipped when
the `bench` extra, which brings trl, is not installed)."""

import numpy as np
import pytest

pytest.importorskip("trl")

from fleetmind.aggregation.frozen_a import frozen_a
from fleetmind.client import lora
from fleetmind.client.distill_config import AUTO_TOP_K_TOKENS, DistillConfig, resolve_top_k
from fleetmind.client.store import Session
from fleetmind.sim import world as W
from fleetmind.sim.bench.consolidate import LORA_SEED
from fleetmind.sim.bench.peer_sdft import run_peer


def test_peer_trains_only_b_and_reports_its_cost(toy_model_dir, tmp_path) -> None:
    world = W.make_world(W.WorldSpec(seed=0, sites=1))
    sessions = [Session.from_dict(s) for s in world.sites[0].sessions[:2]]
    # run_peer also checks that the peer's student and teacher read ours' exact tokens.
    model, _, cost = run_peer(toy_model_dir, sessions, DistillConfig(steps=2), tmp_path)
    assert any(np.abs(b).max() > 0 for b in lora.get_b(model).values()), "B never moved"
    for name, layer in lora.lora_layers(model).items():
        a = layer.lora_A["default"].weight.detach().numpy()
        assert np.array_equal(a, frozen_a(LORA_SEED, name, *a.shape)), f"A moved in {name}"
    assert cost["steps"] == 4  # 2 steps in each of the two halves, as ours
    for key in ("tokens", "seconds", "tokens_per_s", "peak_rss_mb", "distilled_tokens_per_s"):
        assert cost[key] > 0, key
    # Its loss saw every sampled completion (16 a step, at least one token each, at most
    # max_new_tokens), counted as ours counts them.
    samples = cost["steps"] * 4 * 4
    assert samples <= cost["distilled_tokens"] <= samples * 12


def test_peer_distils_over_the_top_k_ours_resolves_for_the_vocabulary(tmp_path) -> None:
    from fleetmind.sim.bench.peer_sdft import sdft_config

    auto = DistillConfig()
    for vocabulary, mode, top_k in ((888, "full_logits", None),
                                    (49152, "topk_logits", AUTO_TOP_K_TOKENS)):
        resolved = resolve_top_k(auto.top_k, vocabulary)  # as run_peer does
        config = sdft_config(DistillConfig(top_k=resolved), tmp_path)
        assert config.distillation_mode == mode
        if top_k is not None:
            assert config.distillation_topk == top_k and config.distillation_add_tail
