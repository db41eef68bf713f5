"""The in-process fleet: its FedIT merge trains A as well as B and averages each factor, so
its merged update is not the mean of the sites' B·A products; its exact merge keeps A frozen
(fleetmind's own adapter), with OPSD or the SFT baseline."""

from __future__ import annotations

import numpy as np
from support.toy_fleet import FAST

from fleetmind.client import lora
from fleetmind.client.model import load_model
from fleetmind.client.store import Session
from fleetmind.sim import world as W
from fleetmind.sim.fedit import InProcessFleet


def test_adapter_disabled_keeps_a_frozen_or_trainable_as_it_was(toy_model_dir) -> None:
    model, _ = load_model(toy_model_dir)
    peft_model = lora.attach_lora(model, seed=1)
    with lora.adapter_disabled(peft_model):
        pass
    assert len(lora.trainable_parameters(peft_model)) == 6  # B of 6 modules
    lora.freeze_a(peft_model, frozen=False)
    with lora.adapter_disabled(peft_model):
        pass
    assert len(lora.trainable_parameters(peft_model)) == 12


def test_fedit_round_moves_both_factors_by_their_means(toy_model_dir) -> None:
    world = W.make_world(W.WorldSpec(seed=0, sites=2, facts_per_site=1, canaries_per_site=0))
    guard = [W.task_prompt(task) for task in world.guard[:8]]
    arm = InProcessFleet(toy_model_dir, FAST, guard, frozen_a_seed=3, rank=8,
                         targets=lora.MLP_TARGETS, clip_norm=1e3, privacy_unit="session",
                         noise_multiplier=0.0, server_learning_rate=2.0, merge="fedit")
    genesis_a = {name: a.copy() for name, a in arm.global_a.items()}
    arm.round([[Session.from_dict(s) for s in site.sessions] for site in world.sites])
    moved_a = max(float(np.abs(arm.global_a[n] - genesis_a[n]).max()) for n in genesis_a)
    moved_b = max(float(np.abs(b).max()) for b in arm.global_b.values())
    assert moved_a > 0 and moved_b > 0
    # what the arm serves is what it merged
    assert all(np.array_equal(lora.get_b(arm.model, "A")[n], arm.global_a[n]) for n in genesis_a)


def test_exact_merge_keeps_a_frozen_with_opsd_and_the_sft_baseline(toy_model_dir) -> None:
    from dataclasses import replace

    world = W.make_world(W.WorldSpec(seed=0, sites=2, facts_per_site=1, canaries_per_site=0))
    guard = [W.task_prompt(task) for task in world.guard[:8]]
    for method in ("opsd", "sft_transcript"):
        arm = InProcessFleet(toy_model_dir, replace(FAST, method=method), guard,
                             frozen_a_seed=3, rank=8, targets=("down_proj",), clip_norm=1e3,
                             privacy_unit="session", noise_multiplier=0.0,
                             server_learning_rate=2.0, merge="exact")
        genesis_a = {name: a.copy() for name, a in arm.global_a.items()}
        arm.round([[Session.from_dict(s) for s in site.sessions] for site in world.sites])
        assert all(np.array_equal(arm.global_a[n], genesis_a[n]) for n in genesis_a)
        assert all(np.array_equal(lora.get_b(arm.model, "A")[n], genesis_a[n])
                   for n in genesis_a)
        assert max(float(np.abs(b).max()) for b in arm.global_b.values()) > 0, method


def test_the_arms_hold_a_user_at_the_cap_as_the_fleets_sites_do(toy_model_dir) -> None:
    """With a cap of one round, a returning user's sessions stay out of the arm's later
    round (as a site holds them) while a new user's enter; without a cap, they enter."""
    from dataclasses import replace

    world = W.make_world(W.WorldSpec(seed=0, sites=1, facts_per_site=2, canaries_per_site=0))
    raw = [Session.from_dict(s) for s in world.sites[0].sessions[:3]]
    first = [replace(raw[0], user="alice"), replace(raw[1], user="bob")]
    returning = [replace(raw[2], user="alice")]
    new = [replace(raw[2], id="later", user="carol")]
    for cap in (1, None):
        arm = InProcessFleet(toy_model_dir, replace(FAST, method="sft_transcript"), [],
                             frozen_a_seed=3, rank=4, targets=("down_proj",), clip_norm=1e3,
                             privacy_unit="user", noise_multiplier=0.0,
                             server_learning_rate=1.0, merge="exact", participation_cap=cap)
        arm.round([first])
        before = {name: b.copy() for name, b in arm.global_b.items()}
        arm.round([returning])
        moved = any(not np.array_equal(arm.global_b[n], before[n]) for n in before)
        assert moved is (cap is None)  # alice's second round: held at the cap only
        arm.round([new])
        assert any(not np.array_equal(arm.global_b[n], before[n]) for n in before)
        assert arm.entered == ({"alice": {1}, "bob": {1}, "carol": {3}} if cap else {})
