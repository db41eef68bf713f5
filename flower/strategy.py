"""Flower's FedAvg with one method changed: `aggregate_train` is fleetmind's exact frozen-A
merge.

Flower's FedAvg averages every array it receives; for LoRA that averages A and B apart,
and mean(B_i)·mean(A_i) != mean(B_i·A_i) (docs/design.md "Exact merge"). Here A never travels:
every party derives it from the public seed, only B does. Without secure aggregation a
site replies with its adapted B (the B it was sent plus its clipped delta); the strategy
takes those differences as the sites' deltas and merges them with `aggregation.merge`,
unchanged. Under secure aggregation (the default) `flower/secure.py` sums the deltas
instead, masked, and merges the sum the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from fleetmind.aggregation import merge
from fleetmind.aggregation.aggregate_check import MAX_UNITS_PER_SITE
from fleetmind.aggregation.update import Update, UpdateError, UpdateMetadata

# The keys of the records a round's messages carry.
ARRAYS = "arrays"
METRICS = "metrics"
# A site's aggregation weight, fleetmind's `UpdateMetadata.weight`: the staleness weight,
# 1.0 in Flower's synchronous rounds.
WEIGHT = "weight"


def b_record(tensors: Mapping[str, np.ndarray]) -> ArrayRecord:
    """B per module as an ArrayRecord, in sorted-name order (the order every party uses)."""
    return ArrayRecord({name: Array(np.ascontiguousarray(tensors[name], dtype=np.float32))
                        for name in sorted(tensors)})


def b_tensors(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: record[name].numpy() for name in record}


class ExactLoRAMerge(FedAvg):
    """FedAvg's sampling and messages; fleetmind's exact merge of the B deltas.

    `optimizer` is fleetmind's server optimiser (`merge.FedAvg(eta)` or `merge.FedAdam`).
    Client-side evaluation is off: the ServerApp measures transfer on the merged model."""

    def __init__(self, optimizer: merge.FedAvg | merge.FedAdam, *, sites: int,
                 fraction_train: float = 1.0, step_units: int | None = None) -> None:
        super().__init__(fraction_train=fraction_train, fraction_evaluate=0.0,
                         min_train_nodes=max(1, round(fraction_train * sites)),
                         min_available_nodes=sites, weighted_by_key=WEIGHT,
                         arrayrecord_key=ARRAYS)
        self.optimizer = optimizer
        self.step_units = step_units  # FedAvg's rate holds up to this many units a round
        self.optimizer_state: merge.AdamMoments | None = None
        self.sent: dict[str, np.ndarray] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        # The deltas are the replies' differences to exactly this B.
        self.sent = b_tensors(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        updates, kept = [], []
        for reply in valid:
            try:
                updates.append(self.update_of(reply, server_round))
                kept.append(reply)
            except UpdateError as error:
                # One bad site must not sink the round: its reply is left out, as a dropout.
                log(WARNING, "aggregate_train: reply from node %s left out: %s",
                    reply.metadata.src_node_id, error)
        if not updates:
            return None, None
        weighted, weight_sum = merge.weighted_delta_sum(updates)
        new_b, self.optimizer_state = merge.exact_merge(
            self.sent, weighted, weight_sum,
            self.optimizer_for(sum(reply_units(reply.content) for reply in kept)),
            self.optimizer_state)
        metrics = self.train_metrics_aggr_fn([reply.content for reply in kept],
                                             self.weighted_by_key)
        return b_record(new_b), metrics

    def optimizer_for(self, units: int) -> merge.FedAvg | merge.FedAdam:
        """The server optimiser for a round that summed `units` privacy units: FedAvg's rate
        scaled as the fleet's aggregator scales it (merge.cohort_step); FedAdam as set."""
        if not isinstance(self.optimizer, merge.FedAvg):
            return self.optimizer
        return replace(self.optimizer, learning_rate=merge.cohort_step(
            self.optimizer.learning_rate, units, self.step_units))

    def update_of(self, reply: Message, server_round: int) -> Update:
        """The site's delta (its B minus the B it was sent) as a fleetmind Update, checked
        against the global shapes; UpdateError if it does not fit or is not finite."""
        adapted = b_tensors(reply.content.array_records[ARRAYS])
        metrics = reply.content.metric_records[METRICS]
        metadata = UpdateMetadata(
            site=f"node-{reply.metadata.src_node_id}", base_version=server_round - 1,
            weight=_number(metrics, WEIGHT), sessions=int(_number(metrics, "sessions", 0)),
            tokens=int(_number(metrics, "tokens", 0)))
        # Names, shapes, dtype and finiteness of what arrived, before any arithmetic on it.
        Update(adapted, metadata).validate_against(
            {name: tensor.shape for name, tensor in self.sent.items()})
        return Update({name: adapted[name] - self.sent[name] for name in adapted}, metadata)


def reply_units(content: RecordDict) -> int:
    """The privacy units a site's training reply declares (1..MAX_UNITS_PER_SITE, as the
    fleet's aggregator admits at join; 1 if it declares none)."""
    metrics = content.metric_records.get(METRICS)
    value = None if metrics is None else metrics.get("units")
    if not isinstance(value, int | float) or not value >= 1:
        return 1
    return int(min(value, MAX_UNITS_PER_SITE))


def _number(metrics: MetricRecord, key: str, default: float | None = None) -> float:
    """A reply's scalar metric; UpdateError if it is missing (without a default) or a list."""
    value = metrics.get(key, default)
    if value is None or isinstance(value, list):
        raise UpdateError(f"metric {key!r} is {value!r}, need a number")
    return float(value)
