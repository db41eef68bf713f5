"""Shared settings for tests that run whole sites on the toy model against an aggregator."""

from pathlib import Path

from fleetmind.client.distill_config import DistillConfig
from fleetmind.client.model import base_model_hash
from fleetmind.server.config import CohortPolicy, PrivacyPolicy, ServerConfig
from fleetmind.server.versions import AdapterSpec, TargetModule
from fleetmind.sim.basemodel import toy_model_path

# The toy model's MLPs (hidden 128, intermediate 512), as client/lora.py adapts them.
TOY_MODULES = tuple(
    TargetModule(f"model.layers.{layer}.mlp.{name}", *shape)
    for layer in (0, 1)
    for name, shape in (("gate_proj", (128, 512)), ("up_proj", (128, 512)),
                        ("down_proj", (512, 128))))
# The toy model's own hash: sites refuse a version whose manifest names another model.
TOY_HASH = base_model_hash(toy_model_path(build=False))
TOY_SPEC = AdapterSpec("toy", TOY_HASH, TOY_MODULES, frozen_a_seed=7, rank=8, alpha=16.0)
# A consolidation small enough for a test: the round, not the learning, is under test.
FAST = DistillConfig(steps=2, dreams_per_lesson=2, prompts_per_step=2, samples_per_prompt=2,
                     guard_prompts_per_step=4)


def toy_server_config(data: Path) -> ServerConfig:
    """A plaintext aggregator on 127.0.0.1:0 for three toy-model sites, exactly (the
    deadlines are generous: consolidation runs first)."""
    return ServerConfig(
        data_dir=data, listen="127.0.0.1:0", insecure=True,
        cohort=CohortPolicy(min_size=3, target_size=3, deadline_s=120, phase_deadline_s=60),
        privacy=PrivacyPolicy(clip_norm=1.0, noise_multiplier=1.0, epsilon_budget=10.0),
        adapter=TOY_SPEC)
