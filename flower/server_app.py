"""The ServerApp: rounds of the exact merge (under secure aggregation, `SecureLoRAMerge`:
it sees masked vectors and the cohort sum only), an evaluation of each merged model when
the run config names one, and the result on disk (`result.json`, with the privacy spent
per unit and each secure round's contributors and dropouts; `global_b.safetensors`;
`adapter/` as a PEFT folder).

With noise, a round the run's `epsilon-budget` cannot pay is refused before anything is
sent, and a cohort sum that fails the aggregate check is not merged; both are recorded in
`secure_rounds` with why (and the check's numbers).

The evaluation is a parameter, as in Flower's app templates: the run config's `evaluate`
names a factory "module:function" (see `Evaluation`); the app knows no dataset.
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Callable, Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from fleetmind.aggregation import merge
from fleetmind.aggregation.accountant import RoundCharge
from fleetmind.flower.secure import SecureLoRAMerge, privacy_budget
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


def make_strategy(run: FlowerRun) -> ExactLoRAMerge:
    """The exact merge, of deltas summed under SecAgg+ (`SecureLoRAMerge`) or, without
    secure aggregation, of the sites' B replies in the clear."""
    optimizer = merge.FedAvg(run.server_learning_rate)
    if run.secure_aggregation:
        return SecureLoRAMerge(optimizer, run)
    return ExactLoRAMerge(optimizer, sites=run.sites, fraction_train=run.fraction_train,
                          step_units=run.server_step_units or None)


def privacy_spent(run: FlowerRun, charges: list[RoundCharge]) -> dict[str, Any]:
    """What the run spent, per privacy unit, for result.json: the unit, C, z, the cap and
    the budget, and epsilon(dp-delta) of one unit by fleetmind's accountant (the K most
    expensive rounds under a participation cap K, every round without;
    `Budget.unit_epsilon`), or None without noise. Each round's charge is the z its sum
    really carried. The rounds the budget refused are in `secure_rounds`."""
    spent: dict[str, Any] = {
        "privacy_unit": run.unit, "clip_norm": run.dp_clip_norm or None,
        "noise_multiplier": run.dp_noise_multiplier, "noise": "distributed"
        if run.dp_noise_multiplier else "none", "secure_aggregation": run.secure_aggregation,
        "participation_cap": run.participation_cap or None, "rounds_charged": len(charges),
        "epsilon_budget": run.epsilon_budget if run.dp_noise_multiplier else None}
    if not run.dp_noise_multiplier:
        return {**spent, "epsilon_per_unit": None, "delta": run.dp_delta}
    # The ServerApp's own budget, over a copy: this only reads what was spent.
    return {**spent, **privacy_budget(run, list(charges)).unit_epsilon().to_json()}


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

    strategy = make_strategy(run)
    result = strategy.start(grid=grid, initial_arrays=b_record(zero_b),
                            num_rounds=run.rounds, timeout=run.round_timeout,
                            train_config=ConfigRecord(),
                            evaluate_fn=None if evaluation is None else evaluate)
    final_b = b_tensors(result.arrays) if len(result.arrays) else zero_b
    out = Path(run.out)
    out.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(final_b, str(out / "global_b.safetensors"))
    lora.set_b(model, final_b)
    lora.save_adapter(model, out / "adapter")
    secure = strategy if isinstance(strategy, SecureLoRAMerge) else None
    summary = {
        "sites": run.sites, "rounds": run.rounds, "seconds": time.perf_counter() - started,
        "evaluation": {str(r): dict(metrics) for r, metrics in
                       sorted(result.evaluate_metrics_serverapp.items())},
        "train_metrics": {str(r): dict(m) for r, m in result.train_metrics_clientapp.items()},
        "privacy": privacy_spent(run, secure.charges if secure else []),
        # Per round: contributors and dropouts, or the phase it aborted in and why (a sum
        # the aggregate check rejected: the check and its numbers), or the budget's refusal.
        "secure_rounds": secure.outcomes if secure else {},
        "config": run.as_config(),
    }
    (out / "result.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(INFO, "privacy spent: %s", summary["privacy"])
    for server_round, outcome in sorted(secure.outcomes.items() if secure else []):
        if "refused" in outcome or "rejected" in outcome:
            log(WARNING, "round %s published nothing: %s", server_round, outcome["reason"])
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
