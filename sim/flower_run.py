"""The toy world on Flower: many virtual sites on Flower's simulation engine (Ray), in one
command:

    python -m fleetmind.sim.flower_run --sites 100 --out out/flower-100

writes a toy world with that many sites, runs the Flower app over it (one virtual
SuperNode per site, secure aggregation on unless `--no-secure-aggregation`, the toy base
model, `transfer_evaluation` after every round) and prints the time and the transfer
accuracy before and after, and epsilon per privacy unit when `--noise-multiplier` is set;
`OUT/result.json` has every number. `--ray-address auto` joins a running Ray cluster
(`ray start --head` here, `ray start --address HEAD:6379` on each worker machine) instead
of starting a local one, for thousands of sites.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from fleetmind.flower.settings import FlowerRun

# The run config's `evaluate` for the toy world (flower/server_app.py calls it).
TRANSFER_EVALUATION = "fleetmind.sim.flower_run:transfer_evaluation"


def transfer_evaluation(run: FlowerRun, model: Any, tokenizer: Any
                        ) -> Callable[[int], dict[str, float]]:
    """Closed-book accuracy (`sim.basemodel.answer_correct`) of the merged model on the
    facts of the world in `run.world`, and transfer accuracy: the same on the facts first
    stated at *other* sites than the one scored, averaged over the world's sites. The
    server knows the toy world, so it scores every site at once; the base model is at
    chance (1/40) or below."""
    import numpy as np

    from fleetmind.sim import world as W
    from fleetmind.sim.basemodel import answer_correct

    world = W.read_world(Path(run.world))
    facts = world.facts()  # (site, fact), in site order
    sites = [site.name for site in world.sites]
    prompts = [W.closed_book_prompt(fact) for _, fact in facts]
    answers = [W.answer(fact) for _, fact in facts]
    origin = np.array([site for site, _ in facts])

    def evaluate(server_round: int) -> dict[str, float]:
        correct = np.array(answer_correct(model, tokenizer, prompts, answers))
        transfer = [correct[origin != site].mean() for site in sites
                    if (origin != site).any()]
        return {"closed-book-accuracy": float(correct.mean()),
                "transfer-accuracy": float(np.mean(transfer)) if transfer else 0.0}

    return evaluate


def toy_run(run: FlowerRun) -> FlowerRun:
    """`run` with the toy base model and the transfer evaluation where it names neither."""
    from fleetmind.sim.basemodel import toy_model_path

    return replace(run, model=run.model or str(toy_model_path(build=False)),
                   evaluate=run.evaluate or TRANSFER_EVALUATION)


def simulate(run: FlowerRun, *, cpus_per_site: float = 1.0, ray_address: str = "",
             verbose: bool = False) -> dict[str, Any]:
    """Runs the Flower app on `run.sites` virtual SuperNodes (`toy_run(run)`: the toy model
    and the transfer evaluation unless `run` names others); returns result.json's content
    with the wall time of the whole simulation (Ray's start included) and the transfer
    accuracy before round 1 and after the last round."""
    from flwr.simulation import run_simulation

    from fleetmind.flower.client_app import client_app
    from fleetmind.flower.server_app import server_app
    from fleetmind.sim.flower_sweep import fast_message_sweep

    run = toy_run(run)
    init_args: dict[str, Any] = {"address": ray_address} if ray_address else {}
    overrides = run.as_config()
    # Flower's Ray backend sets this process's PYTHONPATH to its whole sys.path for the
    # workers, and leaves it so: every later subprocess of the caller would inherit it.
    pythonpath = os.environ.get("PYTHONPATH")
    result_file = Path(run.out) / "result.json"
    result_file.unlink(missing_ok=True)  # so an earlier run's result is never taken for this one
    started = time.perf_counter()
    try:
        # Flower's engine walks its whole message store once per node every 0.1 s (N² a
        # sweep: 5 s of CPU at 1,000 sites); this sweeps it once (sim/flower_sweep.py).
        with fast_message_sweep():
            run_simulation(server_app=server_app(overrides),
                           client_app=client_app(overrides), num_supernodes=run.sites,
                           backend_config={"client_resources": {"num_cpus": cpus_per_site,
                                                                "num_gpus": 0.0},
                                           "init_args": init_args},
                           verbose_logging=verbose)
    finally:
        if pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = pythonpath
    seconds = time.perf_counter() - started
    if not result_file.is_file():
        raise RuntimeError(f"the simulation wrote no {result_file}: see Flower's log above")
    result = json.loads(result_file.read_text())
    result["simulation_seconds"] = seconds
    evaluation = result["evaluation"]
    if run.evaluate == TRANSFER_EVALUATION and evaluation:
        result["base_transfer_accuracy"] = evaluation["0"]["transfer-accuracy"]
        result["transfer_accuracy"] = evaluation[str(run.rounds)]["transfer-accuracy"]
    result_file.write_text(json.dumps(result, indent=2) + "\n")
    return result


def write_toy_world(out: Path, sites: int, facts_per_site: int, seed: int) -> Path:
    from fleetmind.sim import world as W

    spec = W.WorldSpec(seed=seed, sites=sites, facts_per_site=facts_per_site,
                       canaries_per_site=0, general_tasks=10, guard_tasks=100)
    return W.write_world(W.make_world(spec), out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fleetmind.sim.flower_run",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=100)
    parser.add_argument("--facts-per-site", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="the toy world's seed")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=FlowerRun.steps,
                        help="OPSD steps per site and round (default: the site agent's)")
    parser.add_argument("--server-learning-rate", type=float, default=None,
                        help="eta of the merge; default sqrt(sites): the mean of N deltas, "
                        "each teaching its own facts, dilutes each N-fold, while their common "
                        "part adds up (docs/flower.md)")
    parser.add_argument("--no-secure-aggregation", action="store_true",
                        help="sites reply with their B in the clear (the ablation)")
    parser.add_argument("--privacy-unit", choices=("session", "user", "site"),
                        default="session", help="what one clip bounds (with --clip-norm)")
    parser.add_argument("--clip-norm", type=float, default=0.0,
                        help="C per privacy unit; 0: no clipping")
    parser.add_argument("--noise-multiplier", type=float, default=0.0,
                        help="z of the cohort sum, split among the sites (needs --clip-norm)")
    parser.add_argument("--participation-cap", type=int, default=0,
                        help="K rounds per privacy unit; 0: no cap")
    parser.add_argument("--epsilon-budget", type=float, default=FlowerRun.epsilon_budget,
                        help="the most epsilon per unit the run may spend; a round past it "
                        "is refused (default: the fleet aggregator's)")
    parser.add_argument("--cpus-per-site", type=float, default=1.0,
                        help="Ray CPUs per virtual site: sites trained at once = CPUs / this")
    parser.add_argument("--ray-address", default="",
                        help="a running Ray cluster ('auto', or HEAD:6379); default: a new "
                        "local one")
    parser.add_argument("--out", type=Path, default=Path("out/flower-sim"))
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if (args.out / "state").exists():
        # The sites' stores there have consumed their sessions: a rerun would learn nothing.
        parser.error(f"{args.out / 'state'} holds the sites of an earlier run; pass a new --out")
    world = write_toy_world(args.out / "world", args.sites, args.facts_per_site, args.seed)
    eta = args.server_learning_rate or math.sqrt(args.sites)
    run = FlowerRun(world=str(world), state=str(args.out / "state"), out=str(args.out),
                    sites=args.sites, rounds=args.rounds, steps=args.steps,
                    server_learning_rate=eta,
                    secure_aggregation=not args.no_secure_aggregation,
                    privacy_unit=args.privacy_unit, dp_clip_norm=args.clip_norm,
                    dp_noise_multiplier=args.noise_multiplier,
                    participation_cap=args.participation_cap,
                    epsilon_budget=args.epsilon_budget)
    result = simulate(run, cpus_per_site=args.cpus_per_site, ray_address=args.ray_address,
                      verbose=args.verbose)
    print(f"{args.sites} sites, {args.rounds} round(s), {args.steps} OPSD steps each: "
          f"{result['simulation_seconds']:.1f} s; transfer accuracy "
          f"{result['base_transfer_accuracy']:.3f} -> {result['transfer_accuracy']:.3f} "
          f"({args.out / 'result.json'})")
    privacy = result["privacy"]
    if privacy["epsilon_per_unit"] is not None:
        print(f"epsilon per {privacy['privacy_unit']}: {privacy['epsilon_per_unit']:.3f} at "
              f"delta={privacy['delta']:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
