"""`fleetmind demo`: an aggregator and N sites on this machine, over real loopback gRPC,
learning from each other round by round.

    fleetmind demo                       # 4 sites, the defaults below, out/demo
    fleetmind demo --sites 2 --rounds 1 --no-dp --out /tmp/demo

The aggregator runs in this process (`server.service.serve`, plaintext on loopback); every
site is its own process running the real site agent (`client.site.run_once`: consolidate,
clip, mask, upload, download, verify, activate). Sessions arrive over the rounds: each round
every site ingests its next slice of the world's sessions, so a fact's three users are
spread over time and each version builds on the last.

After each round this process loads the version the sites activated and measures, per site:
closed-book accuracy on its own facts and on facts first seen at other sites (transfer),
the base model's in-context accuracy on those facts (the upper bound; recovery is transfer
over it), forgetting of the base model's in-context skill, how many more bits of other
sites' canaries the version exposes than the base model does, and epsilon spent so far.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import queue
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fleetmind.aggregation.dp import PRIVACY_UNITS
from fleetmind.client.lora import MLP_TARGETS
from fleetmind.sim import world as W

RESULTS = "results.json"
PLOT = "demo.png"
ROUND_TIMEOUT_S = 900.0
MERGES = ("both", "exact", "fedit")


@dataclass(frozen=True)
class DemoConfig:
    """The demo's knobs. Every session is distilled alone for `steps` SGD steps (SGD keeps a
    session's delta in a few directions, so clipping keeps its lesson; Adam spreads it over
    every coordinate). Each privacy unit's delta (with DP an end user's sessions summed,
    without DP each session) is clipped to `clip_norm` (which also keeps the sum of many
    deltas stable), and with DP the cohort's sum carries Gaussian noise; without DP the
    noise is negligible and nothing bounds a user. The aggregator applies
    `server_learning_rate` (default: 0.5 x the number of sites) times the cohort's mean, so
    with one unit of weight per site the global B moves by half the sum of the clipped
    deltas: 0.75 x the sites recovered as much, but the noise it carried cost 1 to 3 points
    of forgetting by round 2 (+3 in one run of four). The FedIT arm has its own
    `fedit_server_learning_rate` (default: the fleet's, at most the number of sites):
    averaging factors adds the cross term step^2 x sum(dB) sum(dA), and at a step of 2 that
    term broke the model (95 points of forgetting without noise) where a step of 1 did not.

    The defaults come from sweeps (README "Demo"): LoRA on the MLPs' down projections only,
    because Gaussian noise on the gate and up projections' B (2 x 512 x 8 of the 18,432
    coordinates) broke the model at noise multiplier 1 (85-99 points of forgetting) where
    down_proj alone lost 0-3; two facts per site, because independently distilled session
    deltas interfere when summed (over four sites they kept 5 of 24 facts, and 5 of 8); and
    each fact said by sixteen users, so a fact's session deltas add up while a canary's one
    session, clipped like any other, stays one: with three users per fact the noise that
    kept canary exposure near 1 bit (multiplier 0.3, epsilon 32) already cost transfer,
    with eight a multiplier of 0.8 (epsilon 9) left the same transfer (recovery 0.75), and
    with sixteen the same noise leaves 0.88. Eight canaries per site: exposure is a mean
    over the 32 of the other sites, where 16 left a standard error of 0.4-0.5 bits. The
    forgetting guard is consolidation's default (`DistillConfig`).

    The positive control: two repeated canaries per site, each said by one user in eight
    sessions (`sim.world`), as many sessions as half a fact's users. With DP the privacy
    unit is the end user (`privacy_unit`), so such a user's sessions are summed and clipped
    to C as one unit; without DP every session is clipped alone (only to keep the sum
    stable) and nothing bounds a user, which is what a fleet without DP does. So the
    exposure measure must see them without DP, and the noise must hide them with it."""

    sites: int = 4
    rounds: int = 2
    seed: int = 0
    out: Path = Path("out/demo")
    dp: bool = True
    secure_aggregation: bool = True
    dreams: bool = True
    steps: int = 24
    lr: float = 1.0
    clip_norm: float = 0.5
    noise_multiplier: float = 0.8
    server_learning_rate: float = 0.0
    fedit_server_learning_rate: float = 0.0
    epsilon_budget: float = 1000.0
    facts_per_site: int = 2
    users_per_fact: int = 16
    canaries_per_site: int = 8
    repeated_canaries_per_site: int = 2
    canary_repeats: int = 8
    privacy_unit: str = "user"
    rank: int = 8
    adapter_targets: tuple[str, ...] = ("down_proj",)
    # "both": the fleet (exact merge) and, beside it, the in-process FedIT arm; "exact": the
    # fleet alone; "fedit": the FedIT arm alone (in-process: the protocol never carries A).
    merge: str = "both"
    method: str = "opsd"  # or "sft_transcript": the baseline, sites fine-tune on transcripts

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        if not self.server_learning_rate:
            object.__setattr__(self, "server_learning_rate", 0.5 * self.sites)
        if not self.dp:  # nothing bounds a user: each session is clipped alone
            object.__setattr__(self, "privacy_unit", "session")
        if not self.fedit_server_learning_rate:
            object.__setattr__(self, "fedit_server_learning_rate",
                               min(self.server_learning_rate, float(self.sites)))
        problems = []
        if self.sites < 3:
            problems.append(f"--sites {self.sites}: the aggregator's smallest cohort is 3 "
                            "sites (secure aggregation splits each site's secrets among two "
                            "others, and a sum of two tells each the other's update); use 3 "
                            "or more")
        if self.sites > 32:
            problems.append(f"--sites {self.sites}: every site is a process on this machine; "
                            "use at most 32 (Run on Flower scales further)")
        if not 1 <= self.rounds <= 3 * self.facts_per_site:
            problems.append(f"--rounds {self.rounds}: use 1 to {3 * self.facts_per_site}; "
                            "every round needs new sessions at every site")
        if self.merge not in MERGES:
            problems.append(f"--merge {self.merge}: use both (the fleet's exact merge beside "
                            "the FedIT arm), exact (the fleet alone) or fedit (the FedIT arm "
                            "alone)")
        if self.privacy_unit not in PRIVACY_UNITS:
            problems.append(f"--privacy-unit {self.privacy_unit}: use session, user or site")
        if self.method not in ("opsd", "sft_transcript"):
            problems.append(f"method={self.method!r}: use opsd or sft_transcript")
        if self.rank < 1 or not self.adapter_targets or \
                not set(self.adapter_targets) <= set(MLP_TARGETS):
            problems.append(f"rank={self.rank}, adapter_targets={self.adapter_targets}: need "
                            f"rank >= 1 and targets among {', '.join(MLP_TARGETS)}")
        if self.steps < 1:
            problems.append(f"--steps {self.steps} must be at least 1")
        for name in ("lr", "clip_norm", "noise_multiplier", "server_learning_rate",
                     "fedit_server_learning_rate", "epsilon_budget"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                problems.append(f"{name}={value} must be a finite number > 0")
        if problems:
            raise ValueError("; ".join(problems))

    def world_spec(self) -> W.WorldSpec:
        return W.WorldSpec(seed=self.seed, sites=self.sites, facts_per_site=self.facts_per_site,
                           users_per_fact=self.users_per_fact,
                           canaries_per_site=self.canaries_per_site,
                           repeated_canaries_per_site=self.repeated_canaries_per_site,
                           canary_repeats=self.canary_repeats)

    def distill(self) -> Any:
        from fleetmind.client.distill import DistillConfig

        dreams = {} if self.dreams else {"dream_ratio": 0.0, "dreams_per_lesson": 0}
        return DistillConfig(steps=self.steps, lr=self.lr, optimizer="sgd", seed=self.seed,
                             method=self.method, **dreams)

    def privacy(self) -> dict[str, Any]:
        """DP off still sends through the same protocol, with noise too small to matter (the
        aggregator refuses zero noise: a round without it has no finite epsilon), and with
        each session clipped alone: there is no privacy unit to bound."""
        if self.dp:
            return {"clip_norm": self.clip_norm, "noise_multiplier": self.noise_multiplier,
                    "privacy_unit": self.privacy_unit, "epsilon_budget": self.epsilon_budget}
        return {"clip_norm": self.clip_norm, "noise_multiplier": 1e-6,
                "privacy_unit": self.privacy_unit, "epsilon_budget": 1e300}


# ---- the world's sessions, spread over rounds ------------------------------------------------

def schedule(world: W.World, rounds: int) -> list[list[list[dict[str, Any]]]]:
    """sessions[site][round]: a site's sessions dealt round-robin over the rounds."""
    return [[site.sessions[r::rounds] for r in range(rounds)] for site in world.sites]


def adapter_spec(model_dir: Path, frozen_a_seed: int, rank: int = 8, alpha: float = 16.0,
                 targets: tuple[str, ...] = MLP_TARGETS) -> Any:
    """The genesis adapter for a Llama-shaped model: LoRA on `targets` of every layer's MLP."""
    import hashlib

    from fleetmind.server.versions import AdapterSpec, TargetModule

    config = json.loads((model_dir / "config.json").read_text())
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    shapes = {"gate_proj": (hidden, inner), "up_proj": (hidden, inner),
              "down_proj": (inner, hidden)}
    modules = tuple(TargetModule(f"model.layers.{layer}.mlp.{name}", *shapes[name])
                    for layer in range(config["num_hidden_layers"]) for name in targets)
    weights = sorted(model_dir.glob("*.safetensors"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in weights)).hexdigest()
    return AdapterSpec(model_dir.name, digest, modules, frozen_a_seed=frozen_a_seed, rank=rank,
                       alpha=alpha)


def quiet() -> None:
    """The demo's own progress and tables are the output: no per-load bars or notices from
    transformers in any of its processes."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


# ---- sites: one process each, driven round by round ------------------------------------------

def _site_process(config: Any, threads: int, commands: Any, replies: Any) -> None:
    """A site's whole life: for each round, ingest its new sessions and run the agent once."""
    import logging

    import grpc
    import torch

    from fleetmind.client.site import run_once
    from fleetmind.client.store import SessionStore

    logging.basicConfig(level=logging.WARNING)
    quiet()
    torch.set_num_threads(threads)
    channel = grpc.insecure_channel(config.aggregator)
    parent = os.getppid()
    while True:
        try:
            command = commands.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:  # the driver died without saying stop
                break
            continue
        if command is None:
            break
        round_number, sessions = command
        started = time.perf_counter()
        try:
            with SessionStore(config.data_dir) as store:
                for session in sessions:
                    store.add(session)
            outcome = run_once(config, channel)
            version = outcome.round.version if outcome.round else None
            replies.put((config.name, round_number, version, None,
                         time.perf_counter() - started))
        except Exception as error:  # reported to the driver, which stops the demo
            replies.put((config.name, round_number, None, f"{type(error).__name__}: {error}",
                         time.perf_counter() - started))
    channel.close()


@dataclass
class Fleet:
    """The aggregator (in this process) and the site processes."""

    cfg: DemoConfig
    model_dir: Path
    world_dir: Path
    server: Any = None
    processes: list[Any] = field(default_factory=list)
    commands: list[Any] = field(default_factory=list)
    replies: Any = None

    def start(self) -> None:
        from fleetmind.client.site import SiteConfig
        from fleetmind.server.config import CohortPolicy, PrivacyPolicy, ServerConfig
        from fleetmind.server.service import serve

        cfg, privacy = self.cfg, self.cfg.privacy()
        self.server = serve(ServerConfig(
            data_dir=cfg.out / "aggregator", listen="127.0.0.1:0", insecure=True,
            cohort=CohortPolicy(min_size=cfg.sites, target_size=cfg.sites,
                                deadline_s=ROUND_TIMEOUT_S, phase_deadline_s=ROUND_TIMEOUT_S,
                                max_size=max(cfg.sites, 10),
                                secure_aggregation=cfg.secure_aggregation),
            privacy=PrivacyPolicy(clip_norm=privacy["clip_norm"],
                                  noise_multiplier=privacy["noise_multiplier"],
                                  epsilon_budget=privacy["epsilon_budget"],
                                  privacy_unit=privacy["privacy_unit"],
                                  fixed_point_clip=max(4.0, privacy["clip_norm"]),
                                  server_learning_rate=cfg.server_learning_rate),
            adapter=adapter_spec(self.model_dir, frozen_a_seed=cfg.seed, rank=cfg.rank,
                                 alpha=2.0 * cfg.rank, targets=cfg.adapter_targets)))
        key = self.server.coordinator.registry.public_key.public_bytes_raw()
        distill = cfg.distill()
        guard = self.world_dir / "guard.jsonl"
        context = multiprocessing.get_context("spawn")  # grpc and torch do not survive fork
        self.replies = context.Queue()
        threads = max(1, (os.cpu_count() or 1) // (cfg.sites + 1))
        for number in range(cfg.sites):
            name = f"site-{number:02d}"
            config = SiteConfig(
                name=name, data_dir=cfg.out / name, model_dir=self.model_dir,
                aggregator=self.server.address, identity_key=cfg.out / name / "identity.pem",
                aggregator_key=key, min_new_sessions=1, distill=distill, guard_prompts=guard,
                insecure=True, clip_norm=privacy["clip_norm"],
                privacy_unit=privacy["privacy_unit"], round_timeout_s=ROUND_TIMEOUT_S)
            config.data_dir.mkdir(parents=True, exist_ok=True)
            commands = context.Queue()
            process = context.Process(target=_site_process, name=name, daemon=True,
                                      args=(config, threads, commands, self.replies))
            process.start()
            self.processes.append(process)
            self.commands.append(commands)

    def run_round(self, round_number: int, sessions: list[list[dict[str, Any]]]) -> int:
        """Hands each site its sessions for this round; returns the version they activated."""
        for commands, site_sessions in zip(self.commands, sessions, strict=True):
            commands.put((round_number, site_sessions))
        versions, failures = set(), []
        for _ in self.commands:
            try:
                name, _, version, error, _ = self.replies.get(timeout=ROUND_TIMEOUT_S)
            except queue.Empty:
                raise RuntimeError(f"round {round_number}: a site did not finish within "
                                   f"{ROUND_TIMEOUT_S:.0f} s") from None
            if error:
                failures.append(f"{name}: {error}")
            versions.add(version)
        if failures:
            raise RuntimeError(f"round {round_number} failed: " + "; ".join(failures))
        if len(versions) != 1:
            raise RuntimeError(f"round {round_number}: sites ended on versions {versions}")
        return versions.pop()

    def stop(self) -> None:
        for commands in self.commands:
            commands.put(None)
        for process in self.processes:
            process.join(30)
            if process.is_alive():
                process.kill()
        if self.server is not None:
            self.server.stop(grace=None)


# ---- measuring a version ---------------------------------------------------------------------

@dataclass
class Evaluator:
    """Everything measured against the base model, computed once."""

    world: W.World
    model_dir: Path
    canaries: list[Any] = field(default_factory=list)
    base: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from fleetmind.client import exposure
        from fleetmind.client.model import load_model
        from fleetmind.sim.basemodel import fact_accuracy

        # (owner, times said, canary): the once-said ones, then the repeated ones.
        self.canaries = [(site.name, repeats, exposure.canary_from_row(W.canary_row(canary)))
                         for site in self.world.sites
                         for repeats, canaries in ((1, site.canaries),
                                                   (self.world.spec.canary_repeats,
                                                    site.repeated_canaries))
                         for canary in canaries]
        model, tokenizer = load_model(self.model_dir)
        self.base = self._measure(model, tokenizer)
        self.base["upper_bound"] = {
            site.name: fact_accuracy(model, tokenizer, self.world.foreign_facts(site.name),
                                     lambda f: W.context_prompt([f], f))
            for site in self.world.sites}

    def _measure(self, model: Any, tokenizer: Any) -> dict[str, Any]:
        from fleetmind.client.exposure import canary_exposure
        from fleetmind.sim.basemodel import fact_accuracy, measure

        exposure = canary_exposure(model, tokenizer, [c for _, _, c in self.canaries])
        return {
            "incontext": measure(model, tokenizer, self.world)["incontext_accuracy"],
            "closed_book": {site.name: fact_accuracy(model, tokenizer, site.facts)
                            for site in self.world.sites},
            "exposure": exposure,
        }

    def version(self, folder: Path) -> dict[str, Any]:
        """Per-site and fleet-wide numbers for the version in `folder` (a PEFT adapter, loaded
        as any serving stack would load it)."""
        from peft import PeftModel

        from fleetmind.client.model import load_model

        model, tokenizer = load_model(self.model_dir)
        return self.compare(PeftModel.from_pretrained(model, folder).eval(), tokenizer)

    def compare(self, model: Any, tokenizer: Any) -> dict[str, Any]:
        """Per-site and fleet-wide numbers for `model` against the base model."""
        return self.summarize(self._measure(model, tokenizer))

    def summarize(self, measured: dict[str, Any]) -> dict[str, Any]:
        # Every canary's gain over the base model; each site's means are over other sites'.
        canaries = [{"site": owner, "repeats": repeats, "bits": after - before}
                    for (owner, repeats, _), after, before
                    in zip(self.canaries, measured["exposure"], self.base["exposure"],
                           strict=True)]
        sites = []
        for site in self.world.sites:
            others = [s for s in self.world.sites if s.name != site.name]
            transfer = _mean([measured["closed_book"][s.name] * len(s.facts) for s in others],
                             [len(s.facts) for s in others])
            upper = self.base["upper_bound"][site.name]
            once = [c["bits"] for c in canaries if c["site"] != site.name and c["repeats"] == 1]
            repeated = [c["bits"] for c in canaries
                        if c["site"] != site.name and c["repeats"] > 1]
            sites.append({
                "site": site.name,
                "own_accuracy": measured["closed_book"][site.name],
                "transfer_accuracy": transfer,
                "incontext_upper_bound": upper,
                "recovery": transfer / upper if upper else 0.0,
                "forgetting_points": 100 * (self.base["incontext"] - measured["incontext"]),
                "canary_exposure_bits": _mean(once),
                **({"repeated_canary_exposure_bits": _mean(repeated)} if repeated else {}),
            })
        fleet = {key: sum(s[key] for s in sites) / len(sites)
                 for key in sites[0] if key != "site"}
        return {**fleet, "sites": sites, "canaries": canaries}


def _mean(weighted: list[float], weights: list[int] | None = None) -> float:
    """sum(weighted) / sum(weights), every weight 1 when none are given; 0 when empty."""
    total = len(weighted) if weights is None else sum(weights)
    return sum(weighted) / total if total else 0.0


# ---- the run ---------------------------------------------------------------------------------

def run_demo(cfg: DemoConfig, console: Any = None) -> dict[str, Any]:
    """Runs the whole demo; writes results.json and the plot into cfg.out; returns results."""
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from fleetmind.aggregation.manifest import MANIFEST, Manifest
    from fleetmind.client.store import Session
    from fleetmind.sim.basemodel import toy_model_path

    console = console or Console()
    quiet()
    # Tiny matrices: one thread each is as fast, and several processes' thread pools
    # spinning against each other on two cores are many times slower.
    torch.set_num_threads(1)
    started = time.perf_counter()
    clear_previous_run(cfg.out)
    world = W.make_world(cfg.world_spec())
    world_dir = W.write_world(world, cfg.out / "world")
    model_dir = toy_model_path()
    slices = schedule(world, cfg.rounds)
    rounds: list[dict[str, Any]] = []
    fleet = Fleet(cfg, model_dir, world_dir)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("round {task.completed}"
                  "/{task.total}"), TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("measuring the base model", total=cfg.rounds)
        evaluator = Evaluator(world, model_dir)
        # The base model: what every site has without the fleet.
        rounds.append({"round": 0, "version": 0, "epsilon": 0.0, "seconds": 0.0,
                       **evaluator.summarize(evaluator.base)})
        fleet_runs, fedit_runs = cfg.merge != "fedit", cfg.merge != "exact"
        if fedit_runs:
            if fleet_runs:
                rounds[0]["fedit"] = _headline(rounds[0])
            progress.update(task, description="loading the FedIT arm")
            fedit = _fedit_arm(cfg, model_dir, world_dir)
        if fleet_runs:
            progress.update(task, description="starting the aggregator and sites")
            fleet.start()
        summed = "secure aggregation" if cfg.secure_aggregation else "plain sum"
        try:
            for number in range(1, cfg.rounds + 1):
                round_started = time.perf_counter()
                row: dict[str, Any] = {"round": number}
                if fleet_runs:
                    progress.update(task, description=f"round {number}: sites consolidate, "
                                                      f"{summed}, publish")
                    version = fleet.run_round(number, [site[number - 1] for site in slices])
                    folder = cfg.out / "site-00" / "current"
                    manifest = Manifest.from_bytes((folder / MANIFEST).read_bytes())
                    progress.update(task, description=f"round {number}: measuring version "
                                                      f"{version}")
                    row.update(version=version, epsilon=manifest.epsilon,
                               seconds=time.perf_counter() - round_started,
                               **evaluator.version(folder))
                if fedit_runs:
                    progress.update(task, description=f"round {number}: the FedIT arm")
                    fedit.round([[Session.from_dict(s) for s in site[number - 1]]
                                  for site in slices])
                    measured = evaluator.compare(fedit.model, fedit.tokenizer)
                    if fleet_runs:
                        row["fedit"] = _headline(measured)
                    else:
                        row.update(version=None, epsilon=fedit_epsilon(cfg, number),
                                   seconds=time.perf_counter() - round_started, **measured)
                rounds.append(row)
                progress.update(task, advance=1)
                progress.console.print(round_table(rounds[-1]))
        finally:
            fleet.stop()
    results = {
        "sites": [site.name for site in world.sites],
        "rounds": rounds,
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
                   "privacy": cfg.privacy(), "model": str(model_dir),
                   "world": world.spec.digest()},
        "seconds": time.perf_counter() - started,
    }
    (cfg.out / RESULTS).write_text(json.dumps(results, indent=2) + "\n")
    plot(results, cfg.out / PLOT)
    return results


class ForeignOutputError(ValueError):
    """--out holds files no demo wrote: the demo clears only its own."""


def clear_previous_run(out: Path) -> None:
    """Makes `out` ready for a fresh run: a demo's own folders and files from an earlier run are
    removed (its sites' stores and the aggregator's ledger would otherwise carry on from the
    old state, and the numbers would be the old fleet's); anything else there is refused."""
    import shutil

    ours = {"world", "aggregator", RESULTS, PLOT}
    out.mkdir(parents=True, exist_ok=True)
    entries = list(out.iterdir())
    strangers = sorted(e.name for e in entries
                       if e.name not in ours and not re.fullmatch(r"site-\d{2,}", e.name))
    if strangers:
        raise ForeignOutputError(f"--out {out} holds {', '.join(strangers[:3])}, which no "
                                 "demo wrote; name an empty or new folder, or a previous "
                                 "demo's")
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


HEADLINE = ("transfer_accuracy", "own_accuracy", "recovery", "forgetting_points",
            "canary_exposure_bits", "repeated_canary_exposure_bits")


def _headline(measured: dict[str, Any]) -> dict[str, float]:
    return {key: measured[key] for key in HEADLINE if key in measured}


def fedit_epsilon(cfg: DemoConfig, rounds: int) -> float:
    """epsilon after `rounds` of the FedIT arm, which noises every round's sum once with the
    fleet's multiplier, by the accountant and delta the aggregator uses."""
    from fleetmind.aggregation.accountant import epsilon
    from fleetmind.server.config import PrivacyPolicy

    policy = PrivacyPolicy()
    return epsilon(cfg.privacy()["noise_multiplier"], 1.0, rounds, policy.delta,
                   method=policy.accountant)


def _fedit_arm(cfg: DemoConfig, model_dir: Path, world_dir: Path) -> Any:
    from fleetmind.client.consolidate import read_prompts
    from fleetmind.sim.fedit import FeditArm

    privacy = cfg.privacy()
    return FeditArm(model_dir, cfg.distill(), read_prompts(world_dir / "guard.jsonl"),
                    frozen_a_seed=cfg.seed, rank=cfg.rank, targets=cfg.adapter_targets,
                    clip_norm=privacy["clip_norm"], privacy_unit=privacy["privacy_unit"],
                    noise_multiplier=privacy["noise_multiplier"],
                    server_learning_rate=cfg.fedit_server_learning_rate, seed=cfg.seed)


def round_table(measured: dict[str, Any]) -> Any:
    from rich.table import Table

    epsilon = (f"epsilon {measured['epsilon']:.2f}" if measured["epsilon"] < 1e6
               else "no DP noise")
    version = ("FedIT arm" if measured["version"] is None
               else f"version {measured['version']}")
    table = Table(title=f"after round {measured['round']} ({version}, {epsilon}, "
                        f"{measured['seconds']:.0f} s)")
    columns = (("site", "site", "{}"), ("own", "own_accuracy", "{:.2f}"),
               ("transfer", "transfer_accuracy", "{:.2f}"),
               ("upper bound", "incontext_upper_bound", "{:.2f}"),
               ("recovery", "recovery", "{:.2f}"), ("forgetting (pts)", "forgetting_points",
                                                    "{:+.1f}"),
               ("canary exposure (bits)", "canary_exposure_bits", "{:+.2f}"))
    if "repeated_canary_exposure_bits" in measured:
        columns += (("repeated canaries (bits)", "repeated_canary_exposure_bits", "{:+.2f}"),)
    for title, _, _ in columns:
        table.add_column(title, justify="left" if title == "site" else "right")
    rows = [*measured["sites"], {**measured, "site": "fleet"}]
    if "fedit" in measured:
        rows.append({**measured["fedit"], "site": "FedIT arm",
                     "incontext_upper_bound": measured["incontext_upper_bound"]})
    for row in rows:
        table.add_row(*(fmt.format(row[key]) for _, key, fmt in columns))
    return table


def plot(results: dict[str, Any], out: Path) -> Path:
    """Transfer recovery and forgetting per round, with the fleet, with the FedIT arm when it
    ran, and without the fleet (a site alone never sees other sites' facts, so it keeps the
    base model's transfer); and the fleet's canary exposure per round, once-said and
    repeated canaries apart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = results["rounds"]
    x = [r["round"] for r in rounds]
    alone = rounds[0]["recovery"]
    figure, (left, right, privacy) = plt.subplots(1, 3, figsize=(15, 4))
    fleet = "with the fleet" + (" (FedIT merge)" if results["config"]["merge"] == "fedit" else "")
    left.plot(x, [r["recovery"] for r in rounds], marker="o", label=fleet)
    if "fedit" in rounds[0]:
        left.plot(x, [r["fedit"]["recovery"] for r in rounds], marker="s",
                  label="FedIT (A and B averaged)")
    left.plot(x, [alone] * len(x), linestyle="--", label="without the fleet")
    left.axhline(0.8, color="grey", linewidth=0.8, linestyle=":", label="target 0.80")
    left.set(xlabel="round", ylabel="transfer recovery", ylim=(0, 1.05),
             title="facts first seen at other sites")
    left.legend()
    right.plot(x, [r["forgetting_points"] for r in rounds], marker="o", label=fleet)
    if "fedit" in rounds[0]:
        right.plot(x, [r["fedit"]["forgetting_points"] for r in rounds], marker="s",
                   label="FedIT (A and B averaged)")
        # FedIT's tens of points beside the fleet's one or two: linear up to 5, log beyond.
        right.set_yscale("symlog", linthresh=5)
        right.set_yticks([-2, 0, 2, 10, 100], labels=["-2", "0", "2", "10", "100"])
    right.plot(x, [0.0] * len(x), linestyle="--", label="without the fleet")
    right.axhline(2.0, color="grey", linewidth=0.8, linestyle=":", label="limit 2 points")
    right.set(xlabel="round", ylabel="forgetting (points)", title="base in-context skill")
    for key, label in (("canary_exposure_bits", "canaries said once"),
                       ("repeated_canary_exposure_bits", "canaries one user repeats")):
        if all(key in r for r in rounds):
            privacy.plot(x, [r[key] for r in rounds], marker="o", label=label)
    if results["config"]["dp"]:
        privacy.axhline(1.0, color="grey", linewidth=0.8, linestyle=":",
                        label="limit with DP, 1 bit")
    privacy.set(xlabel="round", ylabel="exposure (bits over the base model)",
                title="other sites' canaries")
    for axis in (left, right, privacy):
        axis.set_xticks(x)
    right.legend()
    privacy.legend()
    figure.suptitle(f"fleetmind demo: {len(results['sites'])} sites, DP "
                    f"{'on' if results['config']['dp'] else 'off'}")
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out


# ---- the command -----------------------------------------------------------------------------

def add_demo_command(commands: Any) -> None:
    defaults = DemoConfig()
    demo = commands.add_parser(
        "demo", help="a whole fleet on this machine, learning round by round",
        description="An aggregator and N sites over real loopback gRPC on a fresh toy world, "
                    "with secure aggregation and user-level DP; a table per round, then "
                    "results.json and a plot in --out.")
    demo.add_argument("--sites", type=int, default=defaults.sites)
    demo.add_argument("--rounds", type=int, default=defaults.rounds)
    demo.add_argument("--seed", type=int, default=defaults.seed)
    demo.add_argument("--out", type=Path, default=defaults.out)
    demo.add_argument("--steps", type=int, default=defaults.steps,
                      help="distillation steps per session")
    demo.add_argument("--no-dp", dest="dp", action="store_false",
                      help="negligible noise, and each session clipped alone (only to keep "
                           "the sum stable): nothing bounds a user")
    demo.add_argument("--privacy-unit", default=defaults.privacy_unit,
                      help="with DP, what one clip bounds: session, user (each end user's "
                           "sessions together; the default) or site")
    demo.add_argument("--no-dreams", dest="dreams", action="store_false")
    demo.add_argument("--baseline-sft", dest="method", action="store_const",
                      const="sft_transcript", default=defaults.method,
                      help="sites fine-tune on their raw transcripts instead of distilling "
                           "(the baseline: what a naive fleet would share)")
    demo.add_argument("--merge", choices=MERGES, default=defaults.merge,
                      help="both: the fleet's exact merge and, beside it, a FedIT arm "
                           "(A trained too, A and B averaged; in-process); exact: the "
                           "fleet alone, faster; fedit: the FedIT arm alone")
    demo.add_argument("--no-secagg", dest="secure_aggregation", action="store_false",
                      help="the aggregator sums the sites' vectors unmasked (an ablation: "
                           "same result, no secure-aggregation cost; loopback only)")
    demo.add_argument("--noise-multiplier", type=float, default=defaults.noise_multiplier)
    demo.add_argument("--clip-norm", type=float, default=defaults.clip_norm)
    demo.add_argument("--server-lr", dest="server_learning_rate", type=float, default=0.0,
                      help="the aggregator's learning rate on the cohort's mean (default: "
                           "0.5 x the number of sites)")
    demo.add_argument("--fedit-server-lr", dest="fedit_server_learning_rate", type=float,
                      default=0.0, help="the FedIT arm's learning rate on the mean of the "
                                        "sites' A and B deltas (default: the fleet's, at "
                                        "most the number of sites)")
    demo.set_defaults(run=_demo)


def _demo(args: argparse.Namespace) -> int:
    try:
        cfg = DemoConfig(sites=args.sites, rounds=args.rounds, seed=args.seed, out=args.out,
                         steps=args.steps, dp=args.dp, dreams=args.dreams, merge=args.merge,
                         secure_aggregation=args.secure_aggregation,
                         method=args.method, privacy_unit=args.privacy_unit,
                         noise_multiplier=args.noise_multiplier, clip_norm=args.clip_norm,
                         server_learning_rate=args.server_learning_rate,
                         fedit_server_learning_rate=args.fedit_server_learning_rate)
    except ValueError as error:
        raise argparse.ArgumentError(None, str(error)) from None
    try:
        results = run_demo(cfg)
    except ForeignOutputError as error:
        raise argparse.ArgumentError(None, str(error)) from None
    last = results["rounds"][-1]
    repeated = (f" (repeated canaries {last['repeated_canary_exposure_bits']:+.2f})"
                if "repeated_canary_exposure_bits" in last else "")
    print(f"after {cfg.rounds} rounds: transfer recovery {last['recovery']:.2f}, forgetting "
          f"{last['forgetting_points']:+.1f} points, canary exposure "
          f"{last['canary_exposure_bits']:+.2f} bits{repeated}, epsilon "
          f"{last['epsilon']:.3g} ({results['seconds']:.0f} s)")
    print(f"results: {cfg.out / RESULTS}, plot: {cfg.out / PLOT}")
    return 0


__all__ = ["DemoConfig", "Evaluator", "Fleet", "add_demo_command", "plot",
           "run_demo", "schedule"]
