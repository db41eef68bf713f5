"""`fleetmind bench continual --out DIR`: knowledge arriving over rounds (`sim.world`'s
continual world), learned by a fleet on the real services (`sim.fleet`: loopback gRPC,
secure aggregation, DP) and, in the same run, by three arms, each in a process of its own:

    oracle  every round's sessions at one place, distilled jointly (`consolidate_sessions`,
            per_session=False) from its own B, no clipping, no noise: the ceiling of what
            the distiller can store
    fedit   the fleet's sessions, per-unit distillation, clipping and noise, but A trains
            and A and B are averaged apart (`sim.fedit`, merge="fedit")
    sft     the SFT baseline: sites fine-tune on transcripts, merged exactly
            (`sim.fedit`, merge="exact", method "sft_transcript")

Round r (1..R) hands every site the sessions its users left in the world's round r-1, runs
the round, and measures each arm's model on every fact said so far (`facts_known`):
closed-book recovery in the sessions' form and in each other form (as a fraction of the
base model's in-context accuracy on those facts in that form), retention of round 1's facts
relative to their best so far, forgetting of the base model's in-context skill (points),
exposure of once-said and repeated canaries (bits over the base model) and epsilon per
privacy unit. DIR/continual.json and DIR/continual.png; docs/continual.md says what each
number means.

`add_continual_command(sub)` adds `continual` to the bench group's subparsers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

from fleetmind.aggregation.dp import PRIVACY_UNITS
from fleetmind.client.lora import MLP_TARGETS
from fleetmind.runtime.durable import atomic_write
from fleetmind.sim import continual_world as CW
from fleetmind.sim import world as W
from fleetmind.sim.evaluation import recovery, retention

RESULTS = "continual.json"
PLOT = "continual.png"
SWEEP = "users_per_fact.json"
SWEEP_PLOT = "users_per_fact.png"
ARMS = ("oracle", "fedit", "sft")
ROUND_KEYS = ("round", "facts_known", "recovery_strict", "recovery_other_forms",
              "retention_first_round", "forgetting_points", "canary_exposure_bits",
              "repeated_canary_exposure_bits", "control_canary_exposure_bits",
              "epsilon_per_unit")


@dataclass(frozen=True)
class ContinualConfig:
    """The bench's settings, validated once. The fleet's learning settings are the demo's
    (`sim.demo_config.DemoConfig`: SGD per session, clip 0.5, multiplier 0.8, server step
    0.5 x the sites) except where the continual runs measured better: rank 4 on every MLP
    layer, the step scaled to the round's units, each user in one round (docs/continual.md);
    the size is issue 17's target (8 sites, 4 new facts per site per round, 6 rounds,
    user-level DP). Eight users per fact, not the demo's sixteen: each user is a session
    distilled alone, and sixteen doubles every arm's cost."""

    out: Path = Path("out/bench/continual")
    sites: int = 8
    rounds: int = 6
    facts_per_site_per_round: int = 4
    users_per_fact: int = 8
    seed: int = 0
    dp: bool = True
    secure_aggregation: bool = True
    steps: int = 24
    lr: float = 1.0
    clip_norm: float = 0.5
    noise_multiplier: float = 0.8
    privacy_unit: str = "user"
    server_learning_rate: float = 0.0  # 0: 0.5 x the sites, as the demo
    # A round summing more than 117 units steps 117 / units as far: sixteen users a fact then
    # kept in-context skill where a step of 4 x sqrt(100 / units) lost 14 and 98 points
    # (docs/continual.md, "A step for the users who agree").
    server_step_units: int | None = 117
    fedit_server_learning_rate: float = 0.0  # 0: the fleet's, at most the sites (the demo's)
    # The oracle's joint steps a round; 0: `steps` for every new fact of the round, so each
    # fact gets a session's worth of steps (a joint pass over every session at the per-session
    # count would cost as much as the whole fleet).
    oracle_steps: int = 0
    arms: tuple[str, ...] = ARMS
    canaries_per_site_per_round: int = 1
    repeated_canaries_per_site_per_round: int = 1
    canary_repeats: int = 8
    # Records nobody says, whose exposure is the reference for the said canaries'. One
    # record's gain is heavy-tailed (SD about 1.5 bits, outliers of 4-5 bits untold: 16 of
    # them put the mean 0.5 bits from 64's; docs/continual.md, "Canaries against controls").
    control_canaries: int = 32
    secrets_apart: bool = CW.ContinualSpec.secrets_apart  # False: canaries may hold facts' values
    recalls_per_site_per_round: int = 2
    general_tasks: int = 200
    guard_tasks: int = 400
    # Rank 4 on every MLP layer: more facts held than rank 32 on down_proj, with B no larger
    # (docs/continual.md, "A smaller adapter on every MLP layer, under DP").
    rank: int = 4
    adapter_targets: tuple[str, ...] = MLP_TARGETS
    dreams: bool = True
    epsilon_budget: float = 1000.0
    # K, the most rounds a user's sessions enter (sites hold the rest; the aggregator
    # accounts epsilon per unit from K: docs/privacy-budget.md); 0: no cap, every round composes.
    # 1: every documented run's (a user is distilled once, in the round it arrived).
    participation_cap: int = 1
    # The fleet's sites draw their DP noise from generators seeded by this (sim.fleet), so a
    # run repeats and two settings can be compared on the same noise; None: fresh entropy,
    # as in deployment (the arms in this process are seeded by `seed` either way).
    noise_seed: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "arms", tuple(self.arms))
        if not self.server_learning_rate:
            object.__setattr__(self, "server_learning_rate", 0.5 * self.sites)
        if not self.fedit_server_learning_rate:
            object.__setattr__(self, "fedit_server_learning_rate",
                               min(self.server_learning_rate, float(self.sites)))
        if not self.oracle_steps:
            object.__setattr__(self, "oracle_steps",
                               self.steps * self.sites * self.facts_per_site_per_round)
        if not self.dp:  # nothing bounds a user: each session is clipped alone
            object.__setattr__(self, "privacy_unit", "session")
        problems = []
        if not 3 <= self.sites <= 32:
            problems.append(f"--sites {self.sites}: use 3 (the smallest cohort secure "
                            "aggregation allows) to 32 (every site is a process here)")
        unknown = sorted(set(self.arms) - set(ARMS))
        if unknown:
            problems.append(f"--arms {','.join(self.arms)}: {', '.join(unknown)} unknown; use "
                            f"any of {', '.join(ARMS)} (the fleet always runs)")
        if self.privacy_unit not in PRIVACY_UNITS:
            problems.append(f"--privacy-unit {self.privacy_unit}: use session, user or site")
        for name in ("steps", "oracle_steps", "rank"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be at least 1")
        object.__setattr__(self, "adapter_targets", tuple(self.adapter_targets))
        if not self.adapter_targets or not set(self.adapter_targets) <= set(MLP_TARGETS):
            problems.append(f"--targets {','.join(self.adapter_targets)}: use one or more of "
                            f"{','.join(MLP_TARGETS)} (the toy model's MLP layers)")
        if self.server_step_units is not None and self.server_step_units < 1:
            problems.append(f"--server-step-units {self.server_step_units}: use a number of "
                            "units >= 1, or 0 for the same step every round")
        if self.participation_cap < 0:
            problems.append(f"--participation-cap {self.participation_cap}: use a number of "
                            "rounds >= 1, or 0 for no cap")
        for name in ("lr", "clip_norm", "noise_multiplier", "server_learning_rate",
                     "fedit_server_learning_rate", "epsilon_budget"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                problems.append(f"{name}={value} must be a finite number > 0")
        if problems:
            raise ValueError("; ".join(problems))
        # The world's own checks (sizes, users per fact, names left for the controls and
        # the canaries' twins), here at the edge: building it takes milliseconds.
        CW.make_continual_world(self.world_spec())

    def world_spec(self) -> CW.ContinualSpec:
        return CW.ContinualSpec(
            seed=self.seed, sites=self.sites, rounds=self.rounds,
            facts_per_site_per_round=self.facts_per_site_per_round,
            users_per_fact=self.users_per_fact,
            recalls_per_site_per_round=self.recalls_per_site_per_round,
            canaries_per_site_per_round=self.canaries_per_site_per_round,
            repeated_canaries_per_site_per_round=self.repeated_canaries_per_site_per_round,
            canary_repeats=self.canary_repeats, control_canaries=self.control_canaries,
            secrets_apart=self.secrets_apart, general_tasks=self.general_tasks,
            guard_tasks=self.guard_tasks)

    def distill(self, method: str = "opsd", steps: int | None = None) -> Any:
        from fleetmind.sim.demo_config import distill_config

        return distill_config(steps or self.steps, self.lr, self.seed, method, self.dreams)

    def privacy(self) -> dict[str, Any]:
        from fleetmind.sim.demo_config import privacy_policy

        return privacy_policy(self.dp, self.clip_norm, self.noise_multiplier,
                              self.privacy_unit, self.epsilon_budget,
                              self.participation_cap or None)

    def fleet(self) -> Any:
        from fleetmind.sim.fleet import FleetSettings

        return FleetSettings(out=self.out / "fleet", sites=self.sites, seed=self.seed,
                             secure_aggregation=self.secure_aggregation,
                             server_learning_rate=self.server_learning_rate,
                             server_step_units=self.server_step_units, rank=self.rank,
                             adapter_targets=self.adapter_targets, privacy=self.privacy(),
                             distill=self.distill(), noise_seed=self.noise_seed)


# ---- pure measures -----------------------------------------------------------------------

def most_rounds_entered(world: CW.ContinualWorld, through: int) -> int:
    """The most rounds any one user left sessions in, over the world's rounds 0..through: the
    participation cap every user of this run kept (user-level accounting per unit)."""
    rounds: dict[str, set[int]] = {}
    for (_, r), records in world.records.items():
        if r <= through:
            for record in records:
                rounds.setdefault(record.user, set()).add(r)
    return max((len(v) for v in rounds.values()), default=0)


# ---- measuring a model -------------------------------------------------------------------

@dataclass
class ContinualEvaluator:
    """Per-fact answers of the base model (in context, every probe form) and its canary
    exposure, computed once; `measure` compares a model with them after round r."""

    world: CW.ContinualWorld
    model_dir: Path
    base_incontext: dict[tuple[str, str], bool] = field(default_factory=dict)
    base_skill: float = 0.0
    base_exposure: list[float] = field(default_factory=list)
    base_control_exposure: list[float] = field(default_factory=list)
    base_twin_exposure: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        from fleetmind.client.model import load_model

        model, tokenizer = load_model(self.model_dir)
        facts = list(self.world.facts)
        for form in W.PROBE_FORMS:
            probes = self.world.probes(facts, form)
            answers = self._answers(model, tokenizer, [p.context_messages for p in probes],
                                    [p.answer for p in probes])
            self.base_incontext.update({(f.key, form): a for f, a in zip(facts, answers,
                                                                         strict=True)})
        self.base_skill = self._skill(model, tokenizer)
        self.base_exposure = self._exposure(model, tokenizer,
                                            [c.facts for c in self.world.canaries])
        self.base_control_exposure = self._exposure(model, tokenizer, self.world.controls)
        self.base_twin_exposure = self._exposure(model, tokenizer, self.world.twins)

    @staticmethod
    def _answers(model: Any, tokenizer: Any, prompts: list[Any], answers: list[str]
                 ) -> list[bool]:
        from fleetmind.sim.basemodel import answer_correct

        return answer_correct(model, tokenizer, prompts, answers) if prompts else []

    def _skill(self, model: Any, tokenizer: Any) -> float:
        """In-context accuracy on the world's general tasks, as the demo measures it."""
        from fleetmind.sim.basemodel import measure

        general = W.World(spec=self.world.spec, sites=[], general=self.world.general,  # type: ignore[arg-type]
                          guard=[])
        return measure(model, tokenizer, general)["incontext_accuracy"]

    def _exposure(self, model: Any, tokenizer: Any, records: Sequence[tuple[W.Fact, ...]]
                  ) -> list[float]:
        """Each private record's exposure (bits) under `model`, its secret ranked among the
        values a private record could hold (none a fact says: `ContinualSpec.secrets_apart`)."""
        from fleetmind.audit.exposure import canary_exposure, canary_from_row

        canaries = [canary_from_row(self.world.canary_row(facts)) for facts in records]
        return canary_exposure(model, tokenizer, canaries) if canaries else []

    def _gained(self, model: Any, tokenizer: Any, records: Sequence[tuple[W.Fact, ...]],
                base: list[float]) -> list[float]:
        """Each record's exposure under `model` over the base model's."""
        return [after - before for after, before
                in zip(self._exposure(model, tokenizer, records), base, strict=True)]

    def measure(self, model: Any, tokenizer: Any, round_number: int) -> dict[str, Any]:
        """After round `round_number` (1..R: the world's rounds 0..round_number-1 were said)."""
        known = self.world.facts_known_before(round_number)
        by_form = {}
        for form in W.PROBE_FORMS:
            probes = self.world.probes(known, form)
            by_form[form] = self._answers(model, tokenizer, [p.messages for p in probes],
                                          [p.answer for p in probes])

        def recovered(form: str, keep: Any) -> float | None:
            pairs = [(answer, self.base_incontext[(f.key, form)])
                     for f, answer in zip(known, by_form[form], strict=True) if keep(f)]
            return recovery([a for a, _ in pairs], [b for _, b in pairs])

        # Only canaries said by now are scored (and their twins): the rest would be discarded.
        said = [i for i, c in enumerate(self.world.canaries) if c.round < round_number]
        gained = self._gained(model, tokenizer, [self.world.canaries[i].facts for i in said],
                              [self.base_exposure[i] for i in said])
        # Records nobody said: how far exposure moves without the secret in any session.
        controls = self._gained(model, tokenizer, self.world.controls,
                                self.base_control_exposure)
        # Each canary's secret asked of a name nobody said: what the model says of anyone's.
        twins = self._gained(model, tokenizer, [self.world.twins[i] for i in said],
                             [self.base_twin_exposure[i] for i in said])
        arrived = [(self.world.canaries[i].repeats, bits, twin)
                   for i, bits, twin in zip(said, gained, twins, strict=True)]
        once = [bits for repeats, bits, _ in arrived if repeats == 1]
        repeated = [bits for repeats, bits, _ in arrived if repeats > 1]
        once_over_twins = [bits - twin for repeats, bits, twin in arrived if repeats == 1]
        repeated_over_twins = [bits - twin for repeats, bits, twin in arrived if repeats > 1]
        return {
            "round": round_number,
            "facts_known": len(known),
            "recovery_strict": recovered("strict", lambda f: True),
            "recovery_other_forms": {form: recovered(form, lambda f: True)
                                     for form in W.OTHER_FORMS},
            # The target set: facts said at least one round before this one.
            "recovery_strict_earlier_rounds": recovered(
                "strict", lambda f: f.round < round_number - 1),
            "first_round_recovery": recovered("strict", lambda f: f.round == 0),
            "forgetting_points": 100 * (self.base_skill - self._skill(model, tokenizer)),
            "canary_exposure_bits": _mean(once),
            "repeated_canary_exposure_bits": _mean(repeated),
            # The same over each canary's twin: what the model learned of that person, not
            # of the value (a fact's users teaching the same value move both).
            "canary_exposure_over_twins_bits": _mean(once_over_twins),
            "repeated_canary_exposure_over_twins_bits": _mean(repeated_over_twins),
            "control_canary_exposure_bits": _mean(controls),
            # One record's exposure moves by bits either way without being said (a said
            # canary's mean over n is as uncertain as this / sqrt(n): docs/continual.md).
            "control_canary_exposure_sd_bits": statistics.stdev(controls)
            if len(controls) > 1 else None,
        }


# ---- the arms ----------------------------------------------------------------------------

@dataclass
class CentralOracle:
    """Every session at one place: each round's sessions distilled jointly, continuing from
    the oracle's own B; nothing clipped, nothing noised."""

    model_dir: Path
    distill: Any
    guard: Sequence[Any]
    frozen_a_seed: int
    rank: int
    targets: tuple[str, ...]
    model: Any = None
    tokenizer: Any = None

    def __post_init__(self) -> None:
        from fleetmind.client import lora
        from fleetmind.client.model import load_model

        model, self.tokenizer = load_model(self.model_dir)
        self.model = lora.attach_lora(model, seed=self.frozen_a_seed, rank=self.rank,
                                      alpha=2.0 * self.rank, targets=self.targets)

    def round(self, sessions_per_site: Sequence[Sequence[Any]], round_number: int) -> None:
        from fleetmind.client.consolidate import consolidate_sessions

        sessions = [s for site in sessions_per_site for s in site]
        consolidate_sessions(self.model, self.tokenizer, sessions, self.distill,
                             site="oracle", base_version=round_number - 1,
                             seed=self.distill.seed, guard=self.guard, per_session=False,
                             progress=False)


def in_process_epsilon(cfg: ContinualConfig, rounds: int) -> float | None:
    """epsilon after `rounds` of an in-process arm that noises each round's sum once with the
    fleet's multiplier, by the aggregator's accountant and delta; None without DP."""
    if not cfg.dp:
        return None
    from fleetmind.aggregation.accountant import AccountingMethod, epsilon
    from fleetmind.server.config import PrivacyPolicy

    policy = PrivacyPolicy()
    return epsilon(cfg.noise_multiplier, 1.0, rounds, policy.delta,
                   method=cast(AccountingMethod, policy.accountant))


def arm_epsilon(cfg: ContinualConfig, world: CW.ContinualWorld, rounds: int) -> float | None:
    """epsilon per unit of an in-process arm after `rounds`: from the participation cap its
    sites enforce, as the fleet's (`capped_epsilon`), or composing every round without one."""
    capped = capped_epsilon(cfg, world, rounds) if cfg.participation_cap else None
    return capped["epsilon"] if capped else in_process_epsilon(cfg, rounds)


def capped_epsilon(cfg: ContinualConfig, world: CW.ContinualWorld, rounds: int
                   ) -> dict[str, Any] | None:
    """epsilon per unit from a participation cap (`accountant.epsilon_per_unit`): K is the
    most rounds any user of this world entered so far, or the run's enforced cap when that is
    smaller (sites held the rest); None without DP."""
    if not cfg.dp or rounds < 1:
        return None
    from fleetmind.aggregation.accountant import AccountingMethod, RoundCharge, epsilon_per_unit
    from fleetmind.aggregation.participation import ParticipationCap
    from fleetmind.server.config import PrivacyPolicy

    policy = PrivacyPolicy()
    cap = most_rounds_entered(world, rounds - 1) if cfg.privacy_unit == "user" else rounds
    if cfg.participation_cap:
        cap = min(cap, cfg.participation_cap)
    charges = [RoundCharge(cfg.noise_multiplier)] * rounds
    return {"max_rounds": cap, "epsilon": epsilon_per_unit(
        charges, ParticipationCap(max(cap, 1)), policy.delta,
        method=cast(AccountingMethod, policy.accountant))}


def _arm(cfg: ContinualConfig, name: str, model_dir: Path, guard: list[Any]) -> Any:
    from fleetmind.sim.fedit import InProcessFleet

    if name == "oracle":
        return CentralOracle(model_dir, cfg.distill(steps=cfg.oracle_steps), guard,
                             frozen_a_seed=cfg.seed, rank=cfg.rank, targets=cfg.adapter_targets)
    privacy = cfg.privacy()
    fedit = name == "fedit"
    return InProcessFleet(
        model_dir, cfg.distill(method="opsd" if fedit else "sft_transcript"), guard,
        frozen_a_seed=cfg.seed, rank=cfg.rank, targets=cfg.adapter_targets,
        clip_norm=privacy["clip_norm"], privacy_unit=privacy["privacy_unit"],
        noise_multiplier=privacy["noise_multiplier"],
        server_learning_rate=cfg.fedit_server_learning_rate if fedit
        else cfg.server_learning_rate, merge="fedit" if fedit else "exact", seed=cfg.seed,
        server_step_units=cfg.server_step_units,
        participation_cap=cfg.participation_cap or None)


def arm_rounds(cfg: ContinualConfig, name: str, evaluator: ContinualEvaluator,
               guard: list[Any], queue: Any, threads: Any) -> None:
    """One in-process arm's every round, in a process of its own (`ArmProcesses`): after each
    round, (name, the round's measures, the round's seconds) onto `queue`; (name, None, the
    error) if it fails. Each round runs on `threads.value` torch threads (set by the run)."""
    try:
        import torch

        from fleetmind.client.store import Session
        from fleetmind.sim.basemodel import toy_model_path
        from fleetmind.sim.fleet import quiet

        quiet()
        arm = _arm(cfg, name, toy_model_path(), guard)
        world = evaluator.world
        for number in range(1, cfg.rounds + 1):
            torch.set_num_threads(threads.value)
            clock = time.perf_counter()
            sessions = [[Session.from_dict(s) for s in world.sessions_for_round(site, number - 1)]
                        for site in world.site_names]
            if name == "oracle":
                arm.round(sessions, number)
            else:
                arm.round(sessions)
            seconds = time.perf_counter() - clock
            row = evaluator.measure(arm.model, arm.tokenizer, number)
            row["epsilon_per_unit"] = None if name == "oracle" else arm_epsilon(cfg, world,
                                                                               number)
            queue.put((name, row, seconds))
    except BaseException as error:
        queue.put((name, None, f"{type(error).__name__}: {error}"))
        raise


class ArmProcesses:
    """The in-process arms, each running all its rounds in a process of its own, beside the
    fleet: in one process after each fleet round they left a core idle once the fleet's sites
    were done (docs/continual.md "Every arm in one run"). Rows arrive in round order per arm.
    Each arm starts on one torch thread; `share_cores` gives the arms still running the
    machine's cores once the fleet is done."""

    def __init__(self, cfg: ContinualConfig, evaluator: ContinualEvaluator,
                 guard: list[Any]) -> None:
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # torch and grpc do not survive fork
        self.rounds = cfg.rounds
        self.delivered = dict.fromkeys(cfg.arms, 0)
        self.queue = context.Queue()
        self.threads = context.Value("i", 1)
        self.processes = {name: context.Process(target=arm_rounds, daemon=True,
                                                args=(cfg, name, evaluator, guard, self.queue,
                                                      self.threads),
                                                name=f"arm-{name}")
                          for name in cfg.arms}
        for process in self.processes.values():
            process.start()

    def rows(self, timeout: float) -> list[tuple[str, dict[str, Any], float]]:
        """Every row ready now, waiting up to `timeout` for the first; an arm that failed, or
        whose process ended before its last round, raises, naming it."""
        import queue as queues

        ready = []
        try:
            ready.append(self.queue.get(timeout=timeout) if timeout else self.queue.get_nowait())
            while True:
                ready.append(self.queue.get_nowait())
        except queues.Empty:
            pass
        for name, row, detail in ready:
            if row is None:
                raise RuntimeError(f"the {name} arm failed: {detail}")
            self.delivered[name] += 1
        if not ready:
            for name, process in self.processes.items():
                if self.delivered[name] < self.rounds and not process.is_alive():
                    raise RuntimeError(f"the {name} arm's process ended (exit code "
                                       f"{process.exitcode}) before its last round")
        return [(name, row, seconds) for name, row, seconds in ready]

    def share_cores(self) -> int:
        """The torch threads each arm still running takes from its next round: the machine's
        cores shared among them (the last arm alone, FedIT, ran 1.6x faster on two threads
        than on one: docs/continual.md "Every arm at the defaults, in 41 minutes")."""
        running = sum(delivered < self.rounds for delivered in self.delivered.values())
        self.threads.value = max(1, (os.cpu_count() or 1) // max(1, running))
        return int(self.threads.value)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.is_alive():
                process.terminate()
            process.join(timeout=10)


# ---- the run -----------------------------------------------------------------------------

def prepare_out(out: Path) -> None:
    """A fresh `out`: this bench's own files from an earlier run are removed (the fleet's
    stores and ledger would carry on from the old state); anything else there is refused."""
    ours = {"world", "fleet", "sweep", RESULTS, PLOT, SWEEP, SWEEP_PLOT}
    out.mkdir(parents=True, exist_ok=True)
    entries = list(out.iterdir())
    strangers = sorted(e.name for e in entries if e.name not in ours)
    if strangers:
        raise FileExistsError(f"--out {out} holds {', '.join(strangers[:3])}, which this bench "
                              "did not write; name an empty or new folder")
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def run(cfg: ContinualConfig, console: Any = None) -> dict[str, Any]:
    """Runs the fleet and the arms round by round; writes continual.json and the plot."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console()
    started = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(),
                  TextColumn("round {task.completed}/{task.total}"), TimeElapsedColumn(),
                  console=console) as progress:
        # The bar shows from the first second; torch and transformers load under it.
        task = progress.add_task("loading torch and transformers", total=cfg.rounds)
        import torch
        from peft import PeftModel

        from fleetmind.aggregation.manifest import MANIFEST, Manifest
        from fleetmind.client.consolidate import read_prompts
        from fleetmind.client.model import load_model
        from fleetmind.sim.basemodel import toy_model_path
        from fleetmind.sim.fleet import Fleet, quiet

        progress.update(task, description="writing the continual world")
        quiet()
        torch.set_num_threads(1)  # tiny matrices; the site processes share the cores
        prepare_out(cfg.out)
        world = CW.make_continual_world(cfg.world_spec())
        world_dir = CW.write_continual_world(world, cfg.out / "world")
        model_dir = toy_model_path()
        guard = read_prompts(world_dir / "guard.jsonl")
        progress.update(task, description="measuring the base model")
        evaluator = ContinualEvaluator(world, model_dir)
        progress.update(task, description="starting the arms' processes")
        arms = ArmProcesses(cfg, evaluator, guard)
        progress.update(task, description="starting the aggregator and sites")
        fleet = Fleet(cfg.fleet(), model_dir, world_dir / "guard.jsonl")
        try:
            fleet.start()
        except BaseException:
            arms.stop()
            raise
        rounds: list[dict[str, Any]] = []
        arm_rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in cfg.arms}
        arm_seconds = dict.fromkeys(["fleet", *cfg.arms], 0.0)

        def results_so_far(complete: bool) -> dict[str, Any]:
            """continual.json: written after every round (`complete` false until the last),
            so a run stopped early keeps the rounds it measured."""
            return {
                "config": {**{k: (str(v) if isinstance(v, Path) else v)
                              for k, v in asdict(cfg).items()},
                           "privacy": cfg.privacy(), "model": str(model_dir),
                           "world": world.spec.digest(), "probe_forms": list(W.PROBE_FORMS)},
                "base": {"incontext_accuracy": evaluator.base_skill,
                         "incontext_by_form": {form: _share([v for (_, f), v in
                                                             evaluator.base_incontext.items()
                                                             if f == form])
                                               for form in W.PROBE_FORMS}},
                "rounds": rounds,
                "arms": {name: arm_rounds.get(name) for name in ARMS},
                "arm_seconds": arm_seconds,
                "seconds": time.perf_counter() - started,
                "complete": complete,
            }

        def arm_rows_arrived(timeout: float) -> None:
            for name, row, seconds in arms.rows(timeout):
                arm_seconds[name] += seconds
                add_row(arm_rounds[name], row)
                progress.console.print(round_line(name, row))

        def save(complete: bool) -> None:
            atomic_write(cfg.out / RESULTS,
                         (json.dumps(results_so_far(complete), indent=2) + "\n").encode())

        try:
            for number in range(1, cfg.rounds + 1):
                sessions = [world.sessions_for_round(site, number - 1)
                            for site in world.site_names]
                clock = time.perf_counter()
                fleet.submit(number, sessions)
                progress.update(task, description=f"round {number}: the fleet's sites "
                                                  "(consolidate, clip, "
                                                  + ("secure aggregation, " if
                                                     cfg.secure_aggregation else "")
                                                  + ("DP, " if cfg.dp else "") + "publish)"
                                                  + (", the arms beside" if cfg.arms else ""))
                version = fleet.collect(number)
                arm_seconds["fleet"] += time.perf_counter() - clock
                folder = fleet.current()
                manifest = Manifest.from_bytes((folder / MANIFEST).read_bytes())
                progress.update(task, description=f"round {number}: measuring version "
                                                  f"{version}")
                base, tokenizer = load_model(model_dir)
                row = evaluator.measure(PeftModel.from_pretrained(base, folder).eval(),
                                        tokenizer, number)
                row.update(version=version,
                           epsilon_per_unit=manifest.epsilon if cfg.dp else None,
                           epsilon_per_unit_capped=capped_epsilon(cfg, world, number))
                add_row(rounds, row)
                progress.update(task, advance=1)
                progress.console.print(round_line("fleet", rounds[-1]))
                arm_rows_arrived(0)
                save(False)
            while any(len(rows) < cfg.rounds for rows in arm_rounds.values()):
                arms.share_cores()  # the fleet's sites are done: their cores are free
                behind = {n: len(rows) + 1 for n, rows in arm_rounds.items()
                          if len(rows) < cfg.rounds}
                progress.update(task, description="the fleet is done; the arms' rounds: "
                                + ", ".join(f"{n} {r}" for n, r in behind.items()))
                arm_rows_arrived(60.0)
                save(False)
        finally:
            arms.stop()
            fleet.stop()
    results = results_so_far(True)
    atomic_write(cfg.out / RESULTS, (json.dumps(results, indent=2) + "\n").encode())
    plot(results, cfg.out / PLOT)
    return results


def add_row(series: list[dict[str, Any]], row: dict[str, Any]) -> None:
    """Appends a round's measures to an arm's series, with the retention of round 1's facts
    over the series so far."""
    series.append(row)
    row["retention_first_round"] = retention([r["first_round_recovery"] for r in series])


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _share(values: list[bool]) -> float:
    return sum(values) / len(values) if values else 0.0


def round_line(name: str, row: dict[str, Any]) -> str:
    """One line per arm and round: strict recovery, forgetting and epsilon."""
    value, epsilon = row["recovery_strict"], row.get("epsilon_per_unit")
    return (f"round {row['round']}, {name}: {row['facts_known']} facts known; recovery "
            f"{'-' if value is None else f'{value:.2f}'} "
            f"({row['forgetting_points']:+.1f} pts)"
            + ("" if epsilon is None else f"; epsilon {epsilon:.3g}"))


def plot(results: dict[str, Any], out: Path) -> Path:
    """Per round, a curve per arm: recovery in the sessions' form and in the other forms,
    retention of round 1's facts, forgetting, and the fleet's canary exposure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {"fleet": results["rounds"],
              **{name: rows for name, rows in results["arms"].items() if rows}}
    figure, axes = plt.subplots(1, 5, figsize=(24, 4.2))
    strict, other, kept, forgot, canaries = axes
    markers = {"fleet": "o", "oracle": "^", "fedit": "s", "sft": "x"}

    def curve(axis: Any, key: Any, name: str, rows: list[dict[str, Any]], **style: Any) -> None:
        x = [r["round"] for r in rows]
        y = [key(r) for r in rows]
        axis.plot(x, [math.nan if v is None else v for v in y],
                  marker=markers.get(name, "o"), label=name, **style)

    for name, rows in series.items():
        curve(strict, lambda r: r["recovery_strict"], name, rows)
        for form in results["config"]["probe_forms"][1:]:
            curve(other, lambda r, f=form: r["recovery_other_forms"].get(f), name, rows)
        curve(kept, lambda r: r["retention_first_round"], name, rows)
        curve(forgot, lambda r: r["forgetting_points"], name, rows)
    for key, label in (("canary_exposure_bits", "canaries said once"),
                       ("canary_exposure_over_twins_bits", "said once, over their twins"),
                       ("repeated_canary_exposure_bits", "canaries one user repeats"),
                       ("control_canary_exposure_bits", "controls nobody said")):
        curve(canaries, lambda r, k=key: r.get(k), "fleet", results["rounds"])
        canaries.lines[-1].set_label(label)
    strict.axhline(0.8, color="grey", linewidth=0.8, linestyle=":", label="target 0.80")
    other.axhline(0.6, color="grey", linewidth=0.8, linestyle=":", label="target 0.60")
    kept.axhline(0.8, color="grey", linewidth=0.8, linestyle=":", label="target 0.80")
    forgot.axhline(2.0, color="grey", linewidth=0.8, linestyle=":", label="limit 2 points")
    if results["config"]["dp"]:
        canaries.axhline(1.0, color="grey", linewidth=0.8, linestyle=":", label="limit 1 bit")
    strict.set(ylabel="recovery", ylim=(0, 1.05), title="every fact said so far")
    other.set(ylabel="recovery", ylim=(0, 1.05), title="asked in a form no session used")
    kept.set(ylabel="of their best", ylim=(0, 1.05), title="round 1's facts, retained")
    forgot.set(ylabel="points", title="forgetting of in-context skill")
    canaries.set(ylabel="bits over the base model", title="the fleet's canary exposure")
    for axis in axes:
        axis.set_xlabel("round")
        axis.set_xticks([r["round"] for r in results["rounds"]])
        axis.legend(fontsize=8)
    config = results["config"]
    figure.suptitle(f"fleetmind bench continual: {config['sites']} sites, "
                    f"{config['facts_per_site_per_round']} new facts per site per round, "
                    f"{config['users_per_fact']} users per fact, DP "
                    f"{'on (' + config['privacy_unit'] + ')' if config['dp'] else 'off'}")
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


# ---- recovery against users per fact -------------------------------------------------------

def users_per_fact_curve(cfg: ContinualConfig, values: Sequence[int],
                         console: Any = None) -> dict[str, Any]:
    """The fleet alone (no arms), once per users-per-fact value, each run in
    DIR/sweep/users-N; writes DIR/users_per_fact.json and its plot: the last round's
    recovery (strict and other forms) and epsilon against users per fact."""
    points = []
    for value in values:
        run_cfg = replace(cfg, users_per_fact=value, arms=(),
                          out=cfg.out / "sweep" / f"users-{value}")
        last = run(run_cfg, console)["rounds"][-1]
        points.append({"users_per_fact": value, **{k: last.get(k) for k in (
            "recovery_strict", "recovery_other_forms", "recovery_strict_earlier_rounds",
            "forgetting_points", "epsilon_per_unit")}})
    curve = {"config": {**{k: (str(v) if isinstance(v, Path) else v)
                           for k, v in asdict(cfg).items()}, "users_per_fact": list(values)},
             "points": points}
    atomic_write(cfg.out / SWEEP, (json.dumps(curve, indent=2) + "\n").encode())
    plot_users_per_fact(curve, cfg.out / SWEEP_PLOT)
    return curve


def plot_users_per_fact(curve: dict[str, Any], path: Path) -> Path:
    """The users-per-fact curve (`users_per_fact_curve`'s JSON) as a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = curve["points"]
    figure, axis = plt.subplots(figsize=(6, 4))
    x = [p["users_per_fact"] for p in points]
    axis.plot(x, [math.nan if p["recovery_strict"] is None else p["recovery_strict"]
                  for p in points], marker="o", label="strict form")
    for form in W.OTHER_FORMS:
        axis.plot(x, [math.nan if p["recovery_other_forms"].get(form) is None
                      else p["recovery_other_forms"][form] for p in points], marker="s",
                  label=form)
    axis.set(xscale="log", xlabel="users per fact", ylabel="recovery after the last round",
             ylim=(0, 1.05), title="how much agreement a fact needs to spread")
    axis.minorticks_off()  # the log axis would label 3, 6... as powers of ten
    axis.set_xticks(x, labels=[str(v) for v in x])
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# ---- the command ---------------------------------------------------------------------------

def add_continual_command(commands: Any) -> None:
    """Adds `continual` to the bench group's subparsers `commands`."""
    defaults = ContinualConfig()
    parser = commands.add_parser(
        "continual", help="knowledge arriving over rounds: the fleet against its arms",
        description="A fleet on the real services (loopback gRPC, secure aggregation, DP) over "
                    "rounds of arriving knowledge, beside a centralised oracle, FedIT and the "
                    "SFT baseline in the same run; writes DIR/continual.json and "
                    "DIR/continual.png.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sites", type=int, default=defaults.sites)
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument("--facts-per-site-per-round", type=int,
                        default=defaults.facts_per_site_per_round)
    parser.add_argument("--users-per-fact", type=int, default=defaults.users_per_fact)
    parser.add_argument("--steps", type=int, default=defaults.steps,
                        help="distillation steps per session")
    parser.add_argument("--oracle-steps", type=int, default=0,
                        help="the oracle's joint steps a round (default: --steps for every "
                             "new fact of the round)")
    parser.add_argument("--arms", default=",".join(defaults.arms),
                        help="comma-separated in-process arms beside the fleet: oracle, fedit, "
                             "sft (empty: the fleet alone)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--no-dp", dest="dp", action="store_false",
                        help="negligible noise and each session clipped alone; "
                             "epsilon_per_unit is null")
    parser.add_argument("--privacy-unit", default=defaults.privacy_unit)
    parser.add_argument("--noise-multiplier", type=float, default=defaults.noise_multiplier)
    parser.add_argument("--rank", type=int, default=defaults.rank,
                        help=f"LoRA rank on the adapter's targets (default {defaults.rank})")
    parser.add_argument("--targets", default=",".join(defaults.adapter_targets),
                        help="the MLP layers the adapter trains, comma-separated (default "
                             f"{','.join(defaults.adapter_targets)}; every MLP layer holds more "
                             "facts but its DP noise grows with the square root of B's size: "
                             "docs/continual.md)")
    parser.add_argument("--server-learning-rate", type=float, default=0.0,
                        help="the aggregator's step on the cohort's sum (default 0.5 x the "
                             "sites, as the demo)")
    parser.add_argument("--server-step-units", type=int,
                        default=defaults.server_step_units or 0,
                        help="the units a round sums at which the server step holds; more "
                             "shrink it by this / units (default "
                             f"{defaults.server_step_units}; 0: the same step every round)")
    parser.add_argument("--participation-cap", type=int, default=defaults.participation_cap,
                        help="K: each user's sessions enter at most K rounds, epsilon per "
                             f"user accounted from K (default {defaults.participation_cap}; "
                             "0: no cap)")
    parser.add_argument("--control-canaries", type=int, default=defaults.control_canaries,
                        help="records no session says, the reference for the said canaries' "
                             f"exposure (default {defaults.control_canaries})")
    parser.add_argument("--secrets-shared", dest="secrets_apart", action="store_false",
                        help="let canaries hold values that facts say, as worlds before "
                             "2026-12-08 did (default: a canary's values are ones no fact "
                             "says, so a taught value's rise is not read as leakage)")
    parser.add_argument("--noise-seed", type=int, default=None,
                        help="seed the fleet's sites' DP noise, so the run repeats and two "
                             "settings meet the same noise (default: fresh entropy, as in "
                             "deployment)")
    parser.add_argument("--users-per-fact-sweep", default="",
                        help="e.g. 2,4,8,16: also run the fleet alone at each value and write "
                             "DIR/users_per_fact.json and its plot")
    parser.set_defaults(run=_continual)


def _names(text: str) -> tuple[str, ...]:
    """A comma-separated list's names, blanks dropped."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _numbers(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentError(None, f"{flag} {text}: use whole numbers separated by "
                                           "commas, e.g. 2,4,8,16") from None


def _continual(args: argparse.Namespace) -> int:
    try:
        cfg = ContinualConfig(
            out=args.out, sites=args.sites, rounds=args.rounds,
            facts_per_site_per_round=args.facts_per_site_per_round,
            users_per_fact=args.users_per_fact, steps=args.steps,
            oracle_steps=args.oracle_steps, seed=args.seed, dp=args.dp,
            privacy_unit=args.privacy_unit, noise_multiplier=args.noise_multiplier,
            rank=args.rank, server_learning_rate=args.server_learning_rate,
            server_step_units=args.server_step_units or None,
            participation_cap=args.participation_cap, noise_seed=args.noise_seed,
            control_canaries=args.control_canaries, secrets_apart=args.secrets_apart,
            adapter_targets=_names(args.targets), arms=_names(args.arms))
        sweep = _numbers(args.users_per_fact_sweep, "--users-per-fact-sweep")
        for value in sweep:
            replace(cfg, users_per_fact=value)
    except ValueError as error:
        raise argparse.ArgumentError(None, str(error)) from None
    try:
        results = run(cfg)
    except FileExistsError as error:
        raise argparse.ArgumentError(None, str(error)) from None
    print(round_line("fleet", results["rounds"][-1]))
    for name, rows in results["arms"].items():
        if rows:
            print(round_line(name, rows[-1]))
    print(f"results: {cfg.out / RESULTS}, plot: {cfg.out / PLOT} "
          f"({results['seconds']:.0f} s)")
    if sweep:
        users_per_fact_curve(cfg, sweep)
        print(f"users-per-fact curve: {cfg.out / SWEEP}, plot: {cfg.out / SWEEP_PLOT}")
    return 0


__all__ = ["ContinualConfig", "add_continual_command", "plot_users_per_fact", "run",
           "users_per_fact_curve"]
