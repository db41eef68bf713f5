"""`fleetmind demo`: an aggregator and N sites on this machine, over real loopback gRPC,
learning from each other round by round.

    fleetmind demo                       # 4 sites, the defaults below, out/demo
    fleetmind demo --sites 2 --rounds 1 --no-dp --out /tmp/demo

The fleet (`sim.fleet`): the aggregator in this process, every site its own process running
the real site agent. Knowledge arrives over the rounds (`schedule`): all the sessions that
state a site's fact i come in round i mod rounds + 1, so each round brings new facts and
each version builds on the last, and the measures after each round follow the facts said so
far, the round's new ones, and whether round 1's are kept. With endpoints
(`DemoConfig.endpoints`), each site also serves its active version at its own
OpenAI-compatible endpoint (`client serve`), and a round's users hold their conversations
with it through the official `openai` client over HTTP: the sessions a site learns from are
what its served model said, captured by the endpoint into the site's store.
Without, each site ingests the world's transcripts as written. After each round this process
loads the version the sites activated and measures it (`sim.evaluation`), with endpoints
also on the answers each site's endpoint serves, prints a table and, at the end, writes
results.json and a plot (`sim.demo_report`). The settings are `sim.demo_config.DemoConfig`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

from fleetmind.sim import world as W
from fleetmind.sim.demo_config import MERGES, DemoConfig
from fleetmind.sim.demo_report import plot, round_table
from fleetmind.sim.evaluation import Evaluator, retention
from fleetmind.sim.fleet import Fleet, quiet

RESULTS = "results.json"
PLOT = "demo.png"


def arrivals(world: W.World, rounds: int) -> dict[str, int]:
    """Every fact's key -> the round it arrives in (`arrival_round`)."""
    return {fact.key: W.arrival_round(number, rounds)
            for site in world.sites for number, fact in enumerate(site.facts)}


def schedule(world: W.World, rounds: int) -> list[list[list[dict[str, Any]]]]:
    """sessions[site][round - 1], knowledge arriving by fact: every session that states a
    site's fact i (`Site.teaches`) comes in round `W.arrival_round(i, rounds)`, so all of a
    fact's users come in one round; the other sessions (canaries, repeated canaries) are
    dealt round-robin over the rounds. Each round keeps the world's order. The world must be
    made with `fact_rounds=rounds` (no session states facts of two rounds: refused)."""
    slices = []
    for site in world.sites:
        if rounds < 1 or len(site.facts) < rounds:
            raise ValueError(f"{rounds} rounds need at least {max(rounds, 1)} facts per site "
                             f"({site.name} has {len(site.facts)}): a site's fact i arrives in "
                             "round i mod rounds + 1, and every round needs a fact arriving")
        others = [s["id"] for s in site.sessions if s["id"] not in site.teaches]
        when = {session: number % rounds + 1 for number, session in enumerate(others)}
        for session, facts in site.teaches.items():
            arriving = {W.arrival_round(i, rounds) for i in facts}
            if len(arriving) > 1:
                raise ValueError(f"session {session} states facts arriving in different rounds: "
                                 f"make the world with fact_rounds={rounds}")
            when[session] = arriving.pop()
        slices.append([[s for s in site.sessions if when[s["id"]] == r]
                       for r in range(1, rounds + 1)])
    return slices


def converse(url: str, sessions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each session's user, in turn, says its user turns to the endpoint at `url` through
    the official openai client, each reply joining the history the next turn is sent with;
    the sessions as they went (the served replies in place of the world's). The endpoint
    stores each as one session, keyed to the user, under the conversation header."""
    import openai

    from fleetmind.client.serve.settings import ServeConfig

    header = ServeConfig.conversation_header  # the endpoint's default: the sites keep it
    api = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    held = []
    try:
        for session in sessions:
            history: list[dict[str, Any]] = []
            for turn in session["messages"]:
                if turn["role"] != "user":
                    continue
                history.append(turn)
                reply = api.chat.completions.create(
                    model="fleetmind", messages=history, temperature=0,  # type: ignore[arg-type]
                    user=session["user"],
                    extra_headers={header: session["id"]})
                history.append({"role": "assistant",
                                "content": reply.choices[0].message.content or ""})
            held.append({"id": session["id"], "user": session["user"], "messages": history})
    finally:
        api.close()
    return held


def converse_all(endpoints: dict[str, str], sessions: list[list[dict[str, Any]]]
                 ) -> list[list[dict[str, Any]]]:
    """`converse` at every site at once (each site's users one after another)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(endpoints)) as pool:
        return list(pool.map(converse, endpoints.values(), sessions))


def captured(fleet: Fleet) -> dict[str, dict[str, Any]]:
    """What each site's store holds (`client sessions --json`'s numbers)."""
    from fleetmind.client.store import SessionStore

    stats = {}
    for name in fleet.endpoints:
        with SessionStore(fleet.settings.out / name) as store:
            stats[name] = {k: v for k, v in store.stats().as_dict().items()
                           if not k.endswith("_at")}
    return stats


def _with_served(row: dict[str, Any], served: dict[str, Any]) -> None:
    """Adds the served measures to a round's row: fleet-wide keys, and each site's beside
    its other numbers."""
    by_site = {s["site"]: s for s in served["sites"]}
    row.update({k: v for k, v in served.items() if k != "sites"})
    for site in row["sites"]:
        site.update({k: v for k, v in by_site[site["site"]].items() if k != "site"})


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
    fleet = Fleet(cfg.fleet(), model_dir, world_dir / "guard.jsonl")
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("round {task.completed}"
                  "/{task.total}"), TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("measuring the base model", total=cfg.rounds)
        evaluator = Evaluator(world, model_dir, arrivals(world, cfg.rounds))
        # The base model: what every site has without the fleet.
        rounds.append({"round": 0, "version": 0, "epsilon": 0.0, "seconds": 0.0,
                       **evaluator.summarize(evaluator.base, round=0),
                       "retention_round1": None})
        fleet_runs, fedit_runs = cfg.merge != "fedit", cfg.merge != "exact"
        if fedit_runs:
            if fleet_runs:
                rounds[0]["fedit"] = _headline(rounds[0])
            progress.update(task, description="loading the FedIT arm")
            fedit = _fedit_arm(cfg, model_dir, world_dir)
        if fleet_runs:
            progress.update(task, description="starting the aggregator and sites"
                            + (" and their endpoints" if cfg.endpoints else ""))
            fleet.start()
        summed = "secure aggregation" if cfg.secure_aggregation else "plain sum"
        try:
            if cfg.endpoints:
                progress.update(task, description="asking every site's endpoint (base model)")
                _with_served(rounds[0], evaluator.served(fleet.endpoints, round=0))
            for number in range(1, cfg.rounds + 1):
                round_started = time.perf_counter()
                row: dict[str, Any] = {"round": number}
                sessions = [site[number - 1] for site in slices]
                if cfg.endpoints:
                    progress.update(task, description=f"round {number}: users chat with "
                                                      "their sites' endpoints")
                    chatted = time.perf_counter()
                    sessions = converse_all(fleet.endpoints, sessions)
                    row["chat_seconds"] = time.perf_counter() - chatted
                if fleet_runs:
                    progress.update(task, description=f"round {number}: sites consolidate, "
                                                      f"{summed}, publish")
                    # With endpoints, the sessions are in the sites' stores already.
                    version = fleet.run_round(number, [[] if cfg.endpoints else site
                                                       for site in sessions])
                    folder = fleet.current()
                    manifest = Manifest.from_bytes((folder / MANIFEST).read_bytes())
                    progress.update(task, description=f"round {number}: measuring version "
                                                      f"{version}")
                    row.update(version=version, epsilon=manifest.epsilon,
                               seconds=time.perf_counter() - round_started,
                               **evaluator.version(folder, round=number))
                if cfg.endpoints:
                    progress.update(task, description=f"round {number}: asking every "
                                                      "site's endpoint")
                    asked = time.perf_counter()
                    _with_served(row, evaluator.served(fleet.endpoints, round=number))
                    row["served_exam_seconds"] = time.perf_counter() - asked
                    row["captured"] = captured(fleet)
                if fedit_runs:
                    progress.update(task, description=f"round {number}: the FedIT arm")
                    fedit.round([[Session.from_dict(s) for s in site] for site in sessions])
                    measured = evaluator.compare(fedit.model, fedit.tokenizer, round=number)
                    if fleet_runs:
                        row["fedit"] = _headline(measured)
                    else:
                        row.update(version=None, epsilon=fedit_epsilon(cfg, number),
                                   seconds=time.perf_counter() - round_started, **measured)
                # Round 1's facts: their recovery now over their best since they arrived.
                row["retention_round1"] = retention([r.get("recovery_round1")
                                                     for r in [*rounds[1:], row]])
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
    from fleetmind.aggregation.accountant import AccountingMethod, epsilon
    from fleetmind.server.config import PrivacyPolicy

    policy = PrivacyPolicy()
    return epsilon(cfg.privacy()["noise_multiplier"], 1.0, rounds, policy.delta,
                   method=cast(AccountingMethod, policy.accountant))


def _fedit_arm(cfg: DemoConfig, model_dir: Path, world_dir: Path) -> Any:
    from fleetmind.client.consolidate import read_prompts
    from fleetmind.sim.fedit import InProcessFleet

    privacy = cfg.privacy()
    return InProcessFleet(model_dir, cfg.distill(), read_prompts(world_dir / "guard.jsonl"),
                          frozen_a_seed=cfg.seed, rank=cfg.rank, targets=cfg.adapter_targets,
                          clip_norm=privacy["clip_norm"], privacy_unit=privacy["privacy_unit"],
                          noise_multiplier=privacy["noise_multiplier"],
                          server_learning_rate=cfg.fedit_server_learning_rate, merge="fedit",
                          seed=cfg.seed)


# ---- the command -----------------------------------------------------------------------------

def add_demo_command(commands: Any) -> None:
    defaults = DemoConfig()
    demo = commands.add_parser(
        "demo", help="a whole fleet on this machine, learning round by round",
        description="An aggregator and N sites over real loopback gRPC on a fresh toy world, "
                    "with secure aggregation and user-level DP; each site serves its version "
                    "at its own OpenAI-compatible endpoint, which its users chat with and "
                    "which captures their sessions; a table per round, then results.json "
                    "and a plot in --out.")
    demo.add_argument("--sites", type=int, default=defaults.sites)
    demo.add_argument("--rounds", type=int, default=defaults.rounds,
                      help="a site's fact i, all its sessions, arrives in round i mod rounds "
                           "+ 1; at most --facts-per-site")
    demo.add_argument("--facts-per-site", type=int, default=defaults.facts_per_site,
                      help=f"facts each site's users say (default {defaults.facts_per_site}), "
                           f"each by {defaults.users_per_fact} users")
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
    demo.add_argument("--endpoints", action=argparse.BooleanOptionalAction,
                      default=defaults.endpoints,
                      help="each site serves its version at its own OpenAI-compatible "
                           "endpoint (`client serve`), its users chat with it over HTTP "
                           "and it captures their sessions; accuracy is also measured on "
                           "the answers served (--no-endpoints: sites ingest the world's "
                           "transcripts)")
    demo.add_argument("--rank", type=int, default=defaults.rank,
                      help=f"LoRA rank on the adapter's targets (default {defaults.rank})")
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
        cfg = DemoConfig(sites=args.sites, rounds=args.rounds,
                         facts_per_site=args.facts_per_site, seed=args.seed, out=args.out,
                         steps=args.steps, dp=args.dp, dreams=args.dreams, merge=args.merge,
                         secure_aggregation=args.secure_aggregation,
                         endpoints=args.endpoints, method=args.method,
                         privacy_unit=args.privacy_unit, rank=args.rank,
                         noise_multiplier=args.noise_multiplier, clip_norm=args.clip_norm,
                         server_learning_rate=args.server_learning_rate,
                         fedit_server_learning_rate=args.fedit_server_learning_rate)
    except ValueError as error:
        raise argparse.ArgumentError(None, str(error)) from None
    if cfg.endpoints and importlib.util.find_spec("openai") is None:
        raise argparse.ArgumentError(None, "the demo's users talk to the sites' endpoints "
                                           "through the official openai client, which is not "
                                           "installed: pip install openai (the dev extra has "
                                           "it), or run with --no-endpoints")
    try:
        results = run_demo(cfg)
    except ForeignOutputError as error:
        raise argparse.ArgumentError(None, str(error)) from None
    print(summary_line(results))
    print(f"results: {cfg.out / RESULTS}, plot: {cfg.out / PLOT}")
    return 0


def summary_line(results: dict[str, Any]) -> str:
    """What the demo ends with: the facts that arrived each round, recovery on all of them
    and how much of round 1's facts' best recovery is kept, then forgetting, the canaries
    and epsilon."""
    rows = results["rounds"][1:]
    last = rows[-1]
    repeated = (f" (repeated canaries {last['repeated_canary_exposure_bits']:+.2f})"
                if "repeated_canary_exposure_bits" in last else "")
    served = (f" (served: {last['served_recovery']:.2f})" if "served_recovery" in last
              else "")
    arrived = ", ".join(f"{r['facts_new']} in round {r['round']}" for r in rows)
    kept = last["retention_round1"]
    kept_text = ("one round, so nothing to keep yet" if len(rows) == 1 else
                 "round 1's facts never recovered" if kept is None else
                 f"round 1's facts keep {kept:.2f} of their best recovery")
    return (f"after {len(rows)} rounds: facts arrived {arrived}; transfer recovery "
            f"{last['recovery']:.2f}{served} on all {last['facts_known']}, {kept_text}; "
            f"forgetting {last['forgetting_points']:+.1f} points, canary exposure "
            f"{last['canary_exposure_bits']:+.2f} bits{repeated}, epsilon "
            f"{last['epsilon']:.3g} ({results['seconds']:.0f} s)")


__all__ = ["DemoConfig", "add_demo_command", "arrivals", "clear_previous_run",
           "fedit_epsilon", "plot", "run_demo", "schedule", "summary_line"]
