"""The aggregator's gRPC services (protos/fleetmind/v1): Fleet, Models, Audit, plus standard
health checking and reflection, and `serve`, which starts them all.

The servicers translate and authorise; the coordinator decides. Every refusal is a
precise status, changes no state, and is counted by reason (metrics.REFUSAL_REASONS):

    malformed                              INVALID_ARGUMENT
    wrong_round, below_threshold,
    inconsistent                           FAILED_PRECONDITION
    unknown_site, unenrolled, wrong name,
    quarantined                            PERMISSION_DENIED
    replay (a different message again)     ALREADY_EXISTS
    bad_signature, bad enrolment proof     UNAUTHENTICATED
    oversized upload, privacy budget,
    capacity (calls, streams, upload bytes) RESOURCE_EXHAUSTED
    a second upload of the same slot       ALREADY_EXISTS

Every call passes `hardening.Hardening` first (server/hardening.py): capacity, parsing,
integer ranges, capped details and logging; uploads in flight are `uploads.Uploads`.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn, TypeVar, cast

import grpc
from cryptography.hazmat.primitives import serialization
from google.protobuf.message import Message as ProtoMessage
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter

from fleetmind.aggregation.manifest import Manifest
from fleetmind.aggregation.secagg import DropReason, ProtocolError, RoundPhase
from fleetmind.aggregation.secagg.messages import AdvertisedKeys, SharesForSite, UnmaskRequest
from fleetmind.protos import secagg_codec as codec
from fleetmind.protos.fleetmind.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    fleet_pb2,
    fleet_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
)
from fleetmind.runtime.layout import LEDGER_FILE
from fleetmind.server import identity
from fleetmind.server.config import ServerConfig, split_listen
from fleetmind.server.coordinator import (
    Coordinator,
    Event,
    Finished,
    RefusedError,
    RoundListener,
    RoundSetup,
    Stopped,
)
from fleetmind.server.enrolment import EnrolmentError, Enrolments
from fleetmind.server.hardening import Capacity, Hardening, abort
from fleetmind.server.ledger import Ledger
from fleetmind.server.limits import ServerLimits
from fleetmind.server.metrics import MetricsEndpoint, ServerMetrics
from fleetmind.server.uploads import Upload, Uploads
from fleetmind.server.versions import Version, VersionError, VersionRegistry

log = logging.getLogger(__name__)

S = grpc.StatusCode
PROTOCOL_STATUS = {
    "malformed": S.INVALID_ARGUMENT,
    "wrong_round": S.FAILED_PRECONDITION,
    "below_threshold": S.FAILED_PRECONDITION,
    "inconsistent": S.FAILED_PRECONDITION,
    "unknown_site": S.PERMISSION_DENIED,
    "replay": S.ALREADY_EXISTS,
    "bad_signature": S.UNAUTHENTICATED,
    "budget_exhausted": S.RESOURCE_EXHAUSTED,
    "too_large": S.RESOURCE_EXHAUSTED,
    "upload_bytes": S.RESOURCE_EXHAUSTED,
    "not_found": S.NOT_FOUND,
    "quarantined": S.PERMISSION_DENIED,
}
# The refusal counter's reason (server/metrics.py REFUSAL_REASONS) for a refusal kind that
# says more than its status; any other refusal counts under its status's reason.
KIND_REASONS = {"budget_exhausted": "budget", "too_large": "too_large",
                "upload_bytes": "upload_bytes", "quarantined": "quarantined"}
ENROLMENT_STATUS = {"malformed": S.INVALID_ARGUMENT, "bad_proof": S.UNAUTHENTICATED,
                    "conflict": S.ALREADY_EXISTS}
SERVICES = ("fleetmind.v1.Fleet", "fleetmind.v1.Models", "fleetmind.v1.Audit")
WAITING_EVERY_S = 5.0  # heartbeat while a site waits for a cohort
DEFAULT_CHUNK = 1 << 20
MAX_MESSAGE = 2 * DEFAULT_CHUNK  # one upload chunk plus headers; larger is RESOURCE_EXHAUSTED
TICK_S = 0.1
CACHED_VERSIONS = 2  # versions whose announcement and download chunks the aggregator keeps
MAX_CHUNKINGS = 4  # (offset, chunk size) pairs cached per file of a version
SIGNING_KEY = "aggregator-signing.key"  # in data_dir; `fleetmind server key` prints its public half
Message = TypeVar("Message", bound=ProtoMessage)


def _metered(counter: Counter, messages: Iterator[Message]) -> Iterator[Message]:
    """Passes a stream through, adding each message's serialized size to `counter`."""
    for message in messages:
        counter.inc(message.ByteSize())
        yield message


def _refuse(context: grpc.ServicerContext, error: Exception) -> NoReturn:
    """Aborts the call with the status the refusal maps to (raises)."""
    kind = getattr(error, "kind", "")
    abort(context, PROTOCOL_STATUS.get(kind, S.INVALID_ARGUMENT), str(error),
          KIND_REASONS.get(kind))


class _Caller:
    """A JoinRound, Watch or StreamLedger stream's caller: `wake` is set when the caller
    hangs up and when the news it waits for arrives (its site's round events, a version,
    a ledger entry: server/waiters.py), so the stream sleeps until one of the two and
    never polls."""

    def __init__(self, context: grpc.ServicerContext) -> None:
        self.wake = threading.Event()
        self.gone = False
        if not context.add_callback(self._leave):
            self._leave()  # the call already ended

    def _leave(self) -> None:
        self.gone = True  # before the wake-up, so `here` after a clear never misses it
        self.wake.set()

    def here(self) -> bool:
        """Clears the wake-up before the stream looks for news; False once the caller left."""
        self.wake.clear()
        return not self.gone


class _Guard:
    """Checks that the caller is the enrolled site it claims to be."""

    def __init__(self, enrolments: Enrolments, mtls: bool) -> None:
        self.enrolments = enrolments
        self.mtls = mtls

    def site(self, context: grpc.ServicerContext, site: int) -> int:
        enrolled = self.enrolments.get(site)
        if enrolled is None:
            abort(context, S.PERMISSION_DENIED, f"site {site} is not enrolled: call Enroll "
                                                "with the site's identity key first")
        if self.mtls:
            name = identity.peer_site_name(context)
            if name is None:
                context.abort(S.UNAUTHENTICATED, "no client certificate name: connect with the "
                                                 "site's fleet certificate")
            if name != enrolled.name:
                context.abort(S.PERMISSION_DENIED, f"certificate {name!r} may not act as site "
                                                   f"{site} (enrolled as {enrolled.name!r})")
        return site


def _setup_to_wire(payload: RoundSetup, site: int) -> fleet_pb2.RoundConfig:
    """The round's config as `site` is told it: O(its neighbours), not O(cohort)."""
    config = codec.round_config_to_wire(payload.config, site)
    config.base_version = payload.base_version
    config.clip_norm = payload.clip_norm
    config.noise_multiplier = payload.noise_multiplier
    config.noise_mode = payload.noise_mode
    config.privacy_unit = payload.privacy_unit
    config.expected_cohort = payload.expected_cohort
    config.fixed_point_clip = payload.fixed_point_clip
    config.cohort_max = payload.cohort_max
    config.phase_deadline_unix_ms = payload.phase_deadline_unix_ms
    config.plain_sum = not payload.secure_aggregation
    config.participation_cap = payload.participation_cap
    return config


def _event_to_wire(event: Event, site: int) -> fleet_pb2.RoundEvent:
    """`event` as `site` receives it."""
    payload = event.payload
    wire = fleet_pb2.RoundEvent(round_id=event.round_id)
    if isinstance(payload, RoundSetup):
        wire.config.CopyFrom(_setup_to_wire(payload, site))
    elif isinstance(payload, Finished):
        wire.completed.CopyFrom(fleet_pb2.RoundCompleted(
            version=payload.version, cohort_size=payload.cohort_size, dropped=payload.dropped))
    elif isinstance(payload, Stopped):
        wire.aborted.CopyFrom(fleet_pb2.RoundAborted(
            reason=payload.reason, retry=payload.retry,
            # The codec looks each number up by name in the enum (Value), so it is one of
            # the enum's; it returns them as int.
            phase=(fleet_pb2.ROUND_PHASE_UNSPECIFIED if payload.phase is None
                   else cast(fleet_pb2.RoundPhase, codec.round_phase_to_wire(payload.phase))),
            drop_reason=cast(fleet_pb2.DropReason,
                             codec.drop_reason_to_wire(payload.drop_reason)),
            site_only=payload.site_only))
    elif isinstance(payload, AdvertisedKeys):
        wire.advertised_keys.CopyFrom(codec.advertised_keys_to_wire(payload))
    elif isinstance(payload, SharesForSite):
        wire.shares_for_site.CopyFrom(codec.shares_for_site_to_wire(payload))
    elif isinstance(payload, UnmaskRequest):
        wire.unmask_request.CopyFrom(codec.unmask_request_to_wire(payload))
    else:
        raise TypeError(f"no wire form for round event {type(payload).__name__}")
    return wire


class FleetService(fleet_pb2_grpc.FleetServicer):
    def __init__(self, coordinator: Coordinator, guard: _Guard, aggregator_key: bytes,
                 metrics: ServerMetrics, limits: ServerLimits | None = None,
                 uploads: Uploads | None = None) -> None:
        self.coordinator = coordinator
        self.guard = guard
        self.aggregator_key = aggregator_key
        self.received = metrics.received
        self.sent = metrics.sent
        self.refused = metrics.refused
        self.limits = limits or ServerLimits()
        self.uploads = uploads if uploads is not None else Uploads(self.limits,
                                                                   metrics.refused)

    def Enroll(self, request, context):  # noqa: N802 (gRPC's method names)
        if self.guard.mtls:
            name = identity.peer_site_name(context)
            if name != request.site_name:
                context.abort(S.PERMISSION_DENIED, f"certificate {name!r} may not enrol site "
                                                   f"{request.site_name!r}: the site name is "
                                                   "the certificate's common name")
        try:
            enrolled = self.coordinator.enrolments.enroll(request.site_name,
                                                          request.identity_key, request.proof)
        except EnrolmentError as error:
            context.abort(ENROLMENT_STATUS[error.kind], str(error))
        return fleet_pb2.EnrollResponse(site=enrolled.site, aggregator_key=self.aggregator_key,
                                        latest_version=self.coordinator.registry.newest())

    def JoinRound(self, request, context) -> Iterator[fleet_pb2.RoundEvent]:  # noqa: N802
        return _metered(self.sent.labels("JoinRound"), self._join_round(request, context))

    def _join_round(self, request, context) -> Iterator[fleet_pb2.RoundEvent]:
        site = self.guard.site(context, request.site)
        round_id = request.round_id if request.HasField("round_id") else None
        try:
            round_id, serial = self.coordinator.join(site, round_id, request.base_version,
                                                     request.contributing_units)
        except (ProtocolError, RefusedError) as error:
            _refuse(context, error)
        # The stream sleeps until news for its site or its caller hanging up (_Caller, first:
        # it ends the wait at once, before a queued site's leave takes the lock).
        caller = _Caller(context)
        if round_id is None:
            context.add_callback(lambda: self.coordinator.leave(site, serial))
        cursor, heartbeat = 0, 0.0
        ends = time.monotonic() + self.limits.stream_max_s
        while caller.here() and context.is_active():
            if round_id is None and time.monotonic() >= ends:
                # Queued past stream_max_s: the site is told to join again, so no stream
                # (and no worker thread) is held forever by a cohort that never forms.
                self.coordinator.leave(site, serial)
                self.refused("queue_expired")
                yield _event_to_wire(Event(0, Stopped(
                    f"site {site} waited {self.limits.stream_max_s:g} s for a cohort; join "
                    "again", True, RoundPhase.COHORT, DropReason.COHORT_WAIT_EXPIRED,
                    site_only=True)), site)
                return
            if round_id is None and time.monotonic() - heartbeat >= WAITING_EVERY_S:
                waiting = self.coordinator.waiting()
                heartbeat = time.monotonic()
                yield fleet_pb2.RoundEvent(waiting=fleet_pb2.Waiting(
                    ready_sites=waiting.ready_sites, target_cohort=waiting.target_cohort,
                    deadline_unix_ms=waiting.deadline_unix_ms))
            # Queued, it wakes for its next heartbeat or the end of its wait; in a round,
            # only news ends the wait (each deadline the ticker enforces closes a phase,
            # which is news) and stream_max_s is a backstop, never a poll.
            timeout = (min(heartbeat + WAITING_EVERY_S, ends) - time.monotonic()
                       if round_id is None else self.limits.stream_max_s)
            followed, events = self.coordinator.follow(site, round_id, cursor, timeout,
                                                       caller.wake)
            if followed != round_id:
                round_id, cursor = followed, 0
            for event in events:
                yield _event_to_wire(event, site)
                cursor += 1
                if event.terminal:
                    return

    def _call(self, context, site: int, accept) -> bytes:
        self.guard.site(context, site)
        try:
            return accept()
        except (ProtocolError, RefusedError) as error:
            _refuse(context, error)

    def AdvertiseKeys(self, request, context):  # noqa: N802
        # Counted before any check: refused bytes crossed the network too.
        self.received.labels("AdvertiseKeys").inc(request.ByteSize())

        def accept() -> bytes:
            return self.coordinator.advertise(codec.advertisement_from_wire(request))
        digest = self._call(context, request.site, accept)
        return fleet_pb2.Receipt(round_id=request.round_id, site=request.site,
                                 request_sha256=digest)

    def ShareKeys(self, request, context):  # noqa: N802
        # Counted before any check: refused bytes crossed the network too.
        self.received.labels("ShareKeys").inc(request.ByteSize())

        def accept() -> bytes:
            return self.coordinator.share(codec.encrypted_shares_from_wire(request))
        digest = self._call(context, request.sender, accept)
        return fleet_pb2.Receipt(round_id=request.round_id, site=request.sender,
                                 request_sha256=digest)

    def Unmask(self, request, context):  # noqa: N802
        # Counted before any check: refused bytes crossed the network too.
        self.received.labels("Unmask").inc(request.ByteSize())

        def accept() -> bytes:
            return self.coordinator.unmask(codec.unmask_shares_from_wire(request))
        digest = self._call(context, request.site, accept)
        return fleet_pb2.Receipt(round_id=request.round_id, site=request.site,
                                 request_sha256=digest)

    def SubmitMaskedVector(self, request_iterator, context):  # noqa: N802
        received = self.received.labels("SubmitMaskedVector")
        first = next(request_iterator, None)
        if first is None:
            abort(context, S.INVALID_ARGUMENT, "empty upload: send at least one chunk")
        received.inc(first.ByteSize())
        site = self.guard.site(context, first.site)
        upload: Upload | None = None

        def accept() -> bytes:
            nonlocal upload
            # The header is checked and the (round, site) slot claimed at the first chunk,
            # before anything is buffered: a second upload of the slot is ALREADY_EXISTS.
            limit = self.coordinator.check_upload(first.round_id, site, first.ring_bits,
                                                  first.total_bytes, first.payload_sha256)
            upload = self.uploads.claim(first.round_id, site, limit, context)
            message, digest = codec.masked_input_from_chunks(
                self._chunks(upload, itertools.chain(
                    [first], _metered(received, request_iterator))), max_bytes=limit)
            return self.coordinator.submit(message, digest)
        try:
            digest = self._call(context, site, accept)
        finally:
            if upload is not None:
                self.uploads.release(upload)
        return fleet_pb2.MaskedVectorReceipt(round_id=first.round_id, site=site,
                                             received_bytes=first.total_bytes,
                                             payload_sha256=digest)


    def _chunks(self, upload: Upload, chunks: Iterator[fleet_pb2.MaskedVectorChunk]
                ) -> Iterator[fleet_pb2.MaskedVectorChunk]:
        """The chunks, each marking the upload alive; every chunk but the last must carry
        at least min_chunk_bytes (a 1-byte chunk stream is a cheap way to hold a slot)."""
        least = self.limits.min_chunk_bytes
        for chunk in chunks:
            upload.last_chunk = time.monotonic()
            last = chunk.offset + len(chunk.data) >= chunk.total_bytes
            if len(chunk.data) < least and not last:
                raise ProtocolError("malformed", f"site {chunk.site}: a {len(chunk.data)}-byte "
                                                 f"chunk at offset {chunk.offset}; chunks but "
                                                 f"the last carry at least {least} bytes")
            yield chunk


class ModelsService(models_pb2_grpc.ModelsServicer):
    def __init__(self, coordinator: Coordinator, metrics: ServerMetrics,
                 limits: ServerLimits | None = None) -> None:
        self.coordinator = coordinator
        self.registry = coordinator.registry
        self.metrics = metrics
        self.limits = limits or ServerLimits()
        self._cache_lock = threading.Lock()
        # version -> (the manifest it was built from, announcement); the latest few only.
        self._announcements: dict[int, tuple[Manifest, models_pb2.VersionAnnouncement]] = {}
        # version -> (its manifest, (file, offset, chunk size) -> the chunks to stream).
        self._downloads: dict[int, tuple[Manifest, dict[tuple[str, int, int],
                                                        list[models_pb2.FileChunk]]]] = {}

    def _announce(self, number: int) -> models_pb2.VersionAnnouncement:
        """Version `number`'s announcement, built once per version and shared (never
        mutated): registry.get still checks the folder's stamp on every call, and a folder
        that changed re-verifies into a new manifest, which builds a new announcement."""
        version = self.registry.get(number)
        with self._cache_lock:
            cached = self._announcements.get(number)
            if cached is not None and cached[0] is version.manifest:
                return cached[1]
        announcement = models_pb2.VersionAnnouncement(version=number,
                                                      manifest=version.manifest_bytes(),
                                                      manifest_sig=version.signature())
        with self._cache_lock:
            self._announcements[number] = (version.manifest, announcement)
            for old in sorted(self._announcements)[:-CACHED_VERSIONS]:
                del self._announcements[old]
        return announcement

    def Watch(self, request, context):  # noqa: N802
        return _metered(self.metrics.sent.labels("Watch"), self._watch(request, context))

    def _watch(self, request, context) -> Iterator[models_pb2.VersionAnnouncement]:
        after = request.after_version if request.HasField("after_version") else -1
        caller = _Caller(context)  # the stream ends (and the gauge drops) when it leaves
        ends = time.monotonic() + self.limits.stream_max_s  # the caller watches again after
        with self.metrics.watchers.track_inprogress():
            while caller.here() and time.monotonic() < ends:
                latest = self.registry.latest_number()
                if latest is not None and latest > after:  # list the folder only then
                    for number in self.registry.numbers():
                        if number > after:
                            yield self._announce(number)
                            after = number
                    after = max(after, latest)  # a folder gone from disk: never spin on it
                self.coordinator.wait_for_version(after, ends - time.monotonic(), caller.wake)

    def Latest(self, request, context):  # noqa: N802
        latest = self.registry.latest_number()  # from memory: no folder listing per call
        if latest is None:
            abort(context, S.NOT_FOUND, "no version is published yet")
        try:
            return self._announce(latest)
        except VersionError as error:  # the folder on disk no longer verifies: never serve it
            context.abort(S.DATA_LOSS, str(error))

    def Get(self, request, context):  # noqa: N802
        return _metered(self.metrics.sent.labels("Get"), self._get(request, context))

    def _get(self, request, context) -> Iterator[models_pb2.FileChunk]:
        try:
            version = self.registry.get(request.version)
        except KeyError:
            context.abort(S.NOT_FOUND, f"version {request.version} is not published "
                                       f"(latest is {self.registry.numbers()[-1]})")
        except VersionError as error:  # the folder on disk no longer verifies: never serve it
            context.abort(S.DATA_LOSS, str(error))
        if request.file not in version.manifest.files:
            context.abort(S.NOT_FOUND, f"version {request.version} has no file "
                                       f"{request.file!r}; its files are "
                                       f"{sorted(version.manifest.files)}")
        size = min(request.max_chunk_bytes or DEFAULT_CHUNK, DEFAULT_CHUNK)
        chunks = self._chunks(version, request.file, request.offset, size)
        if chunks is None:
            total = (version.folder / request.file).stat().st_size
            abort(context, S.OUT_OF_RANGE, f"offset {request.offset} is past the end of "
                                           f"{request.file} ({total} bytes)")
        yield from chunks

    def _chunks(self, version: Version, file: str, start: int, size: int
                ) -> list[models_pb2.FileChunk] | None:
        """The FileChunks of `file` from `start` in `size`-byte pieces (None: `start` is
        past its end). A version never changes once published, so each (file, start,
        size) is read and hashed once and then streamed as-is to every caller, for the
        latest CACHED_VERSIONS versions, MAX_CHUNKINGS chunkings per file each. Keyed by
        the manifest registry.get verified: a folder that changed re-verifies (or fails)
        before anything cached is served."""
        key = (file, start, size)
        with self._cache_lock:
            cached = self._downloads.get(version.number)
            if cached is not None and cached[0] is version.manifest and key in cached[1]:
                return cached[1][key]
        data = (version.folder / file).read_bytes()
        if start > len(data):
            return None
        file_sha = bytes.fromhex(version.manifest.files[file])
        chunks = []
        for offset in range(start, max(len(data), start + 1), size):
            chunk = data[offset:offset + size]
            chunks.append(models_pb2.FileChunk(version=version.number, file=file,
                                               offset=offset, data=chunk,
                                               chunk_sha256=hashlib.sha256(chunk).digest(),
                                               total_bytes=len(data), file_sha256=file_sha))
        with self._cache_lock:
            cached = self._downloads.get(version.number)
            if cached is None or cached[0] is not version.manifest:
                cached = self._downloads[version.number] = (version.manifest, {})
                for old in sorted(self._downloads)[:-CACHED_VERSIONS]:
                    del self._downloads[old]
            if version.number in self._downloads:  # not an old version just evicted
                ways = [k for k in cached[1] if k[0] == file]
                if len(ways) >= MAX_CHUNKINGS:  # odd resume offsets: drop the oldest
                    del cached[1][ways[0]]
                cached[1][key] = chunks
        return chunks


class AuditService(audit_pb2_grpc.AuditServicer):
    def __init__(self, coordinator: Coordinator, limits: ServerLimits | None = None) -> None:
        self.coordinator = coordinator
        self.ledger = coordinator.ledger
        self.limits = limits or ServerLimits()

    def StreamLedger(self, request, context):  # noqa: N802
        index = request.from_index
        caller = _Caller(context)
        ends = time.monotonic() + self.limits.stream_max_s  # a follower re-opens from its index
        while caller.here() and time.monotonic() < ends:
            for entry in self.ledger.entries(index):
                yield audit_pb2.LedgerEntry(index=entry.index, prev_hash=entry.prev_hash,
                                            body=entry.body, hash=entry.hash,
                                            signature=entry.signature)
                index = entry.index + 1
            if not request.follow:
                return
            self.coordinator.wait_for_ledger(index, ends - time.monotonic(), caller.wake)

    def Budget(self, request, context):  # noqa: N802
        status = self.coordinator.budget_status()
        return audit_pb2.BudgetResponse(epsilon_spent=status.epsilon_spent,
                                        epsilon_budget=status.epsilon_budget,
                                        delta=status.delta, rounds=status.rounds,
                                        accountant=status.accountant,
                                        participation_cap=status.participation_cap or 0)


# ---- serve ---------------------------------------------------------------------------


@dataclass
class RunningServer:
    """A started aggregator. `stop()` ends it (and its ticker) and closes the ledger."""

    server: grpc.Server
    port: int
    address: str
    coordinator: Coordinator
    health: health.HealthServicer
    _stop_ticking: threading.Event
    metrics: ServerMetrics
    metrics_endpoint: MetricsEndpoint | None = None  # serving /metrics if metrics_listen
    limits: ServerLimits = field(default_factory=ServerLimits)
    capacity: Capacity | None = None  # calls in progress, by pool
    uploads: Uploads | None = None  # uploads being received

    def stop(self, grace: float | None = 1.0) -> None:
        self._stop_ticking.set()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.stop()
        for name in ("", *SERVICES):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.server.stop(grace).wait()
        self.coordinator.ledger.close()

    def wait(self) -> None:
        self.server.wait_for_termination()


def pending_call_options(calls: int) -> list[tuple[str, int]]:
    """grpc's server options for calls that arrived before a worker asked for them: room for
    `calls` (all a server admits), never less than grpc's own 1,000 / 3,000. At grpc's
    defaults a server of any kind stopped taking new streams near 3,300 open ones, and the
    5,000 watchers the scale bench holds could never attach (docs/scale.md)."""
    return [("grpc.server.max_pending_requests", max(1000, calls)),
            ("grpc.server.max_pending_requests_hard_limit", max(3000, calls))]


def open_coordinator(config: ServerConfig, listener: RoundListener | None = None,
                     limits: ServerLimits | None = None) -> Coordinator:
    """The aggregator's state under config.data_dir: signing key, versions (genesis made if
    absent), ledger, enrolments, round state (a round in flight is abandoned here)."""
    data = config.data_dir
    data.mkdir(parents=True, exist_ok=True)
    key = identity.load_or_create_signing_key(data / SIGNING_KEY)
    registry = VersionRegistry(data, key)
    if not registry.numbers():
        registry.genesis(config.adapter)
    return Coordinator(data, registry, Ledger(data / LEDGER_FILE, key),
                       Enrolments(data / "enrolments.json"), config.cohort, config.privacy,
                       listener=listener, limits=limits)


def serve(config: ServerConfig, limits: ServerLimits | None = None) -> RunningServer:
    """Starts the aggregator on config.listen (port 0: the OS picks; see .port). Under
    mTLS unless config.insecure, which ServerConfig only allows on a loopback address.
    `limits` (default ServerLimits(), its stream cap config.max_workers) bound what the
    server takes on at once; the thread pool is sized so that nothing admitted queues."""
    if limits is None:  # the config's [limits] table (ServerLimits() when it has none)
        limits = config.limits
    host, _ = split_listen(config.listen)  # ServerConfig refused plaintext off loopback
    if config.tls is not None:
        creds = identity.server_credentials(
            identity.Credentials(Path(config.tls.certificate).read_bytes(),
                                 identity.read_private(config.tls.private_key)),
            Path(config.tls.ca_certificate).read_bytes())
    if not config.cohort.secure_aggregation:
        log.warning("secure aggregation is OFF (cohort.secure_aggregation = false): this "
                    "aggregator sees every site's update unmasked; an ablation for "
                    "measurements, on %s only", config.listen)
    metrics = ServerMetrics()
    coordinator = open_coordinator(config, metrics, limits)
    mtls = config.tls is not None
    workers = limits.workers(config.max_workers)
    capacity, uploads = Capacity(limits, config.max_workers), Uploads(limits, metrics.refused)
    # As many workers as calls admitted (both caps plus the reserve), and grpc itself
    # refuses past that: an admitted call never waits for a thread, and a flood of calls
    # is refused RESOURCE_EXHAUSTED instead of queueing ahead of Health.Check.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers,
                                                    thread_name_prefix="fleetmind-rpc"),
                         interceptors=[Hardening(capacity, limits, mtls, metrics.refused)],
                         options=[("grpc.max_receive_message_length", MAX_MESSAGE),
                                  ("grpc.so_reuseport", 0), *limits.channel_options(),
                                  *pending_call_options(workers)],
                         maximum_concurrent_rpcs=workers)
    guard = _Guard(coordinator.enrolments, mtls=mtls)
    fleet_pb2_grpc.add_FleetServicer_to_server(
        FleetService(coordinator, guard, coordinator.registry.public_key.public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw), metrics, limits,
            uploads), server)
    models_pb2_grpc.add_ModelsServicer_to_server(ModelsService(coordinator, metrics, limits),
                                                 server)
    audit_pb2_grpc.add_AuditServicer_to_server(AuditService(coordinator, limits), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *SERVICES):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    if config.tls is not None:
        port = server.add_secure_port(config.listen, creds)
    else:
        port = server.add_insecure_port(config.listen)
    if not port:
        coordinator.ledger.close()
        raise OSError(f"cannot listen on {config.listen}: the address is in use or not "
                      "this machine's; pick another port (0: any free one)")
    try:
        endpoint = metrics.serve(config.metrics_listen) if config.metrics_listen else None
    except OSError:
        server.stop(None)
        coordinator.ledger.close()
        raise
    server.start()
    stop_ticking = threading.Event()

    def tick() -> None:
        while not stop_ticking.wait(TICK_S):
            try:
                coordinator.tick()
                uploads.reap(coordinator.collecting)
            except Exception:  # a bug in one tick must not stop every later deadline
                log.exception("coordinator tick failed; ticking on")
    threading.Thread(target=tick, name="fleetmind-coordinator-tick", daemon=True).start()
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return RunningServer(server, port, address, coordinator, health_servicer, stop_ticking,
                         metrics, endpoint, limits, capacity, uploads)
