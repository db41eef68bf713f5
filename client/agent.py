"""The site's side of one round over gRPC: enrol, join a cohort, run secure aggregation
(fleetmind.aggregation.secagg's site states, converted by fleetmind.protos.secagg_codec),
and upload the masked update, writing the outbox record BEFORE the first byte of it leaves.
A round whose config says `plain_sum` (the aggregator's loopback-only ablation without
secure aggregation) skips the key and unmasking phases and uploads the update unmasked, if
the caller allows it (an aggregator on this machine's loopback; see `participate`).

    site = enroll(channel, identity_key, "site-a")
    result = participate(channel, identity_key, "site-a", update, outbox)

`participate` enrols itself (enrolment is idempotent for the same name and key) so one call
is one round. Version download and activation are not here (see client/versions.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import cast

import grpc
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleetmind.aggregation import dp, merge
from fleetmind.aggregation.encoding import site_payload
from fleetmind.aggregation.identity_proof import enroll_signed_bytes
from fleetmind.aggregation.records import OutboxEntry, OutboxRecord
from fleetmind.aggregation.secagg import DropReason, RoundPhase, SiteAdvertiseKeys, crypto
from fleetmind.aggregation.secagg.messages import MaskedInput
from fleetmind.client.outbox import Outbox
from fleetmind.client.scrub import ScrubReport
from fleetmind.protos import secagg_codec as codec
from fleetmind.protos.fleetmind.v1 import fleet_pb2, fleet_pb2_grpc

__all__ = ["Enrolment", "PlainSumRefusedError", "RoundAbortedError", "RoundResult",
           "SiteUpdate", "enroll", "may_be_summed", "participate"]


class StaleBaseError(RuntimeError):
    """The round merges deltas against a newer version than this update's: nothing was sent;
    activate the newer version and consolidate again."""


class PlainSumRefusedError(RuntimeError):
    """The aggregator asked for a round without secure aggregation, which would show it this
    site's update unmasked, and the caller did not allow that (a site allows it only for an
    aggregator on its own loopback, where the ablation runs): nothing was sent. Not retried:
    an aggregator elsewhere that asks for it is misconfigured or compromised."""


class ClipMismatchError(ValueError):
    """The round's epsilon is charged for a bound on each privacy unit that the update's
    clipping does not keep (a finer unit, a larger norm, or none): nothing was sent. Not
    retried: the site's config must change."""


# Phases a site can leave (site_only) while its vector is not yet in the sum: a site that
# missed unmasking had uploaded, and secure aggregation still sums its vector.
_BEFORE_SUM = frozenset({fleet_pb2.ROUND_PHASE_COHORT, fleet_pb2.ROUND_PHASE_ADVERTISE_KEYS,
                         fleet_pb2.ROUND_PHASE_SHARE_KEYS,
                         fleet_pb2.ROUND_PHASE_MASKED_INPUT_COLLECTION})


def may_be_summed(aborted: fleet_pb2.RoundAborted) -> bool:
    """Whether a version may still publish with this site's vector after `aborted`: False
    when the whole round ended (no version comes of it) or this site alone left it before
    its vector entered the sum; True when it left after uploading (the sum goes on with it).
    An aggregator from before drop_reason (UNSPECIFIED) says it only in text, which is no
    contract: True, because wrongly assuming "summed" only holds sessions back, while
    wrongly assuming "not summed" could send them twice."""
    if aborted.drop_reason == fleet_pb2.DROP_REASON_UNSPECIFIED:
        return True
    if not aborted.site_only:
        return False
    return aborted.phase not in _BEFORE_SUM


class RoundAbortedError(RuntimeError):
    """The aggregator aborted the round, or this site's part in it (`site_only`), in
    `phase` for `drop_reason` (None: an aggregator from before these fields), `reason` in
    words; with `retry` it runs again and the site may call `participate` again."""

    def __init__(self, round_id: int, reason: str, retry: bool,
                 phase: RoundPhase | None = None, drop_reason: DropReason | None = None,
                 site_only: bool = False) -> None:
        super().__init__(f"round {round_id} aborted: {reason}"
                         + (" (it runs again: participate again)" if retry else ""))
        self.round_id, self.reason, self.retry = round_id, reason, retry
        self.phase, self.drop_reason, self.site_only = phase, drop_reason, site_only

    @classmethod
    def from_wire(cls, round_id: int, aborted: fleet_pb2.RoundAborted) -> RoundAbortedError:
        return cls(round_id, aborted.reason, aborted.retry,
                   codec.round_phase_from_wire(aborted.phase),
                   codec.drop_reason_from_wire(aborted.drop_reason), aborted.site_only)


@dataclass(frozen=True)
class SiteUpdate:
    """What the site contributes to one round, validated at construction.

    delta: B deltas by tensor name, already clipped per privacy unit by consolidation
    (dp.clip_and_sum); norm_before_clip: their norm before that clipping (None: nothing was
    clipped, the delta's own norm is recorded). weight: the staleness weight in (0, 1],
    applied here before masking because the server cannot weight what it cannot see.
    session_ids: ids of the contributing sessions; contributing_units: privacy units summed
    (for the accountant; defaults to the number of sessions). clip_norm, privacy_unit: how
    it was clipped, each privacy_unit's delta to at most clip_norm; every round refuses an
    update without both (each round's noise is calibrated to a clip). The delta's norm is
    checked against them (one unit for "site", `units` for the others), which catches a
    mislabelled update, not a wrong clip inside it."""

    delta: Mapping[str, np.ndarray]
    base_version: int = 0
    weight: float = 1.0
    session_ids: tuple[str, ...] = ()
    scrubbed: ScrubReport = field(default_factory=ScrubReport)
    norm_before_clip: float | None = None
    contributing_units: int | None = None
    clip_norm: float | None = None
    privacy_unit: str | None = None

    def __post_init__(self) -> None:
        if not self.delta:
            raise ValueError("delta is empty: nothing to contribute")
        for name, tensor in self.delta.items():
            if not np.all(np.isfinite(tensor)):
                raise ValueError(f"delta[{name!r}] has non-finite values: refuse to send it")
        if isinstance(self.weight, bool) or not (0 < self.weight <= 1):
            raise ValueError(f"weight={self.weight} must be in (0, 1] (a staleness weight)")
        if isinstance(self.base_version, bool) or self.base_version < 0:
            raise ValueError(f"base_version={self.base_version} must be >= 0")
        if self.norm_before_clip is not None and not (
                math.isfinite(self.norm_before_clip) and self.norm_before_clip >= 0):
            raise ValueError(f"norm_before_clip={self.norm_before_clip} must be finite, >= 0")
        units = self.contributing_units
        if units is not None and (isinstance(units, bool) or units < 1):
            raise ValueError(f"contributing_units={units} must be >= 1")
        if self.privacy_unit is not None:
            dp.check_privacy_unit(self.privacy_unit)
        if self.clip_norm is not None:
            if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
                raise ValueError(f"clip_norm={self.clip_norm} must be finite and > 0")
            norm = math.sqrt(sum(float(np.sum(np.square(t, dtype=np.float64)))
                                 for t in self.delta.values()))
            units = 1 if self.privacy_unit == "site" else self.units
            # 1e-5: float32 rounding over tens of thousands of coordinates, not a missed clip
            if norm > units * self.clip_norm * (1 + 1e-5):
                raise ValueError(f"the delta's norm {norm:.4g} is more than {units} "
                                 f"{self.privacy_unit or 'unit'}(s) clipped to "
                                 f"{self.clip_norm} can sum to: it was not clipped as it "
                                 "says; clip each unit (dp.clip_and_sum)")

    @property
    def units(self) -> int:
        return self.contributing_units or max(1, len(self.session_ids))


@dataclass(frozen=True)
class Enrolment:
    site: int               # the secure-aggregation id the aggregator gave this site
    aggregator_key: bytes   # Ed25519 public key that signs manifests and the ledger
    latest_version: int


@dataclass(frozen=True)
class RoundResult:
    round_id: int
    site: int
    version: int            # the global version the round published
    cohort_size: int
    dropped: tuple[int, ...]
    payload_sha256: str     # what the outbox recorded, and the aggregator acknowledged
    outbox_entry: OutboxEntry
    round_config: fleet_pb2.RoundConfig  # as the aggregator sent it: codes, clip, noise


def enroll(channel: grpc.Channel, identity_key: Ed25519PrivateKey, site_name: str,
           timeout: float = 10.0) -> Enrolment:
    """Fleet.Enroll with the proof that this process holds `identity_key`."""
    public = crypto.identity_public_bytes(identity_key)
    reply = fleet_pb2_grpc.FleetStub(channel).Enroll(fleet_pb2.EnrollRequest(
        site_name=site_name, identity_key=public,
        proof=identity_key.sign(enroll_signed_bytes(site_name, public))), timeout=timeout)
    return Enrolment(reply.site, bytes(reply.aggregator_key), reply.latest_version)


class _Events:
    """The JoinRound stream, skipping the keep-alive `waiting` events."""

    def __init__(self, stream: Iterable[fleet_pb2.RoundEvent], site: int) -> None:
        self._stream: Iterator[fleet_pb2.RoundEvent] = iter(stream)
        self._site = site
        self.round_id = 0

    def expect(self, kind: str) -> fleet_pb2.RoundEvent:
        for event in self._stream:
            which = event.WhichOneof("event")
            if which == "waiting":
                continue
            self.round_id = event.round_id or self.round_id
            if which == "aborted":
                raise RoundAbortedError.from_wire(self.round_id, event.aborted)
            if which != kind:
                raise RuntimeError(f"site {self._site}: expected {kind} from the aggregator, "
                                   f"got {which} (round {self.round_id}): the protocol is out "
                                   "of step; join the next round")
            return event
        raise ConnectionError(f"site {self._site}: the round stream ended before {kind}; "
                              "re-join with the round id to resume")


def _noise(wire: fleet_pb2.RoundConfig, add_noise: bool) -> tuple[dp.DPConfig | None, str,
                                                                    float]:
    """The DP config this site adds noise under (None: it adds none), and the (mode,
    multiplier) the outbox records: what THIS site's payload carries."""
    if not add_noise or wire.noise_multiplier == 0 or wire.noise_mode == "central":
        return None, "none", 0.0
    # Both were checked before this is called: the unit by participate's dp.bounds check,
    # the mode by codec.payload_codes (DPConfig refuses any other; it checks again here).
    unit = cast(dp.PrivacyUnit, _promised_unit(wire))
    mode = cast(dp.NoiseMode, wire.noise_mode)
    config = dp.DPConfig(wire.clip_norm, wire.noise_multiplier, unit, mode,
                         max(1, wire.expected_cohort))
    return config, wire.noise_mode, wire.noise_multiplier


def _promised_unit(wire: fleet_pb2.RoundConfig) -> str:
    """The unit the round's epsilon is for; aggregators from before the field meant sessions."""
    return wire.privacy_unit or "session"


def participate(channel: grpc.Channel, identity_key: Ed25519PrivateKey, site_name: str,
                update: SiteUpdate, outbox: Outbox, *, round_id: int | None = None,
                add_noise: bool = True, rng: np.random.Generator | None = None,
                chunk_bytes: int = codec.DEFAULT_CHUNK_BYTES,
                timeout: float = 30.0, allow_plain_sum: bool = False,
                participation: Callable[[int, fleet_pb2.RoundConfig], dict | None] | None = None
                ) -> RoundResult:
    """Runs one round for this site and returns what it published.

    The update is flattened in sorted-name order (merge.flatten), weighted, noised as the
    round's config says (distributed: this site's integer share in the ring; local: the full
    Gaussian; central: none here; `add_noise=False` turns site noise off, and the outbox
    then records mode 'none'), encoded (encoding.site_payload) and masked. A round whose
    config says `plain_sum` skips the key and unmasking phases and sends it unmasked, but
    only with `allow_plain_sum` (pass it only for an aggregator on loopback: the server
    itself refuses the mode anywhere else); without, PlainSumRefusedError. The outbox record
    is appended, durably, before SubmitMaskedVector is called. Raises RoundAbortedError if
    the aggregator aborts, grpc.RpcError on a refused call, ValueError on a config that does
    not fit the update."""
    rng = rng or np.random.default_rng()
    me = enroll(channel, identity_key, site_name, timeout)
    fleet = fleet_pb2_grpc.FleetStub(channel)
    request = fleet_pb2.JoinRoundRequest(site=me.site, base_version=update.base_version,
                                         contributing_units=update.units)
    if round_id is not None:
        request.round_id = round_id
    stream = fleet.JoinRound(request, timeout=timeout * 4)  # a whole round, all phases
    try:
        events = _Events(stream, me.site)

        event = events.expect("config")
        wire = event.config
        config = codec.round_config_from_wire(wire)
        if wire.base_version != update.base_version:
            raise StaleBaseError(f"the round merges deltas against version "
                                 f"{wire.base_version}, this update is against "
                                 f"{update.base_version}: nothing was sent; re-consolidate on "
                                 "the newer version")
        if wire.plain_sum and not allow_plain_sum:
            raise PlainSumRefusedError(
                f"site {me.site}: round {events.round_id} runs without secure aggregation, "
                "which would show the aggregator this site's update unmasked; sites allow "
                "that only with an aggregator on loopback (the measurement ablation): nothing "
                "was sent; the aggregator's operator must set cohort.secure_aggregation = "
                "true")

        promised = _promised_unit(wire)
        if update.clip_norm is None or update.privacy_unit is None or not dp.bounds(
                update.privacy_unit, update.clip_norm, promised, wire.clip_norm):
            how = (f"each {update.privacy_unit} to {update.clip_norm:g}"
                   if update.clip_norm is not None and update.privacy_unit is not None
                   else "without saying how")
            fix = (f"set the site's privacy_unit and clip_norm to the aggregator's "
                   f"({promised}, {wire.clip_norm:g}), or a coarser unit at half the norm"
                   if promised in dp.PRIVACY_UNITS else
                   "this site does not know that unit: upgrade it")
            raise ClipMismatchError(
                f"site {me.site}: round {events.round_id} charges epsilon for each "
                f"{promised} moving the sum by at most {wire.clip_norm:g}, and this update "
                f"was clipped {how}: nothing was sent; {fix}")

        # The encoded update, before any phase: a config that does not fit it stops the site
        # before it sends anything.
        shapes = {name: np.shape(tensor) for name, tensor in update.delta.items()}
        flat = update.weight * merge.flatten(update.delta, shapes)
        norm_after = float(np.linalg.norm(flat.astype(np.float64)))
        norm_before = norm_after if update.norm_before_clip is None \
            else max(norm_after, update.weight * update.norm_before_clip)
        delta_code, weight_code = codec.payload_codes(wire)  # checks the mode, for _noise
        noise_config, noise_mode, noise_multiplier = _noise(wire, add_noise)
        ring = site_payload(flat, update.weight, delta_code, weight_code, noise_config, rng)
        if ring.size != config.vector_length:
            raise ValueError(f"the update encodes to {ring.size} ring words, the round expects "
                             f"{config.vector_length}: the adapter shapes differ from the "
                             "aggregator's")

        if wire.plain_sum:
            # The ablation without secure aggregation (its ledger entry says so): no keys,
            # no masks, no unmasking.
            masked, unmasking = MaskedInput(config.round_id, me.site, ring), None
        else:
            # Round 0: advertise keys under the round's config.
            advertising = SiteAdvertiseKeys(config, me.site, identity_key)
            fleet.AdvertiseKeys(codec.advertisement_to_wire(advertising.advertisement),
                                timeout=timeout)
            # Round 1: share keys with the neighbours.
            keys = codec.advertised_keys_from_wire(
                events.expect("advertised_keys").advertised_keys)
            sharing = advertising.receive(keys)
            fleet.ShareKeys(codec.encrypted_shares_to_wire(sharing.encrypted_shares),
                            timeout=timeout)
            # Round 2: mask the encoded update.
            bundle = codec.shares_for_site_from_wire(
                events.expect("shares_for_site").shares_for_site)
            masked, unmasking = sharing.receive(bundle).mask(ring)
        chunks = list(codec.masked_input_to_chunks(masked, config.ring_bits, chunk_bytes))
        payload_hash = chunks[0].payload_sha256.hex()

        # The record is on disk before the first byte of the payload leaves.
        entry = outbox.append(OutboxRecord(
            round_id=events.round_id, payload_sha256=payload_hash,
            norm_before_clip=norm_before, norm_after_clip=norm_after, noise_mode=noise_mode,
            noise_multiplier=noise_multiplier, session_ids=update.session_ids,
            scrubbed=tuple(update.scrubbed.as_dict().items()), base_version=update.base_version,
            clip_norm=update.clip_norm, privacy_unit=update.privacy_unit,
            secure_aggregation=not wire.plain_sum,
            # The site's participation record (contribution.Participation): it raises
            # CapReachedError for a unit at the cap, before the payload leaves.
            participation=None if participation is None
            else participation(events.round_id, wire)))
        receipt = fleet.SubmitMaskedVector(iter(chunks), timeout=timeout)
        if receipt.payload_sha256.hex() != payload_hash:
            raise RuntimeError(f"the aggregator acknowledged payload {receipt.payload_sha256.hex()}"
                               f", the outbox recorded {payload_hash}: report this upload")

        if unmasking is not None:
            # Round 3: help unmask the cohort's sum.
            unmask = codec.unmask_request_from_wire(
                events.expect("unmask_request").unmask_request)
            fleet.Unmask(codec.unmask_shares_to_wire(unmasking.respond(unmask)),
                         timeout=timeout)

        done = events.expect("completed").completed
        return RoundResult(events.round_id, me.site, done.version, done.cohort_size,
                           tuple(done.dropped), payload_hash, entry, wire)
    finally:
        stream.cancel()
