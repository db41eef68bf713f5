"""A fleet on this machine: the aggregator in this process (`server.service.serve`,
plaintext on loopback) and every site its own process running the real site agent
(`client.site.run_once`: consolidate, clip, mask, upload, download, verify, activate),
driven round by round. The demo and `bench continual` run the same fleet.

With `FleetSettings.serve`, each site process also runs the site endpoint (`client serve`'s
app under uvicorn, on a thread, on a loopback port the OS picks; `Fleet.endpoints`): it
serves the version the site activated and captures every conversation into the site's
store, which the site's next round consolidates."""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetmind.aggregation.manifest import DEFAULT_ALPHA, DEFAULT_RANK
from fleetmind.client.lora import MLP_TARGETS

ROUND_TIMEOUT_S = 900.0
STOP_GRACE_S = 30.0  # the sites' time, all together, to finish their work in hand and exit
ENDPOINT_START_S = 300.0  # every site loads its model at once, on a shared machine
# A toy-world answer is about ten tokens: the cap only stops a reply that runs on.
SERVE_MAX_TOKENS = 48


@dataclass(frozen=True)
class FleetSettings:
    """What the aggregator and the sites run with. `privacy`: clip_norm, noise_multiplier,
    privacy_unit, epsilon_budget and participation_cap (`demo_config.privacy_policy`);
    `distill`: every site's `DistillConfig`."""

    out: Path
    sites: int
    seed: int
    secure_aggregation: bool
    server_learning_rate: float
    rank: int
    adapter_targets: tuple[str, ...]
    privacy: dict[str, Any]
    distill: Any
    # The units a round sums at which server_learning_rate holds; more shrink the step
    # (PrivacyPolicy.server_step_units). None: the same step every round.
    server_step_units: int | None = None
    # Each site serves its active version at an OpenAI-compatible endpoint that captures
    # sessions (`Fleet.endpoints`); a round then consolidates what the endpoint captured.
    serve: bool = False
    # The sites' DP noise and rounding from generators seeded by (noise_seed, site, round),
    # so a run repeats to float rounding (the distillation is deterministic to that). None:
    # fresh entropy every round, as in deployment. For benchmarks only: noise one can
    # regenerate hides nothing.
    noise_seed: int | None = None


def adapter_spec(model_dir: Path, frozen_a_seed: int, rank: int = DEFAULT_RANK,
                 alpha: float = DEFAULT_ALPHA,
                 targets: tuple[str, ...] = MLP_TARGETS) -> Any:
    """The genesis adapter for the model in `model_dir`: LoRA on `targets`, as
    `fleetmind server adapter` writes it (client.adapter_spec), read as the aggregator does."""
    from fleetmind.client import adapter_spec as spec
    from fleetmind.server.config import adapter_from_table

    return adapter_from_table(spec.adapter_spec(
        model_dir, rank=rank, alpha=alpha, frozen_a_seed=frozen_a_seed, targets=list(targets),
        base_model_id=model_dir.name))


def quiet() -> None:
    """The runs' own progress and tables are the output: no per-load bars or notices from
    transformers in any of their processes."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


def _start_endpoint(config: Any, ready: Any) -> Any:
    """The site's endpoint on a thread of this process; its URL (or why it did not start)
    goes to the driver on `ready`."""
    from fleetmind.client.serve.runner import BackgroundServer
    from fleetmind.client.serve.settings import ServeConfig

    try:
        endpoint = BackgroundServer(ServeConfig(
            data_dir=config.data_dir, model_dir=config.model_dir, listen="127.0.0.1:0",
            device="cpu", max_tokens=SERVE_MAX_TOKENS)).start()
    except Exception as error:  # reported to the driver, which stops the run
        ready.put((config.name, None, f"{type(error).__name__}: {error}"))
        raise
    ready.put((config.name, endpoint.url, None))
    return endpoint


def _site_process(config: Any, threads: int, commands: Any, replies: Any,
                  ready: Any = None, noise_seed: tuple[int, int] | None = None) -> None:
    """A site's whole life: for each round, ingest its new sessions and run the agent once;
    with `ready` (the queue its URL goes to), serving its endpoint throughout; with
    `noise_seed` (the run's, this site's number), each round's noise from its own seeded
    generator."""
    import logging

    import grpc
    import numpy as np
    import torch

    from fleetmind.client.site import run_once
    from fleetmind.client.store import SessionStore

    logging.basicConfig(level=logging.WARNING)
    quiet()
    torch.set_num_threads(threads)
    endpoint = None if ready is None else _start_endpoint(config, ready)
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
            if endpoint is not None:  # what the endpoint answered is in the store first
                endpoint.app.state.capture.join()
            with SessionStore(config.data_dir) as store:
                for session in sessions:
                    store.add(session)
            noise_rng = None if noise_seed is None else \
                np.random.default_rng([*noise_seed, round_number])
            outcome = run_once(config, channel, noise_rng=noise_rng)
            version = outcome.round.version if outcome.round else None
            replies.put((config.name, round_number, version, None,
                         time.perf_counter() - started))
        except Exception as error:  # reported to the driver, which stops the run
            replies.put((config.name, round_number, None, f"{type(error).__name__}: {error}",
                         time.perf_counter() - started))
    channel.close()
    if endpoint is not None:
        endpoint.stop()


@dataclass
class Fleet:
    """The aggregator (in this process) and the site processes, named site-00, site-01, ...
    under `settings.out`; `guard` is the forgetting guard's prompts (chat JSONL). With
    `settings.serve`, `endpoints` maps each site's name to its endpoint's base URL."""

    settings: FleetSettings
    model_dir: Path
    guard: Path
    server: Any = None
    processes: list[Any] = field(default_factory=list)
    commands: list[Any] = field(default_factory=list)
    replies: Any = None
    endpoints: dict[str, str] = field(default_factory=dict)

    def start(self) -> None:
        from fleetmind.client.site import SiteConfig
        from fleetmind.server.config import CohortPolicy, PrivacyPolicy, ServerConfig
        from fleetmind.server.service import serve

        if threading.current_thread() is threading.main_thread():
            # SIGTERM (kill, a CI timeout) ends this process through `stop` as Ctrl-C does, so
            # the site processes do not outlive it.
            signal.signal(signal.SIGTERM, _exit_on_sigterm)
        cfg, privacy = self.settings, self.settings.privacy
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
                                  server_learning_rate=cfg.server_learning_rate,
                                  server_step_units=cfg.server_step_units,
                                  participation_cap=privacy.get("participation_cap")),
            adapter=adapter_spec(self.model_dir, frozen_a_seed=cfg.seed, rank=cfg.rank,
                                 alpha=2.0 * cfg.rank, targets=cfg.adapter_targets)))
        key = self.server.coordinator.registry.public_key.public_bytes_raw()
        context = multiprocessing.get_context("spawn")  # grpc and torch do not survive fork
        self.replies = context.Queue()
        threads = max(1, (os.cpu_count() or 1) // (cfg.sites + 1))
        ready = context.Queue() if cfg.serve else None
        for number in range(cfg.sites):
            name = f"site-{number:02d}"
            config = SiteConfig(
                name=name, data_dir=cfg.out / name, model_dir=self.model_dir,
                aggregator=self.server.address, identity_key=cfg.out / name / "identity.pem",
                aggregator_key=key, min_new_sessions=1, distill=cfg.distill,
                guard_prompts=self.guard, insecure=True, clip_norm=privacy["clip_norm"],
                privacy_unit=privacy["privacy_unit"], round_timeout_s=ROUND_TIMEOUT_S,
                participation_cap=privacy.get("participation_cap"))
            config.data_dir.mkdir(parents=True, exist_ok=True)
            commands = context.Queue()
            process = context.Process(target=_site_process, name=name, daemon=True,
                                      args=(config, threads, commands, self.replies,
                                            ready, None if cfg.noise_seed is None
                                            else (cfg.noise_seed, number)))
            process.start()
            self.processes.append(process)
            self.commands.append(commands)
        if ready is not None:
            self._await_endpoints(ready)

    def _await_endpoints(self, ready: Any) -> None:
        failures: list[str] = []
        deadline = time.monotonic() + ENDPOINT_START_S
        while len(self.endpoints) + len(failures) < len(self.processes):
            try:
                name, url, error = ready.get(timeout=1.0)
            except queue.Empty:
                dead = [p.name for p in self.processes if not p.is_alive()]
                if dead or time.monotonic() > deadline:  # no answer is coming
                    failures.append(f"{', '.join(dead)} exited" if dead else
                                    f"no endpoint within {ENDPOINT_START_S:.0f} s")
                    break
                continue
            if error:
                failures.append(f"{name}: {error}")
            else:
                self.endpoints[name] = url
        if failures:
            raise RuntimeError("site endpoints failed to start: " + "; ".join(failures))
        # In the sites' order (they answered in any), as the sessions handed to them are.
        self.endpoints = {p.name: self.endpoints[p.name] for p in self.processes}

    def run_round(self, round_number: int, sessions: list[list[dict[str, Any]]]) -> int:
        """Hands each site its sessions for this round; returns the version they activated."""
        self.submit(round_number, sessions)
        return self.collect(round_number)

    def submit(self, round_number: int, sessions: list[list[dict[str, Any]]]) -> None:
        """Hands each site its sessions for this round and returns at once: the sites run
        the round while this process does other work (`collect` waits for them)."""
        for commands, site_sessions in zip(self.commands, sessions, strict=True):
            commands.put((round_number, site_sessions))

    def collect(self, round_number: int) -> int:
        """Waits for every site to finish the submitted round; the version they activated."""
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

    def current(self) -> Path:
        """The version folder the first site activated (every site activates the same)."""
        return self.settings.out / "site-00" / "current"

    def stop(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for commands in self.commands:
            commands.put(None)
        deadline = time.monotonic() + STOP_GRACE_S  # one grace for all, not one each
        for process in self.processes:
            process.join(max(deadline - time.monotonic(), 0))
            if process.is_alive():
                process.kill()
        if self.server is not None:
            self.server.stop(grace=None)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)
