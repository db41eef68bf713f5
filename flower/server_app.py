"""The ServerApp: rounds of `ExactLoRAMerge`, an evaluation of each merged model when the
run config names one, and the result on disk (`result.json`, `global_b.safetensors`,
`adapter/` as a PEFT folder).

The evaluation is a parameter, as in Flower's app templates: the run config's `evaluate`
names a factory "module:function" (see `Evaluation`); the app knows no dataset.
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Callable, Mapping
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

# What the run config's `evaluate` names: a factory called once with the run, the PEFT
# model (the run's base model with its LoRA attached) and its tokenizer; it returns the
# evaluation, called after every round (round 0: the starting B) once the merged B is set
# on that model, which returns named metrics.
Evaluation = Callable[[int], Mapping[str, float]]
EvaluationFactory = Callable[[FlowerRun, Any, Any], Evaluation]


def load_evaluation(run: FlowerRun, model: Any, tokenizer: Any) -> Evaluation | None:
    """The evaluation the run config names, or None when it names none."""
    if not run.evaluate:
        return None
    module, _, name = run.evaluate.partition(":")
    try:
        factory: EvaluationFactory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"evaluate={run.evaluate!r}: {error}; name an importable "
                         "'module:function'") from None
    return factory(run, model, tokenizer)


def adapted_model(run: FlowerRun) -> tuple[Any, Any]:
    """The run's base model with its LoRA attached (A from the seed, B zero), and tokenizer."""
    from fleetmind.client import lora
    from fleetmind.client.model import load_model

    base, tokenizer = load_model(run.model_path())
    return lora.attach_lora(base, seed=run.lora_seed, rank=run.lora_rank,
                            alpha=run.lora_alpha, targets=run.lora_targets), tokenizer


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
    model, tokenizer = adapted_model(run)
    zero_b = {name: np.zeros_like(b) for name, b in lora.get_b(model).items()}
    evaluation = load_evaluation(run, model, tokenizer)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        assert evaluation is not None
        lora.set_b(model, b_tensors(arrays))
        return MetricRecord(dict(evaluation(server_round)))

    result = make_strategy(run).start(grid=grid, initial_arrays=b_record(zero_b),
                                      num_rounds=run.rounds, timeout=run.round_timeout,
                                      train_config=ConfigRecord(),
                                      evaluate_fn=None if evaluation is None else evaluate)
    final_b = b_tensors(result.arrays) if len(result.arrays) else zero_b
    out = Path(run.out)
    out.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(final_b, str(out / "global_b.safetensors"))
    lora.set_b(model, final_b)
    lora.save_adapter(model, out / "adapter")
    summary = {
        "sites": run.sites, "rounds": run.rounds, "seconds": time.perf_counter() - started,
        "evaluation": {str(r): dict(metrics) for r, metrics in
                       sorted(result.evaluate_metrics_serverapp.items())},
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
