"""The exact merge under fleetmind's SecAgg+, in Flower messages: the ServerApp drives the
library's server states (aggregation/secagg/server_r*.py) in the order the fleet's own
coordinator does (server/coordinator.py), over Flower's Grid instead of gRPC.

One Flower round:

    train                  B and the round's encoding -> each sampled node trains, clips
                           per privacy unit, encodes its delta into ring words (with its
                           share of the noise) and keeps them; replies with its identity key
    secagg_advertise_keys  the round's config (graph, threshold, identities) -> signed keys
    secagg_share_keys      the neighbours' keys -> encrypted shares for them
    secagg_masked_input    the shares addressed to it -> its masked vector
    secagg_unmasking       who survived, who dropped -> shares that strip the masks

Each phase closes when every node answered or `round-timeout` passed; a node that did not
answer, or answered with an error or something the state refuses, has dropped, and the
states go on without it exactly as on the fleet's wire (its pairwise masks are rebuilt from
its neighbours' shares). The ServerApp holds the masked vectors of one phase and the
unmasked sum, never one site's delta: the states keep only the running sum.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from fleetmind.aggregation import merge
from fleetmind.aggregation.accountant import Budget, RoundCharge, worst_case_charge
from fleetmind.aggregation.aggregate_check import (
    AggregateBounds,
    AggregateRejectedError,
    check_merged,
)
from fleetmind.aggregation.dp import DPConfig, PrivacyUnit
from fleetmind.aggregation.participation import ParticipationCap
from fleetmind.aggregation.secagg import (
    NeighbourGraph,
    ProtocolError,
    RoundConfig,
    ServerAborted,
    ServerAdvertiseKeys,
    ServerCompleted,
    crypto,
    majority_threshold,
    secagg_plus_degree,
)
from fleetmind.aggregation.secagg.server_r1_share_keys import ServerShareKeys
from fleetmind.aggregation.secagg.server_r2_masked_input_collection import (
    ServerMaskedInputCollection,
)
from fleetmind.aggregation.secagg.server_r3_unmasking import ServerUnmasking
from fleetmind.flower import secagg_messages as carried
from fleetmind.flower.settings import FlowerRun
from fleetmind.flower.strategy import ExactLoRAMerge, b_record, reply_units
from fleetmind.protos import secagg_codec as codec
from fleetmind.protos.fleetmind.v1 import fleet_pb2

PhaseState = ServerAdvertiseKeys | ServerShareKeys | ServerMaskedInputCollection | ServerUnmasking
# Every Flower site sends weight 1 (the rounds are synchronous: no staleness), so the
# aggregate check's least honest weight is 1, not the fleet's 0.01: a weight word that
# shrinks the weight sum, to inflate the mean, is refused sooner.
SITE_WEIGHT = 1.0


def round_encoding(run: FlowerRun, cohort: int) -> fleet_pb2.RoundConfig:
    """The encoding fields of the fleet's RoundConfig for a round of `cohort` sampled sites:
    sites encode with `codec.payload_codes` of it and the ServerApp decodes with the same.
    Without clipping the code's per-coordinate clip is the only bound, and C only names
    it (the codes need a C > 0; with no noise it sizes nothing)."""
    return fleet_pb2.RoundConfig(
        clip_norm=run.dp_clip_norm or run.fixed_point_clip,
        noise_multiplier=run.dp_noise_multiplier, noise_mode="distributed",
        privacy_unit=run.unit, expected_cohort=cohort, fixed_point_clip=run.fixed_point_clip,
        cohort_max=run.sites, ring_bits=run.ring_bits,
        participation_cap=run.participation_cap)


def distributed_noise(encoding: fleet_pb2.RoundConfig) -> DPConfig | None:
    """The DP config of a round's distributed noise, or None without noise."""
    if encoding.noise_multiplier == 0:
        return None
    return DPConfig(encoding.clip_norm, encoding.noise_multiplier,
                    cast(PrivacyUnit, encoding.privacy_unit),  # DPConfig checks it
                    "distributed", encoding.expected_cohort)


def privacy_budget(run: FlowerRun, charges: list[RoundCharge]) -> Budget:
    """The run's budget over `charges` (the list itself: what it admits is appended there),
    by the fleet's accountant: `epsilon-budget` at `dp-delta`, per unit under the
    participation cap K (the K most expensive rounds), every round composed without one."""
    cap = ParticipationCap(run.participation_cap) if run.participation_cap else None
    return Budget(run.epsilon_budget, run.dp_delta, charges=charges, cap=cap)


def aggregate_bounds(run: FlowerRun, encoding: fleet_pb2.RoundConfig) -> AggregateBounds:
    """What an honest cohort sum of the round can hold (the fleet's aggregate check): C
    per privacy unit (none without clipping: then only the fixed-point clip bounds a
    delta), the round's codes and distributed noise, each site's weight 1."""
    delta_code, weight_code = codec.payload_codes(encoding)
    return AggregateBounds(run.dp_clip_norm or None, run.fixed_point_clip, delta_code,
                           weight_code, distributed_noise(encoding),
                           min_site_weight=SITE_WEIGHT)


class SecureLoRAMerge(ExactLoRAMerge):
    """ExactLoRAMerge's sampling and merge, with the deltas summed under SecAgg+.

    With noise, a round the privacy budget cannot pay (`privacy_budget`, charged the
    most the round can cost: `accountant.worst_case_charge`, as the fleet's coordinator
    charges) is refused before anything is sent. The
    unmasked sum is checked (`aggregate_bounds`, the fleet's aggregate check) before it is
    merged; a sum that fails is not merged. `charges` holds the privacy charge of each
    round whose sum the ServerApp saw, merged or refused by the check (the noise multiplier
    the sum really carried: dropped sites took their noise shares with them); `outcomes`
    what each round did, by round."""

    def __init__(self, optimizer: merge.FedAvg | merge.FedAdam, run: FlowerRun) -> None:
        super().__init__(optimizer, sites=run.sites, fraction_train=run.fraction_train,
                         step_units=run.server_step_units or None)
        self.run = run
        self.grid: Grid | None = None
        self.encoding = round_encoding(run, run.sites)
        self.charges: list[RoundCharge] = []
        self.budget = privacy_budget(run, self.charges) if run.dp_noise_multiplier else None
        self.outcomes: dict[int, dict[str, Any]] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.grid = grid  # the secure phases run inside aggregate_train, on the same grid
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.encoding = round_encoding(self.run, len(messages))
        refusal = self._budget_refusal(len(messages))
        if refusal is not None:
            # Refused before anything is sent: nothing runs, nothing is spent.
            assert self.budget is not None
            log(WARNING, "round %s refused: %s", server_round, refusal)
            self.outcomes[server_round] = {
                "refused": "privacy_budget", "reason": refusal,
                "epsilon_per_unit": self.budget.epsilon_spent,
                "epsilon_budget": self.budget.epsilon_limit}
            return []
        for message in messages:  # they share one config record
            message.content.config_records["config"][carried.ENCODING] = \
                self.encoding.SerializeToString()
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.outcomes.get(server_round, {}).get("refused"):
            return None, None  # the budget refused it: nothing was sent
        # The replies hold no B: an identity key and counts (FedAvg's check wants arrays).
        valid, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        ready = {}
        for reply in valid:
            try:
                key = carried.read_bytes(reply.content, carried.IDENTITY)
                if len(key) != crypto.PUBLIC_KEY_BYTES:
                    raise ProtocolError("malformed", f"identity key of {len(key)} bytes")
            except ProtocolError as error:
                log(WARNING, "node %s left out: %s", reply.metadata.src_node_id, error)
                continue
            ready[reply.metadata.src_node_id] = (key, reply)
        if len(ready) < self.run.min_cohort:
            return self._aborted(server_round, "cohort", f"{len(ready)} sites trained, "
                                 f"minimum cohort {self.run.min_cohort}")
        nodes = sorted(ready)  # site ids 1..n: Shamir x-coordinates, and 4 bytes on the wire
        cohort = range(1, len(nodes) + 1)
        graph = NeighbourGraph.harary(cohort, secagg_plus_degree(len(nodes),
                                                                 self.run.dropout_rate))
        config = RoundConfig(server_round, graph, majority_threshold(graph.min_degree),
                             self.run.min_cohort,
                             sum(b.size for b in self.sent.values()) + 1,  # + the weight word
                             self.run.ring_bits,
                             {site: ready[node][0] for site, node in zip(cohort, nodes,
                                                                          strict=True)})
        result = self.secure_sum(config, dict(zip(cohort, nodes, strict=True)))
        if isinstance(result, ServerAborted):
            return self._aborted(server_round, result.phase, result.reason)
        delta_code, weight_code = codec.payload_codes(self.encoding)
        shapes = {name: b.shape for name, b in self.sent.items()}
        weighted, weight_sum = merge.open_secagg_sum(np.asarray(result.cohort_sum), shapes,
                                                     delta_code, weight_code)
        contributed = [ready[nodes[site - 1]][1].content for site in result.contributors]
        # Dropped: trained, but not in the sum (lost or refused in some phase).
        outcome: dict[str, Any] = {"contributors": len(result.contributors),
                                   "dropped": len(nodes) - len(result.contributors)}
        try:
            aggregate_bounds(self.run, self.encoding).check(
                merge.flatten(weighted, shapes), weight_sum, len(result.contributors),
                max(reply_units(content) for content in contributed))
            new_b, optimizer_state = merge.exact_merge(
                self.sent, weighted, weight_sum,
                self.optimizer_for(sum(reply_units(content) for content in contributed)),
                self.optimizer_state)
            check_merged(new_b)
        except AggregateRejectedError as error:
            # The ServerApp saw the (noised) sum: its charge is spent, as on the fleet.
            self._charge(len(result.contributors))
            return self._rejected(server_round, error, outcome)
        except (ValueError, ArithmeticError) as error:
            return self._aborted(server_round, "merge", str(error))
        self.optimizer_state = optimizer_state
        self._charge(len(result.contributors))
        self.outcomes[server_round] = outcome
        metrics = self.train_metrics_aggr_fn(contributed, self.weighted_by_key)
        metrics.update(outcome)
        return b_record(new_b), metrics

    def secure_sum(self, config: RoundConfig, node_of: Mapping[int, int]
                   ) -> ServerCompleted | ServerAborted:
        """The four phases over the grid, from round 0 to the unmasked sum or an abort."""
        assert self.grid is not None, "configure_train sets the grid"
        site_of = {node: site for site, node in node_of.items()}
        state: PhaseState = ServerAdvertiseKeys(config)
        outgoing = {site: carried.carry({carried.ROUND_CONFIG: codec.round_config_to_wire(
                                             config, site), carried.SITE: site})
                    for site in node_of}
        while True:
            action, decode = _PHASES[type(state)]
            messages = [Message(content, dst_node_id=node_of[site],
                                message_type=f"train.{action}")
                        for site, content in outgoing.items()]
            for reply in self.grid.send_and_receive(messages, timeout=self.run.round_timeout):
                node = reply.metadata.src_node_id
                if reply.has_error():
                    log(INFO, "%s: node %s dropped: %s", state.phase, node, reply.error.reason)
                    continue
                try:
                    sender, message = decode(reply.content)
                    if sender != site_of.get(node):
                        raise ProtocolError("unknown_site", f"node {node} sent a message as "
                                                            f"site {sender}")
                    state.receive(message)
                except ProtocolError as error:
                    # Refused, as the coordinator refuses it: the site has left the phase.
                    log(WARNING, "%s: node %s refused (%s): %s", state.phase, node,
                        error.kind, error)
            closed = state.close()
            if isinstance(closed, ServerCompleted | ServerAborted):
                return closed
            state = closed
            outgoing = _onward(state)

    def _budget_refusal(self, cohort: int) -> str | None:
        """Why a round of `cohort` sampled sites must not run (the budget cannot pay the
        most it can cost), or None: it may, or there is no noise and no budget."""
        if self.budget is None or cohort == 0:
            return None  # without noise no budget; no sites sampled, nothing to run
        noise = distributed_noise(self.encoding)
        if noise is None:
            return None
        refusal = self.budget.refusal(worst_case_charge(noise, self.run.min_cohort))
        return None if refusal is None else f"privacy budget exhausted: {refusal}"

    def _charge(self, contributors: int) -> None:
        """Records the charge of a sum the ServerApp saw: the z it really carried."""
        noise = distributed_noise(self.encoding)
        if noise is not None:
            self.charges.append(RoundCharge(noise.effective_noise_multiplier(contributors)))

    def _aborted(self, server_round: int, phase: str, reason: str) -> tuple[None, None]:
        """Nothing is published: Flower keeps the B it sent."""
        log(WARNING, "round %s published nothing: %s: %s", server_round, phase, reason)
        self.outcomes[server_round] = {"aborted": phase, "reason": reason}
        return None, None

    def _rejected(self, server_round: int, error: AggregateRejectedError,
                  outcome: dict[str, Any]) -> tuple[None, None]:
        """The unmasked sum failed the aggregate check: not merged, nothing is published
        (Flower keeps the B it sent); the check's name and numbers go to the outcome."""
        log(WARNING, "round %s rejected by the aggregate check %s: %s", server_round,
            error.check, error)
        self.outcomes[server_round] = {"aborted": "merge", "rejected": error.check,
                                       "reason": str(error), "measured": error.measured,
                                       "allowed": None if error.allowed is None
                                       else list(error.allowed), **outcome}
        return None, None


def _onward(state: PhaseState) -> dict[int, RecordDict]:
    """What the phase `state` opens sends each site (the coordinator's `_close_phase`)."""
    if isinstance(state, ServerShareKeys):
        return {site: carried.carry({
            carried.ADVERTISED_KEYS: codec.advertised_keys_to_wire(keys)})
            for site, keys in state.to_sites.items()}
    if isinstance(state, ServerMaskedInputCollection):
        return {site: carried.carry({
            carried.SHARES_FOR_SITE: codec.shares_for_site_to_wire(bundle)})
            for site, bundle in state.to_sites.items()}
    if isinstance(state, ServerUnmasking):
        request = codec.unmask_request_to_wire(state.request)
        return {site: carried.carry({carried.UNMASK_REQUEST: request})
                for site in state.request.survivors}
    raise TypeError(f"no phase opens with {type(state).__name__}")


def _advertisement(content: RecordDict) -> tuple[int, Any]:
    message = codec.advertisement_from_wire(
        carried.read(content, carried.ADVERTISEMENT, fleet_pb2.KeyAdvertisement))
    return message.site, message


def _encrypted_shares(content: RecordDict) -> tuple[int, Any]:
    message = codec.encrypted_shares_from_wire(
        carried.read(content, carried.ENCRYPTED_SHARES, fleet_pb2.EncryptedShares))
    return message.sender, message


def _masked_input(content: RecordDict) -> tuple[int, Any]:
    message = carried.read_masked_input(content)
    return message.site, message


def _unmask_shares(content: RecordDict) -> tuple[int, Any]:
    message = codec.unmask_shares_from_wire(
        carried.read(content, carried.UNMASK_SHARES, fleet_pb2.UnmaskShares))
    return message.site, message


# Per server state: the ClientApp action that answers it, and how to read the answer (the
# sending site, the library's message).
_PHASES: dict[type, tuple[str, Callable[[RecordDict], tuple[int, Any]]]] = {
    ServerAdvertiseKeys: (carried.ADVERTISE_KEYS, _advertisement),
    ServerShareKeys: (carried.SHARE_KEYS, _encrypted_shares),
    ServerMaskedInputCollection: (carried.MASKED_INPUT, _masked_input),
    ServerUnmasking: (carried.UNMASKING, _unmask_shares),
}


