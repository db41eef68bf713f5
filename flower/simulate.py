"""Many virtual sites on Flower's simulation engine (Ray), in one command:

    python -m fleetmind.flower.simulate --sites 100 --out out/flower-100

writes a toy world with that many sites, runs the Flower app over it (one virtual
SuperNode per site) and prints the time and the transfer accuracy before and after;
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fleetmind.flower.settings import FlowerRun


def simulate(run: FlowerRun, *, cpus_per_site: float = 1.0, ray_address: str = "",
             verbose: bool = False) -> dict[str, Any]:
    """Runs the Flower app on `run.sites` virtual SuperNodes; returns result.json's content
    with the wall time of the whole simulation (Ray's start included)."""
    from flwr.simulation import run_simulation

    from fleetmind.flower.client_app import client_app
    from fleetmind.flower.server_app import server_app

    init_args: dict[str, Any] = {"address": ray_address} if ray_address else {}
    overrides = run.as_config()
    # Flower's Ray backend sets this process's PYTHONPATH to its whole sys.path for the
    # workers, and leaves it so: every later subprocess of the caller would inherit it.
    pythonpath = os.environ.get("PYTHONPATH")
    result_file = Path(run.out) / "result.json"
    result_file.unlink(missing_ok=True)  # so an earlier run's result is never taken for this one
    started = time.perf_counter()
    try:
        run_simulation(server_app=server_app(overrides), client_app=client_app(overrides),
                       num_supernodes=run.sites,
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
    result_file.write_text(json.dumps(result, indent=2) + "\n")
    return result


def write_toy_world(out: Path, sites: int, facts_per_site: int, seed: int) -> Path:
    from fleetmind.sim import world as W

    spec = W.WorldSpec(seed=seed, sites=sites, facts_per_site=facts_per_site,
                       canaries_per_site=0, general_tasks=10, guard_tasks=100)
    return W.write_world(W.make_world(spec), out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fleetmind.flower.simulate",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=100)
    parser.add_argument("--facts-per-site", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="the toy world's seed")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10, help="OPSD steps per site and round")
    parser.add_argument("--server-learning-rate", type=float, default=None,
                        help="eta of the merge; default sqrt(sites): the mean of N deltas, "
                        "each teaching its own facts, dilutes each N-fold, while their common "
                        "part adds up (README, 'Run on Flower')")
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
                    server_learning_rate=eta)
    result = simulate(run, cpus_per_site=args.cpus_per_site, ray_address=args.ray_address,
                      verbose=args.verbose)
    print(f"{args.sites} sites, {args.rounds} round(s), {args.steps} OPSD steps each: "
          f"{result['simulation_seconds']:.1f} s; transfer accuracy "
          f"{result['base_transfer_accuracy']:.3f} -> {result['transfer_accuracy']:.3f} "
          f"({args.out / 'result.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
