"""The aggregator's gRPC services (protos/fleetmind/v1): Fleet, Models, Audit, plus standard
health checking and reflection, and `serve`, which starts them all.

The servicers translate and authorise; the coordinator decides. Every refusal is a
precise status and changes no state:

    malformed                              INVALID_ARGUMENT
    wrong_round, below_threshold,
    inconsistent                           FAILED_PRECONDITION
    unknown_site, unenrolled, wrong name   PERMISSION_DENIED
    replay (a different message again)     ALREADY_EXISTS
    bad_signature, bad enrolment proof     UNAUTHENTICATED
    oversized upload, privacy budget       RESOURCE_EXHAUSTED
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter

from fleetmind.aggregation.secagg import ProtocolError
from fleetmind.protos import secagg_codec as codec
from fleetmind.protos.fleetmind.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    fleet_pb2,
    fleet_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
)
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
from fleetmind.server.ledger import Ledger
from fleetmind.server.metrics import MetricsEndpoint, ServerMetrics
from fleetmind.server.versions import VersionError, VersionRegistry

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
    "not_found": S.NOT_FOUND,
}
ENROLMENT_STATUS = {"malformed": S.INVALID_ARGUMENT, "bad_proof": S.UNAUTHENTICATED,
                    "conflict": S.ALREADY_EXISTS}
SERVICES = ("fleetmind.v1.Fleet", "fleetmind.v1.Models", "fleetmind.v1.Audit")
FOLLOW_POLL_S = 1.0  # how often a stream checks that its caller is still there
WAITING_EVERY_S = 5.0  # heartbeat while a site waits for a cohort
DEFAULT_CHUNK = 1 << 20
MAX_MESSAGE = 2 * DEFAULT_CHUNK  # one upload chunk plus headers; larger is RESOURCE_EXHAUSTED
TICK_S = 0.1
SIGNING_KEY = "aggregator-signing.key"  # in data_dir; `fleetmind server key` prints its public half


Message = TypeVar("Message")


def _metered(counter: Counter, messages: Iterator[Message]) -> Iterator[Message]:
    """Passes a stream through, adding each message's serialized size to `counter`."""
    for message in messages:
        counter.inc(message.ByteSize())
        yield message


def _refuse(context: grpc.ServicerContext, error: Exception) -> None:
    """Aborts the call with the status the refusal maps to (raises)."""
    status = PROTOCOL_STATUS.get(getattr(error, "kind", ""), S.INVALID_ARGUMENT)
    context.abort(status, str(error))


class _Guard:
    """Checks that the caller is the enrolled site it claims to be."""

    def __init__(self, enrolments: Enrolments, mtls: bool) -> None:
        self.enrolments = enrolments
        self.mtls = mtls

    def site(self, context: grpc.ServicerContext, site: int) -> int:
        enrolled = self.enrolments.get(site)
        if enrolled is None:
            context.abort(S.PERMISSION_DENIED, f"site {site} is not enrolled: call Enroll with "
                                               "the site's identity key first")
        if self.mtls:
            name = identity.peer_site_name(context)
            if name is None:
                context.abort(S.UNAUTHENTICATED, "no client certificate name: connect with the "
                                                 "site's fleet certificate")
            if name != enrolled.name:
                context.abort(S.PERMISSION_DENIED, f"certificate {name!r} may not act as site "
                                                   f"{site} (enrolled as {enrolled.name!r})")
        return site


def _event_to_wire(event: Event) -> fleet_pb2.RoundEvent:
    payload = event.payload
    wire = fleet_pb2.RoundEvent(round_id=event.round_id)
    if isinstance(payload, RoundSetup):
        config = codec.round_config_to_wire(payload.config)
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
        wire.config.CopyFrom(config)
    elif isinstance(payload, Finished):
        wire.completed.CopyFrom(fleet_pb2.RoundCompleted(
            version=payload.version, cohort_size=payload.cohort_size, dropped=payload.dropped))
    elif isinstance(payload, Stopped):
        wire.aborted.CopyFrom(fleet_pb2.RoundAborted(reason=payload.reason, retry=payload.retry))
    elif hasattr(payload, "advertisements"):
        wire.advertised_keys.CopyFrom(codec.advertised_keys_to_wire(payload))
    elif hasattr(payload, "recipient"):
        wire.shares_for_site.CopyFrom(codec.shares_for_site_to_wire(payload))
    else:
        wire.unmask_request.CopyFrom(codec.unmask_request_to_wire(payload))
    return wire


class FleetService(fleet_pb2_grpc.FleetServicer):
    def __init__(self, coordinator: Coordinator, guard: _Guard, aggregator_key: bytes,
                 metrics: ServerMetrics) -> None:
        self.coordinator = coordinator
        self.guard = guard
        self.aggregator_key = aggregator_key
        self.received = metrics.received
        self.sent = metrics.sent

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
                                        latest_version=self.coordinator.registry.numbers()[-1])

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
        if round_id is None:
            context.add_callback(lambda: self.coordinator.leave(site, serial))
        cursor, heartbeat = 0, 0.0
        while context.is_active():
            if round_id is None and time.monotonic() - heartbeat >= WAITING_EVERY_S:
                waiting = self.coordinator.waiting()
                heartbeat = time.monotonic()
                yield fleet_pb2.RoundEvent(waiting=fleet_pb2.Waiting(
                    ready_sites=waiting.ready_sites, target_cohort=waiting.target_cohort,
                    deadline_unix_ms=waiting.deadline_unix_ms))
            followed, events = self.coordinator.follow(site, round_id, cursor, FOLLOW_POLL_S)
            if followed != round_id:
                round_id, cursor = followed, 0
            for event in events:
                yield _event_to_wire(event)
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
            context.abort(S.INVALID_ARGUMENT, "empty upload: send at least one chunk")
        received.inc(first.ByteSize())
        site = self.guard.site(context, first.site)

        def accept() -> bytes:
            # Size and round are checked at the first chunk, before anything is read.
            limit = self.coordinator.upload_limit(first.round_id, site)
            if first.total_bytes > limit:
                raise RefusedError("too_large", f"site {site}: upload announces "
                                                f"{first.total_bytes} bytes; round "
                                                f"{first.round_id}'s vector is {limit}")
            message, digest = codec.masked_input_from_chunks(
                itertools.chain([first], _metered(received, request_iterator)),
                max_bytes=limit)
            return self.coordinator.submit(message, digest)
        digest = self._call(context, site, accept)
        return fleet_pb2.MaskedVectorReceipt(round_id=first.round_id, site=site,
                                             received_bytes=first.total_bytes,
                                             payload_sha256=digest)


class ModelsService(models_pb2_grpc.ModelsServicer):
    def __init__(self, coordinator: Coordinator, metrics: ServerMetrics) -> None:
        self.coordinator = coordinator
        self.registry = coordinator.registry
        self.metrics = metrics

    def _announce(self, number: int) -> models_pb2.VersionAnnouncement:
        version = self.registry.get(number)
        return models_pb2.VersionAnnouncement(version=number,
                                              manifest=version.manifest_bytes(),
                                              manifest_sig=version.signature())

    def Watch(self, request, context):  # noqa: N802
        return _metered(self.metrics.sent.labels("Watch"), self._watch(request, context))

    def _watch(self, request, context) -> Iterator[models_pb2.VersionAnnouncement]:
        after = request.after_version if request.HasField("after_version") else -1
        # The stream ends (and the gauge drops) within FOLLOW_POLL_S of the caller leaving.
        with self.metrics.watchers.track_inprogress():
            while context.is_active():
                for number in self.registry.numbers():
                    if number > after:
                        yield self._announce(number)
                        after = number
                self.coordinator.wait(lambda seen=after: self.registry.numbers()[-1] > seen,
                                      FOLLOW_POLL_S)

    def Latest(self, request, context):  # noqa: N802
        numbers = self.registry.numbers()
        if not numbers:
            context.abort(S.NOT_FOUND, "no version is published yet")
        try:
            return self._announce(numbers[-1])
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
        data = (version.folder / request.file).read_bytes()
        if request.offset > len(data):
            context.abort(S.OUT_OF_RANGE, f"offset {request.offset} is past the end of "
                                          f"{request.file} ({len(data)} bytes)")
        size = min(request.max_chunk_bytes or DEFAULT_CHUNK, DEFAULT_CHUNK)
        file_sha = bytes.fromhex(version.manifest.files[request.file])
        for offset in range(request.offset, max(len(data), request.offset + 1), size):
            chunk = data[offset:offset + size]
            yield models_pb2.FileChunk(version=request.version, file=request.file,
                                       offset=offset, data=chunk,
                                       chunk_sha256=hashlib.sha256(chunk).digest(),
                                       total_bytes=len(data), file_sha256=file_sha)


class AuditService(audit_pb2_grpc.AuditServicer):
    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator
        self.ledger = coordinator.ledger

    def StreamLedger(self, request, context):  # noqa: N802
        index = request.from_index
        while context.is_active():
            for entry in self.ledger.entries(index):
                yield audit_pb2.LedgerEntry(index=entry.index, prev_hash=entry.prev_hash,
                                            body=entry.body, hash=entry.hash,
                                            signature=entry.signature)
                index = entry.index + 1
            if not request.follow:
                return

            def appended(wanted: int = index) -> bool:
                head = self.ledger.head()
                return head is not None and head.index >= wanted
            self.coordinator.wait(appended, FOLLOW_POLL_S)

    def Budget(self, request, context):  # noqa: N802
        status = self.coordinator.budget_status()
        return audit_pb2.BudgetResponse(epsilon_spent=status.epsilon_spent,
                                        epsilon_budget=status.epsilon_budget,
                                        delta=status.delta, rounds=status.rounds,
                                        accountant=status.accountant)


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


def open_coordinator(config: ServerConfig, listener: RoundListener | None = None
                     ) -> Coordinator:
    """The aggregator's state under config.data_dir: signing key, versions (genesis made if
    absent), ledger, enrolments, round state (a round in flight is abandoned here)."""
    data = config.data_dir
    data.mkdir(parents=True, exist_ok=True)
    key = identity.load_or_create_signing_key(data / SIGNING_KEY)
    registry = VersionRegistry(data, key)
    if not registry.numbers():
        registry.genesis(config.adapter)
    return Coordinator(data, registry, Ledger(data / "ledger.sqlite", key),
                       Enrolments(data / "enrolments.json"), config.cohort, config.privacy,
                       listener=listener)


def serve(config: ServerConfig) -> RunningServer:
    """Starts the aggregator on config.listen (port 0: the OS picks; see .port). Under
    mTLS unless config.insecure, which ServerConfig only allows on a loopback address."""
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
    coordinator = open_coordinator(config, metrics)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.max_workers),
                         options=[("grpc.max_receive_message_length", MAX_MESSAGE),
                                  ("grpc.so_reuseport", 0)])
    guard = _Guard(coordinator.enrolments, mtls=config.tls is not None)
    fleet_pb2_grpc.add_FleetServicer_to_server(
        FleetService(coordinator, guard, coordinator.registry.public_key.public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw), metrics), server)
    models_pb2_grpc.add_ModelsServicer_to_server(ModelsService(coordinator, metrics), server)
    audit_pb2_grpc.add_AuditServicer_to_server(AuditService(coordinator), server)
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
            except Exception:  # a bug in one tick must not stop every later deadline
                log.exception("coordinator tick failed; ticking on")
    threading.Thread(target=tick, name="fleetmind-coordinator-tick", daemon=True).start()
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return RunningServer(server, port, address, coordinator, health_servicer, stop_ticking,
                         metrics, endpoint)
