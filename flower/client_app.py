"""The ClientApp: one SuperNode is one site, consolidating its sessions with fleetmind's
own OPSD (`client.consolidate.consolidate_sessions`), clipping each privacy unit as the site
agent does (`client.contribution.clip_per_unit`), and contributing the clipped delta under
fleetmind's SecAgg+ (`flower/secure.py`; the four `secagg_*` actions) or, without secure
aggregation, as its adapted B in the clear.

State lives on disk in the site's folder (from the node config), not in Flower's
`Context.state`, which does not survive a run: the session store remembers which sessions
a consolidation used, so a later round or run learns only from new ones; the replay
buffer keeps dreams; `participation.jsonl` the rounds each privacy unit entered (under a
participation cap); every clipped delta the site contributed is kept as
`round-NNNN-update.safetensors`. Only a secure round's keys and encoded update live in
`Context.state`, for the phases of that round (`flower/secagg_site.py`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fleetmind.aggregation import merge
from fleetmind.aggregation.encoding import site_payload
from fleetmind.aggregation.participation import (
    ParticipationCap,
    ParticipationRecord,
    participation_history,
    record_round,
)
from fleetmind.aggregation.secagg import ProtocolError
from fleetmind.aggregation.secagg.crypto import identity_public_bytes
from fleetmind.aggregation.update import Update
from fleetmind.flower import secagg_messages as carried
from fleetmind.flower import secagg_site
from fleetmind.flower.secure import distributed_noise
from fleetmind.flower.settings import FlowerRun, SiteNode
from fleetmind.flower.strategy import ARRAYS, METRICS, WEIGHT, b_record, b_tensors
from fleetmind.protos import secagg_codec as codec
from fleetmind.protos.fleetmind.v1 import fleet_pb2

PARTICIPATION_FILE = "participation.jsonl"


def client_app(overrides: dict[str, Any] | None = None) -> ClientApp:
    """A ClientApp; `overrides` stand in for the run config where there is none (the
    in-process simulation)."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        run = FlowerRun.from_config({**context.run_config, **(overrides or {})})
        site = SiteNode.from_node_config(context.node_config, run)
        server_round = int(cast(int, message.content.config_records["config"]["server-round"]))
        return consolidate_site(message, run, site, server_round, context)

    def phase(action: str, answer: Callable[[Context, RecordDict], RecordDict]) -> None:
        """A secure-aggregation phase: the library's site state answers, or the site
        leaves the round with the refusal as its error (the ServerApp counts a dropout)."""
        def handle(message: Message, context: Context) -> Message:
            try:
                return Message(answer(context, message.content), reply_to=message)
            except ProtocolError as error:
                return Message(Error(ErrorCode.UNKNOWN, f"{error.kind}: {error}"),
                               reply_to=message)
        app.train(action)(handle)

    phase(carried.ADVERTISE_KEYS, lambda context, content: carried.carry({
        carried.ADVERTISEMENT: codec.advertisement_to_wire(secagg_site.advertise(
            context, carried.read(content, carried.ROUND_CONFIG, fleet_pb2.RoundConfig),
            carried.read_int(content, carried.SITE)))}))
    phase(carried.SHARE_KEYS, lambda context, content: carried.carry({
        carried.ENCRYPTED_SHARES: codec.encrypted_shares_to_wire(secagg_site.share(
            context, codec.advertised_keys_from_wire(carried.read(
                content, carried.ADVERTISED_KEYS, fleet_pb2.AdvertisedKeys))))}))
    phase(carried.MASKED_INPUT, lambda context, content: carried.masked_input(
        secagg_site.mask(context, codec.shares_for_site_from_wire(carried.read(
            content, carried.SHARES_FOR_SITE, fleet_pb2.SharesForSite)))))
    phase(carried.UNMASKING, lambda context, content: carried.carry({
        carried.UNMASK_SHARES: codec.unmask_shares_to_wire(secagg_site.unmask(
            context, codec.unmask_request_from_wire(carried.read(
                content, carried.UNMASK_REQUEST, fleet_pb2.UnmaskRequest))))}))
    return app


@dataclass(frozen=True)
class SiteContribution:
    """What a site contributes to one round: its delta clipped per privacy unit, and the
    counts it reports (sessions, tokens, privacy units)."""

    delta: dict[str, np.ndarray]
    sessions: int
    tokens: int
    units: int


def consolidate_site(message: Message, run: FlowerRun, site: SiteNode, server_round: int,
                     context: Context) -> Message:
    """One round at one site: its contribution (`site_contribution`), then under secure
    aggregation its delta encoded for the ring and kept for round 2, the reply carrying the
    node's identity key; without, the reply carries the adapted B (sent B + delta). An
    error when the site has nothing new to contribute."""
    sent = b_tensors(message.content.array_records[ARRAYS])
    contribution = site_contribution(sent, run, site, server_round)
    if isinstance(contribution, str):
        # Not a crash (CLIENT_APP_RAISED_EXCEPTION): the reason says what it is.
        return Message(Error(ErrorCode.UNKNOWN, contribution), reply_to=message)
    metrics = MetricRecord({WEIGHT: 1.0, "sessions": contribution.sessions,
                            "tokens": contribution.tokens, "units": contribution.units})
    if not run.secure_aggregation:
        adapted = {name: sent[name] + contribution.delta[name] for name in sent}
        return Message(RecordDict({ARRAYS: b_record(adapted), METRICS: metrics}),
                       reply_to=message)
    encoding = fleet_pb2.RoundConfig.FromString(cast(
        bytes, message.content.config_records["config"][carried.ENCODING]))
    secagg_site.start(context, encode(contribution.delta, encoding))
    content = carried.carry(
        {carried.IDENTITY: identity_public_bytes(secagg_site.identity(context))})
    content[METRICS] = metrics
    return Message(content, reply_to=message)


def encode(delta: dict[str, np.ndarray], encoding: fleet_pb2.RoundConfig,
           rng: np.random.Generator | None = None) -> np.ndarray:
    """The ring words of a site's clipped delta (weight 1: Flower's rounds are
    synchronous), with its share of the round's discrete Gaussian noise added in the ring,
    as the site agent encodes its update (`encoding.site_payload`, the one encoder)."""
    flat = merge.flatten(delta, {name: t.shape for name, t in delta.items()})
    return site_payload(flat, 1.0, *codec.payload_codes(encoding), distributed_noise(encoding),
                        rng or np.random.default_rng())


def site_contribution(sent: dict[str, np.ndarray], run: FlowerRun, site: SiteNode,
                      server_round: int) -> SiteContribution | str:
    """The site's new sessions (those whose privacy unit is under the participation cap)
    distilled from `sent`, with the world's guard prompts when the site has them (else
    consolidation's own, from the sessions), then clipped per privacy unit
    (`clip_per_unit`); the units' participation is recorded before anything leaves. A
    reason (str) instead when there is nothing new to contribute."""
    from fleetmind.client import lora
    from fleetmind.client.consolidate import consolidate_sessions, read_prompts
    from fleetmind.client.contribution import clip_per_unit, unit_id, within_unit_cap
    from fleetmind.client.replay import ReplayBuffer
    from fleetmind.client.store import SessionStore
    from fleetmind.runtime.durable import atomic_write

    model, tokenizer = _adapted_model(str(run.model_path()), run.lora_seed, run.lora_rank,
                                      run.lora_alpha, run.torch_threads,
                                      _hashable(run.lora_targets), run.device,
                                      run.distill.dtype)
    lora.set_b(model, sent)
    site.state.mkdir(parents=True, exist_ok=True)
    guard_file = Path(run.world) / "guard.jsonl"
    guard = read_prompts(guard_file) if guard_file.is_file() else ()
    records = read_participation(site.state)
    cap = ParticipationCap(run.participation_cap) if run.participation_cap else None
    with SessionStore(site.state) as store:
        store.ingest_file(site.sessions)
        sessions, capped = within_unit_cap(run.unit, site.name, store.unconsumed(),
                                           participation_history(records), cap)
        if not sessions:
            return (f"site {site.name}: every session was used by an earlier consolidation"
                    + (f" or its privacy unit entered {run.participation_cap} rounds, the "
                       "participation cap" if capped else "") + "; nothing new to contribute")
        replay = ReplayBuffer(site.state / "replay.db")
        try:
            result = consolidate_sessions(model, tokenizer, sessions, run.distill,
                                          site=site.name, base_version=server_round - 1,
                                          seed=run.lora_seed, guard=guard, replay=replay,
                                          per_session=run.unit != "site", progress=False)
        finally:
            replay.close()
        if run.dp_clip_norm > 0:
            clipped = clip_per_unit(result, sessions, run.unit, run.dp_clip_norm, site.name)
            delta, units = clipped.delta, clipped.units
        else:
            delta, units = dict(result.update.tensors), 1
        if cap is not None:
            # Written before the delta leaves: a round that then fails still counts (errs
            # high), as the site agent's outbox record does.
            append_participation(site.state, record_round(
                [unit_id(run.unit, site.name, s) for s in sessions],
                participation_history(records), cap, len(records), run.unit))
        atomic_write(site.state / f"round-{server_round:04d}-update.safetensors",
                     Update(delta, result.update.metadata).to_bytes())
        store.record_consolidation(result.consolidation_id, [s.id for s in sessions])
    return SiteContribution(delta, len(sessions), result.stats.tokens, units)


def read_participation(state: Path) -> list[ParticipationRecord]:
    """The site's participation records, oldest first (one JSON object a line); each round
    a unit entered has its own number, the record's place in the file."""
    path = state / PARTICIPATION_FILE
    if not path.is_file():
        return []
    return [ParticipationRecord.from_json(json.loads(line))
            for line in path.read_text().splitlines() if line.strip()]


def append_participation(state: Path, record: ParticipationRecord) -> None:
    with (state / PARTICIPATION_FILE).open("a") as file:
        file.write(json.dumps(record.to_json(), sort_keys=True) + "\n")
        file.flush()


def _hashable(targets: str | list[str]) -> str | tuple[str, ...]:
    return targets if isinstance(targets, str) else tuple(targets)


@functools.cache
def _adapted_model(model: str, seed: int, rank: int, alpha: float, threads: int,
                   targets: str | tuple[str, ...] = "mlp", device: str = "cpu",
                   dtype: str = "float32") -> tuple[Any, Any]:
    """One PEFT model per process, reused across rounds and across the virtual sites a
    simulation worker serves in turn (B is set from each message, A is the seed's)."""
    import torch

    from fleetmind.client import lora
    from fleetmind.client.model import load_model

    # Simulation workers share the machine's cores; one torch thread each avoids
    # oversubscribing them.
    torch.set_num_threads(threads)
    base, tokenizer = load_model(model, dtype=dtype, device=device)
    return lora.attach_lora(base, seed=seed, rank=rank, alpha=alpha,
                            targets=targets if isinstance(targets, str) else list(targets)
                            ), tokenizer


app = client_app()
