"""The Flower app's settings: Flower's run config (and, per SuperNode, its node config),
typed and validated once, here.

Run config keys are those of `flower/app/pyproject.toml` `[tool.flwr.app.config]`; the
defaults below are the same values, so an in-process simulation (which has no run config)
and `flwr run` behave alike.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, cast

from fleetmind.aggregation.dp import PRIVACY_UNITS, PrivacyUnit
from fleetmind.aggregation.manifest import DEFAULT_ALPHA, DEFAULT_RANK
from fleetmind.aggregation.quantize import RING_BITS
from fleetmind.client.distill_config import DistillConfig, per_unit_config

# A site's OPSD defaults are the site agent's (client.distill_config.per_unit_config: SGD, the
# settings the learning benchmarks found; docs/measurements.md).
_SITE_DISTILL = per_unit_config()

# Flower's simulation engine numbers its virtual SuperNodes with this node-config key.
PARTITION_ID = "partition-id"


@dataclass(frozen=True)
class FlowerRun:
    """world: a folder from `fleetmind model world` (sessions per site, spec.json, probes).
    model: a local Hugging Face model folder (required to run; the simulator names its toy
    model).
    evaluate: "module:function", the ServerApp's evaluation after every round ("" = none);
    see `flower/server_app.py` `Evaluation` (the toy world's: `fleetmind.sim.flower_run`).
    state: where each site keeps its store and updates between runs (Flower's
    `Context.state` does not survive a run), one folder per site.
    out: where the ServerApp writes result.json, the merged B and the PEFT adapter.
    sites: SuperNodes to wait for before round 1. rounds: server rounds.
    server-learning-rate: eta in B_new = B + eta * mean(dB) (aggregation/merge.py).
    server-step-units: the privacy units a round sums at which eta holds; a round summing
    more steps this / units as far, as the fleet's aggregator does
    (privacy.server_step_units, merge.cohort_step); 0 = eta every round.
    secure-aggregation: fleetmind's SecAgg+ (aggregation/secagg) in Flower messages, so
    the ServerApp sees masked vectors and the cohort sum only (flower/secure.py); needs
    min-cohort >= 3 sites. false: each site replies with its B in the clear.
    dp-clip-norm: C; each site clips each privacy-unit (session, user or site) to it, as
    the site agent does (client.contribution.clip_per_unit); 0 = no clipping.
    dp-noise-multiplier: z of the cohort sum, split among the sites as discrete Gaussian
    noise in the ring (aggregation/dp.py, distributed mode); needs secure aggregation.
    participation-cap: K, the most rounds one privacy unit enters (0 = none); epsilon is
    then per unit over K rounds (accountant.epsilon_per_unit).
    epsilon-budget: the most epsilon (at dp-delta) the run may spend, per unit over its
    life under a participation cap, else over every round composed; the ServerApp refuses
    a round the budget cannot pay (accountant.Budget, the fleet aggregator's; its default,
    privacy.epsilon_budget, too). Unused without noise: there is no finite epsilon.
    fixed-point-clip, ring-bits: the ring code (aggregation/quantize.py) of each site's
    clipped delta. dropout-rate: sizes the SecAgg+ neighbour graph (graph.py).
    min-cohort: the fewest sites whose sum the ServerApp may unmask.
    steps ... distill-optimizer: the OPSD budget per site and round (client/distill_config.py;
    the defaults are the site agent's, client.distill_config.per_unit_config).
    targets: the layers LoRA adapts: mlp (each block's MLP), peft (PEFT's default for the
    family), all-linear, or comma-separated module names (client/lora.py).
    device, dtype: where each site's model runs and in what (cpu, cuda, cuda:N, mps;
    float32, bfloat16, float16 or fp32, bf16, fp16); LoRA stays float32."""

    world: str = "out/world"
    model: str = ""
    evaluate: str = ""
    state: str = "out/flower/state"
    out: str = "out/flower"
    sites: int = 3
    rounds: int = 1
    fraction_train: float = 1.0
    server_learning_rate: float = 1.0
    server_step_units: int = 0
    lora_seed: int = 7
    lora_rank: int = DEFAULT_RANK
    lora_alpha: float = DEFAULT_ALPHA
    targets: str = "mlp"
    device: str = "cpu"
    dtype: str = "float32"
    secure_aggregation: bool = True
    min_cohort: int = 3
    privacy_unit: str = "session"
    dp_clip_norm: float = 0.0
    dp_noise_multiplier: float = 0.0
    dp_delta: float = 1e-5
    participation_cap: int = 0
    epsilon_budget: float = 10.0
    fixed_point_clip: float = 4.0
    ring_bits: int = 32
    dropout_rate: float = 0.1
    steps: int = _SITE_DISTILL.steps
    prompts_per_step: int = _SITE_DISTILL.prompts_per_step
    samples_per_prompt: int = _SITE_DISTILL.samples_per_prompt
    dreams_per_lesson: int = _SITE_DISTILL.dreams_per_lesson
    guard_prompts_per_step: int = _SITE_DISTILL.guard_prompts_per_step
    distill_lr: float = _SITE_DISTILL.lr
    distill_optimizer: str = _SITE_DISTILL.optimizer
    torch_threads: int = 1
    round_timeout: float = 3600.0

    def __post_init__(self) -> None:
        problems = []
        if self.server_step_units < 0:
            problems.append(f"server-step-units={self.server_step_units} must be >= 0 "
                            "(0 = the same step every round)")
        for name in ("sites", "rounds", "lora_rank", "torch_threads"):
            if getattr(self, name) < 1:
                problems.append(f"{_key(name)}={getattr(self, name)} must be >= 1")
        if not 0 < self.fraction_train <= 1:
            problems.append(f"fraction-train={self.fraction_train} must be in (0, 1]")
        for name in ("server_learning_rate", "lora_alpha", "round_timeout", "epsilon_budget"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                problems.append(f"{_key(name)}={value} must be finite and > 0")
        if self.dp_clip_norm < 0 or self.dp_noise_multiplier < 0:
            problems.append("dp-clip-norm and dp-noise-multiplier must be >= 0 (0 = no DP)")
        if self.dp_noise_multiplier > 0 and self.dp_clip_norm == 0:
            problems.append("dp-noise-multiplier needs dp-clip-norm > 0: noise is calibrated "
                            "to the clipping norm")
        if self.dp_noise_multiplier > 0 and not self.secure_aggregation:
            problems.append("dp-noise-multiplier needs secure-aggregation: the noise is split "
                            "among the sites, and only masking hides each site's share")
        if self.secure_aggregation and not 3 <= self.min_cohort <= round(
                self.fraction_train * self.sites):
            problems.append(f"min-cohort={self.min_cohort} must be >= 3 (a sum of two sites "
                            "shows each to the other) and <= the sites sampled per round")
        if self.privacy_unit not in PRIVACY_UNITS:
            problems.append(f"privacy-unit={self.privacy_unit!r} must be one of "
                            f"{', '.join(PRIVACY_UNITS)}")
        if self.participation_cap < 0:
            problems.append(f"participation-cap={self.participation_cap} must be >= 0 "
                            "(0 = no cap)")
        if self.ring_bits not in RING_BITS:
            problems.append(f"ring-bits={self.ring_bits} must be one of {RING_BITS}")
        if not (math.isfinite(self.fixed_point_clip) and self.fixed_point_clip > 0):
            problems.append(f"fixed-point-clip={self.fixed_point_clip} must be finite and > 0")
        if not 0 <= self.dropout_rate < 0.5:
            problems.append(f"dropout-rate={self.dropout_rate} must be in [0, 0.5)")
        if not 0 < self.dp_delta < 1:
            problems.append(f"dp-delta={self.dp_delta} must be in (0, 1)")
        if not self.lora_targets:
            problems.append(f"targets={self.targets!r} must be mlp, peft, all-linear or "
                            "comma-separated module names")
        module, colon, function = self.evaluate.partition(":")
        if self.evaluate and not (module and colon and function.isidentifier()):
            problems.append(f"evaluate={self.evaluate!r} must be 'module:function' "
                            "(or empty: no evaluation)")
        try:
            self.distill  # noqa: B018 -- DistillConfig validates the OPSD settings
        except ValueError as error:
            problems.append(str(error))
        if problems:
            raise ValueError("invalid fleetmind Flower run config: " + "; ".join(problems))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> FlowerRun:
        """From a Flower run config (hyphenated keys, as in pyproject.toml). Unknown keys are
        refused, so a typo in `--run-config` is not silently ignored."""
        known = {_key(f.name): f for f in fields(cls)}
        unknown = sorted(set(config) - set(known))
        if unknown:
            raise ValueError(f"unknown fleetmind Flower run config keys {unknown}; known: "
                             f"{sorted(known)}")
        values = {}
        for key, value in config.items():
            kind = type(getattr(cls, known[key].name))
            if kind is bool and not isinstance(value, bool):
                # bool("false") is True: a switch must come as a TOML boolean.
                raise ValueError(f"{key}={value!r} must be true or false")
            values[known[key].name] = kind(value)
        return cls(**values)

    def as_config(self) -> dict[str, Any]:
        return {_key(f.name): getattr(self, f.name) for f in fields(self)}

    @property
    def distill(self) -> DistillConfig:
        # The site agent's settings with this run's keys over them, so a field the run
        # config does not expose follows the site agent's too.
        return per_unit_config(steps=self.steps, lr=self.distill_lr,
                               optimizer=self.distill_optimizer,
                               prompts_per_step=self.prompts_per_step,
                               samples_per_prompt=self.samples_per_prompt,
                               dreams_per_lesson=self.dreams_per_lesson,
                               guard_prompts_per_step=self.guard_prompts_per_step,
                               device=self.device, dtype=self.dtype)

    @property
    def lora_targets(self) -> str | list[str]:
        """`targets` as client.lora.attach_lora takes it: a named choice, or a list."""
        if self.targets in ("mlp", "peft", "all-linear"):
            return self.targets
        return [name.strip() for name in self.targets.split(",") if name.strip()]

    @property
    def unit(self) -> PrivacyUnit:
        """The privacy unit each clip bounds: `privacy-unit`, or "site" without clipping
        (the site then distils its sessions together, as one delta)."""
        return cast(PrivacyUnit, self.privacy_unit) if self.dp_clip_norm > 0 else "site"

    def model_path(self) -> Path:
        if not self.model:
            raise ValueError("the Flower run config names no model: pass --run-config "
                             "'model=\"PATH\"' (a local Hugging Face model folder)")
        return Path(self.model)


@dataclass(frozen=True)
class SiteNode:
    """What one SuperNode is: its site name, its sessions file and its state folder."""

    name: str
    sessions: Path
    state: Path

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any], run: FlowerRun) -> SiteNode:
        """A deployment names them (`flower-supernode --node-config 'site="a"
        sessions="/data/a.jsonl" state="/var/lib/a"'`); a virtual SuperNode of the
        simulation engine has only its partition id, the index of its site in the world."""
        if "sessions" in node_config:
            name = str(node_config.get("site", Path(str(node_config["sessions"])).parent.name))
            state = Path(str(node_config.get("state", Path(run.state) / name)))
            return cls(name, Path(str(node_config["sessions"])), state)
        if PARTITION_ID not in node_config:
            raise ValueError(f"node config {dict(node_config)} names no sessions file: start "
                             "the SuperNode with --node-config 'sessions=\"PATH\"'")
        names = json.loads((Path(run.world) / "spec.json").read_text())["sites"]
        index = int(node_config[PARTITION_ID])
        if not 0 <= index < len(names):
            raise ValueError(f"partition-id={index}, but world {run.world} has "
                             f"{len(names)} sites")
        name = names[index]
        return cls(name, Path(run.world) / "sites" / name / "sessions.jsonl",
                   Path(run.state) / name)


def _key(name: str) -> str:
    return name.replace("_", "-")
