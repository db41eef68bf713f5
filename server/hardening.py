"""Every call to the aggregator passes `Hardening` first (a grpc interceptor): it admits
the call against the capacity caps of `ServerLimits` (refusing RESOURCE_EXHAUSTED, never
queueing), parses the request bytes itself (garbage is INVALID_ARGUMENT, not INTERNAL),
range-checks every integer field (ids past 2^63-1 are INVALID_ARGUMENT), cuts error
details to `max_details_chars`, counts each refusal by reason and logs any unexpected
exception with the RPC's name. Kept apart from the servicers (server/service.py), which
only translate and authorise: none of this depends on what a call means.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter as Tally
from collections.abc import Callable
from typing import Any, NoReturn

import grpc
from google.protobuf.message import Message as ProtoMessage

from fleetmind.server import identity
from fleetmind.server.limits import INT63_MAX, ServerLimits

log = logging.getLogger(__name__)

S = grpc.StatusCode
# The refusal counter's reason (server/metrics.py REFUSAL_REASONS) for each status a
# refusal may carry; INTERNAL and the like are failures, not refusals, and not counted.
STATUS_REASONS = {S.INVALID_ARGUMENT: "invalid_argument", S.UNAUTHENTICATED: "unauthenticated",
                  S.PERMISSION_DENIED: "permission_denied",
                  S.FAILED_PRECONDITION: "failed_precondition",
                  S.ALREADY_EXISTS: "already_exists", S.NOT_FOUND: "not_found",
                  S.OUT_OF_RANGE: "out_of_range", S.RESOURCE_EXHAUSTED: "resource_exhausted"}
# Calls that stay open (a worker thread each, for as long as they last): the stream pool.
STREAM_RPCS = frozenset({
    "/fleetmind.v1.Fleet/JoinRound", "/fleetmind.v1.Models/Watch", "/fleetmind.v1.Models/Get",
    "/fleetmind.v1.Audit/StreamLedger", "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"})
# Answered from the reserved workers, outside both caps: a probe must get through a flood.
RESERVED_RPCS = frozenset({"/grpc.health.v1.Health/Check"})


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, details: str,
          reason: str | None = None) -> NoReturn:
    """context.abort, typed: grpc's abort always raises, but grpc ships no type hints that
    say so. A call's context (CappedContext) counts the refusal under `reason` (None: its
    status's)."""
    if isinstance(context, CappedContext):
        context.refuse(code, details, reason)
    else:
        context.abort(code, details)
    raise RuntimeError(f"grpc context.abort({code}) returned instead of raising")


def _cap(details: str, limit: int) -> str:
    """Error details cut to `limit` characters: they may quote hostile input."""
    return details if len(details) <= limit else details[:limit - 1] + "…"


class CappedContext:
    """A servicer context whose abort() and set_details() cut the details to a length and
    whose refusals are counted (`refused(reason)`); everything else is the call's own
    context."""

    def __init__(self, context: grpc.ServicerContext, limit: int,
                 refused: Callable[[str], None]) -> None:
        self._context = context
        self._limit = limit
        self._refused = refused

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.refuse(code, details, None)

    def refuse(self, code: grpc.StatusCode, details: str, reason: str | None) -> None:
        """Aborts with `code`, counted under `reason` or its status's (a failure such as
        INTERNAL is no refusal and is not counted)."""
        reason = reason or STATUS_REASONS.get(code)
        if reason is not None:
            self._refused(reason)
        self._context.abort(code, _cap(details, self._limit))

    def set_details(self, details: str) -> None:
        self._context.set_details(_cap(details, self._limit))


_INTEGER_TYPES = frozenset({3, 4, 5, 6, 13, 15, 16, 17, 18})  # FieldDescriptor.TYPE_*INT*


def _integer_problem(message: Any, prefix: str = "") -> str | None:
    """The first integer field (at any depth) above 2^63-1, described, or None: no id,
    index or offset is that large, and SQLite and struct('<q') could not hold it."""
    if not isinstance(message, ProtoMessage):
        return None
    for descriptor, value in message.ListFields():
        name = prefix + descriptor.name
        repeated = descriptor.is_repeated if hasattr(descriptor, "is_repeated") \
            else descriptor.label == descriptor.LABEL_REPEATED
        if descriptor.message_type is not None and descriptor.message_type.GetOptions().map_entry:
            items = [(key, value[key]) for key in value]
            for key, item in items:
                if isinstance(key, int) and key > INT63_MAX:
                    return f"{name} key {key} is out of range (at most 2^63-1)"
                problem = _integer_problem(item, f"{name}[{key}].") if isinstance(
                    item, ProtoMessage) else (f"{name}[{key}]={item} is out of range"
                                             if isinstance(item, int) and item > INT63_MAX
                                             else None)
                if problem:
                    return problem
            continue
        values = list(value) if repeated else [value]
        if descriptor.type in _INTEGER_TYPES:
            for item in values:
                if item > INT63_MAX:
                    return f"{name}={item} is out of range (at most 2^63-1)"
        elif descriptor.message_type is not None:
            for item in values:
                problem = _integer_problem(item, name + ".")
                if problem:
                    return problem
    return None


class Capacity:
    """Calls in progress, per pool ("stream" or "call") and per peer. A peer is the
    certificate's name under mTLS; on plaintext (loopback only) there is no per-peer cap."""

    def __init__(self, limits: ServerLimits, max_workers: int) -> None:
        self._lock = threading.Lock()
        self._caps = {"stream": (limits.streams(max_workers), limits.max_streams_per_peer),
                      "call": (limits.max_calls, limits.max_calls_per_peer)}
        self._open: Tally = Tally()

    def admit(self, pool: str, peer: str | None) -> tuple[str, str] | None:
        """Takes a place, or returns why not: (the refusal reason, the message)."""
        total, per_peer = self._caps[pool]
        with self._lock:
            if self._open[(pool, None)] >= total:
                return "capacity", (f"the aggregator is serving {total} {pool}s, its limit; "
                                    "try again later")
            if peer is not None and self._open[(pool, peer)] >= per_peer:
                return "per_peer", (f"{peer!r} already holds {per_peer} {pool}s, the "
                                    "per-peer limit; close one first")
            self._open[(pool, None)] += 1
            if peer is not None:
                self._open[(pool, peer)] += 1
            return None

    def release(self, pool: str, peer: str | None) -> None:
        with self._lock:
            for key in ((pool, None), (pool, peer)) if peer is not None else ((pool, None),):
                self._open[key] -= 1
                if self._open[key] <= 0:
                    del self._open[key]

    def open(self, pool: str) -> int:
        with self._lock:
            return self._open[(pool, None)]


class Hardening(grpc.ServerInterceptor):
    """Admission, parsing, integer ranges, capped details and logging for every call (see
    the module docstring). Request bytes reach it unparsed: the handler it returns has no
    deserializer, so a parse failure is the handler's to answer."""

    def __init__(self, capacity: Capacity, limits: ServerLimits, mtls: bool,
                 refused: Callable[[str], None]) -> None:
        self.capacity = capacity
        self.limits = limits
        self.mtls = mtls
        self.refused = refused

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        pool = None if method in RESERVED_RPCS else (
            "stream" if method in STREAM_RPCS else "call")
        parse = handler.request_deserializer or (lambda raw: raw)
        serialize = handler.response_serializer
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, pool, parse, handler.unary_unary), None, serialize)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._unary_stream(method, pool, parse, handler.unary_stream), None, serialize)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._stream_unary(method, pool, parse, handler.stream_unary), None, serialize)
        return grpc.stream_stream_rpc_method_handler(
            self._stream_stream(method, pool, parse, handler.stream_stream), None, serialize)

    # ---- the pieces every call goes through ----

    def _enter(self, pool: str | None, context: CappedContext) -> None:
        """Admits the call (released when it ends) or aborts RESOURCE_EXHAUSTED."""
        if pool is None:
            return
        peer = identity.peer_site_name(context) if self.mtls else None
        refusal = self.capacity.admit(pool, peer)
        if refusal is not None:
            context.refuse(S.RESOURCE_EXHAUSTED, refusal[1], refusal[0])
        released = threading.Lock()

        def release() -> None:
            if released.acquire(blocking=False):
                self.capacity.release(pool, peer)
        if not context.add_callback(release):
            release()  # the call already ended

    @staticmethod
    def _parse(method: str, parse: Callable[[bytes], Any], raw: bytes,
               context: CappedContext) -> Any:
        try:
            message = parse(raw)
        except Exception:  # any decode failure: the bytes are not the message
            context.abort(S.INVALID_ARGUMENT, f"{method}: the request is not a valid "
                                              f"message ({len(raw)} bytes that do not parse)")
        problem = _integer_problem(message)
        if problem is not None:
            context.abort(S.INVALID_ARGUMENT, f"{method}: {problem}")
        return message

    @staticmethod
    def _failed(method: str, context: CappedContext) -> None:
        """Called with an exception in flight: an abort (a refusal) passes on; anything
        else is logged with the RPC's name and answered INTERNAL."""
        if context.code() is not None:
            log.debug("%s refused: %s", method, context.code())
            raise
        if not context.is_active():
            log.info("%s ended: the call was cancelled", method)
            raise
        log.exception("%s failed", method)
        context.abort(S.INTERNAL, f"{method} failed on the aggregator; the error is logged "
                                  "there")

    def _raw_requests(self, method: str, parse, raw_iterator, context: CappedContext):
        for raw in raw_iterator:
            yield self._parse(method, parse, raw, context)

    def _unary(self, method, pool, parse, behaviour):
        def handle(raw, context):
            context = CappedContext(context, self.limits.max_details_chars, self.refused)
            self._enter(pool, context)
            request = self._parse(method, parse, raw, context)
            try:
                return behaviour(request, context)
            except Exception:
                self._failed(method, context)
        return handle

    def _unary_stream(self, method, pool, parse, behaviour):
        def handle(raw, context):
            context = CappedContext(context, self.limits.max_details_chars, self.refused)
            self._enter(pool, context)
            request = self._parse(method, parse, raw, context)
            try:
                yield from behaviour(request, context)
            except Exception:
                self._failed(method, context)
        return handle

    def _stream_unary(self, method, pool, parse, behaviour):
        def handle(raw_iterator, context):
            context = CappedContext(context, self.limits.max_details_chars, self.refused)
            self._enter(pool, context)
            try:
                return behaviour(self._raw_requests(method, parse, raw_iterator, context),
                                 context)
            except Exception:
                self._failed(method, context)
        return handle

    def _stream_stream(self, method, pool, parse, behaviour):
        def handle(raw_iterator, context):
            context = CappedContext(context, self.limits.max_details_chars, self.refused)
            self._enter(pool, context)
            try:
                yield from behaviour(self._raw_requests(method, parse, raw_iterator, context),
                                     context)
            except Exception:
                self._failed(method, context)
        return handle
