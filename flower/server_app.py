"""The ServerApp: rounds of `ExactLoRAMerge`, transfer accuracy of each merged model, and
the result on disk (`result.json`, `global_b.safetensors`, `adapter/` as a PEFT folder).

Transfer accuracy: closed-book accuracy (`sim.basemodel.answer_correct`) of the merged
model on the facts first stated at *other* sites than the one scored, averaged over the
world's sites. The server knows the toy world, so it scores every site at once; the
base model is at chance (1/40) or below.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, Strategy

from fleetmind.aggregation import accountant, merge
from fleetmind.flower.settings import FlowerRun
from fleetmind.flower.strategy import ExactLoRAMerge, b_record, b_tensors


class TransferEvaluation:
    """Scores a B on the world's facts; also yields the zero B that round 1 starts from."""

    def __init__(self, run: FlowerRun) -> None:
        from fleetmind.client import lora
        from fleetmind.client.model import load_model
        from fleetmind.sim import world as W

        base, self.tokenizer = load_model(run.model_path())
        self.model = lora.attach_lora(base, seed=run.lora_seed, rank=run.lora_rank,
                                      alpha=run.lora_alpha)
        world = W.read_world(Path(run.world))
        self.facts = world.facts()  # (site, fact), in site order
        self.sites = [site.name for site in world.sites]
        self.prompts = [W.closed_book_prompt(fact) for _, fact in self.facts]
        self.answers = [W.answer(fact) for _, fact in self.facts]

    def zero_b(self) -> dict[str, np.ndarray]:
        from fleetmind.client import lora

        return {name: np.zeros_like(b) for name, b in lora.get_b(self.model).items()}

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        from fleetmind.client import lora
        from fleetmind.sim.basemodel import answer_correct

        lora.set_b(self.model, b_tensors(arrays))
        correct = np.array(answer_correct(self.model, self.tokenizer, self.prompts,
                                          self.answers))
        origin = np.array([site for site, _ in self.facts])
        transfer = [correct[origin != site].mean() for site in self.sites
                    if (origin != site).any()]
        return MetricRecord({
            "closed-book-accuracy": float(correct.mean()),
            "transfer-accuracy": float(np.mean(transfer)) if transfer else 0.0,
        })


def make_strategy(run: FlowerRun) -> Strategy:
    """The exact merge, wrapped in Flower's client-side fixed-clipping DP when asked (each
    site's ClientApp then clips with Flower's `fixedclipping_mod`)."""
    strategy = ExactLoRAMerge(merge.FedAvg(run.server_learning_rate), sites=run.sites,
                              fraction_train=run.fraction_train)
    if not run.dp:
        return strategy
    return DifferentialPrivacyClientSideFixedClipping(
        strategy, run.dp_noise_multiplier, run.dp_clip_norm,
        max(1, round(run.fraction_train * run.sites)))


def epsilon_spent(run: FlowerRun, rounds: int) -> float | None:
    """epsilon(dp-delta) after `rounds`, per site (the privacy unit Flower's clipping
    bounds), or None without noise.

    Flower's own accountant refuses any strategy whose aggregate_train is not FedAvg's, so
    fleetmind's accountant counts. Flower's wrapper adds noise of z*C/n to the merged B;
    with server learning rate eta the mean delta in it was scaled by eta, so the noise
    multiplier the release really carried is z/eta, and that is what is charged. Sampling
    counts as 1.0 (Flower samples a fixed-size cohort, not Poisson): no amplification."""
    if not run.dp or run.dp_noise_multiplier == 0:
        return None
    return accountant.epsilon(run.dp_noise_multiplier / run.server_learning_rate,
                              sampling_rate=1.0, rounds=rounds, delta=run.dp_delta)


def run_fleet(grid: Grid, run: FlowerRun) -> dict[str, Any]:
    """All rounds; writes and returns the result."""
    from fleetmind.client import lora

    started = time.perf_counter()
    evaluation = TransferEvaluation(run)
    result = make_strategy(run).start(grid=grid, initial_arrays=b_record(evaluation.zero_b()),
                                      num_rounds=run.rounds, timeout=run.round_timeout,
                                      train_config=ConfigRecord(), evaluate_fn=evaluation)
    final_b = b_tensors(result.arrays) if len(result.arrays) else evaluation.zero_b()
    out = Path(run.out)
    out.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(final_b, str(out / "global_b.safetensors"))
    lora.set_b(evaluation.model, final_b)
    lora.save_adapter(evaluation.model, out / "adapter")
    rounds = {str(r): dict(metrics) for r, metrics in
              sorted(result.evaluate_metrics_serverapp.items())}
    summary = {
        "sites": run.sites, "rounds": run.rounds, "seconds": time.perf_counter() - started,
        "evaluation": rounds,
        "base_transfer_accuracy": rounds["0"]["transfer-accuracy"],
        "transfer_accuracy": rounds[str(run.rounds)]["transfer-accuracy"],
        "train_metrics": {str(r): dict(m) for r, m in result.train_metrics_clientapp.items()},
        "epsilon": epsilon_spent(run, run.rounds),
        "config": run.as_config(),
    }
    (out / "result.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def server_app(overrides: dict[str, Any] | None = None) -> ServerApp:
    """A ServerApp; `overrides` stand in for the run config where there is none (the
    in-process simulation)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_fleet(grid, FlowerRun.from_config({**context.run_config, **(overrides or {})}))

    return app


app = server_app()
