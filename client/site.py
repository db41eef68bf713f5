"""The site agent's loop: keep the global adapter current, and when enough new sessions have
arrived, consolidate them and join the next round.

    config = SiteConfig.load(Path("site.toml"))
    outcome = run_once(config, channel)      # one iteration (tests, cron)
    run(config, stop=threading.Event())      # forever, reconnecting with backoff

Layout under `data_dir` (one folder per site, so a copy of it is the site's whole state):

    sessions.db    the session store (client/store.py)
    outbox.sqlite  the signed, append-only record of every upload (client/outbox.py)
    replay.db      dreams kept for replay (client/replay.py)
    versions/, current, previous   downloaded versions and the active one (client/versions.py)

The store marks sessions consumed only after the round that used them completed, so a crash
or an aborted round leaves them to the next iteration; what a crash left between an upload
and that record is settled first (client/recovery.py). The rest has its own module:
settings (site_config.py), the identity key (identity.py), the channel (channel.py), what
is sent (contribution.py), telling a serving endpoint to load a version (notify_serving.py).

Participation caps: sessions whose privacy unit already entered the cap's K rounds (counted
from the outbox, so the count survives restarts) are held back before consolidating, and
the upload's outbox record carries each entering unit's new count (contribution.py,
docs/privacy-budget.md).
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleetmind.aggregation.manifest import VersionError
from fleetmind.client.agent import (
    RoundAbortedError,
    RoundResult,
    StaleBaseError,
    participate,
)
from fleetmind.client.channel import make_channel
from fleetmind.client.contribution import (
    Participation,
    RoundCapError,
    consolidate,
    outbox_participation,
    stricter_cap,
    within_cap,
)
from fleetmind.client.identity import load_identity_key
from fleetmind.client.metrics import SiteMetrics
from fleetmind.client.notify_serving import notify_serving
from fleetmind.client.outbox import Outbox
from fleetmind.client.recovery import settle_outbox
from fleetmind.client.site_config import ConfigError, SiteConfig, SiteTls
from fleetmind.client.store import SessionStore
from fleetmind.client.versions import CURRENT, activate, current_version, download_latest
from fleetmind.protos.fleetmind.v1 import models_pb2, models_pb2_grpc
from fleetmind.runtime.addresses import is_loopback, split_host_port
from fleetmind.runtime.layout import OUTBOX_FILE

# The loop's settings, identity and channel live in their own modules; they are named here
# too because the site's CLI, the demo and callers configuring a site reach them here.
__all__ = ["Backoff", "ConfigError", "Outcome", "SiteConfig", "SiteTls", "load_identity_key",
           "make_channel", "notify_serving", "run", "run_once", "wait_for_version"]

log = logging.getLogger(__name__)


# ---- one iteration ----------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What one iteration did. activated: versions made current (in order); pending: the
    unconsumed sessions seen; round: the round joined (None: below the threshold)."""

    activated: tuple[int, ...] = ()
    pending: int = 0
    round: RoundResult | None = None
    consolidation_id: str | None = None


def _refresh(config: SiteConfig, channel: grpc.Channel, public_key: bytes) -> int | None:
    """Downloads and activates the aggregator's latest version if it is not the active one.
    Returns the version activated, or None."""
    try:
        folder = download_latest(channel, config.data_dir, public_key,
                                 timeout=config.round_timeout_s)
    except VersionError as error:
        # Nothing published yet, or a version this site must not take: keep the current one.
        log.warning("%s: no new version activated: %s", config.name, error)
        return None
    number = int(folder.name)
    if current_version(config.data_dir) == number:
        return None
    try:
        activate(config.data_dir, folder, public_key, model_dir=config.model_dir)
    except VersionError as error:
        # Signed but not for this site (another base model, a downgrade, norms out of
        # bounds): nothing was activated. Raised, not retried: the loop stops on it, since
        # waiting cannot change the version or the site's model.
        log.error("%s: refused version %d: %s", config.name, number, error)
        raise
    log.info("%s: activated version %d", config.name, number)
    if config.serving_url:
        notify_serving(config.serving_url, f"{config.name}-v{number}", folder)
    return number


def _report_active(config: SiteConfig, metrics: SiteMetrics) -> None:
    """The active version, and when `current` last flipped: the link's own mtime, so the
    time survives a restart of the agent."""
    try:
        flipped: float | None = (config.data_dir / CURRENT).lstat().st_mtime
    except FileNotFoundError:
        flipped = None
    metrics.active(current_version(config.data_dir), flipped)


def run_once(config: SiteConfig, channel: grpc.Channel,
             identity: Ed25519PrivateKey | None = None,
             metrics: SiteMetrics | None = None,
             noise_rng: np.random.Generator | None = None) -> Outcome:
    """One iteration: activate a newer version if there is one; with at least
    min_new_sessions unconsumed sessions, consolidate them on the active version, join a
    round, record the consolidation once the round completed, and activate what it
    published. Raises grpc.RpcError (aggregator unreachable or refusing),
    RoundAbortedError, ConfigError/VersionError (fix the site, then run again),
    PlainSumRefusedError (an aggregator off loopback asked for unmasked updates), or
    ClipMismatchError (the round's epsilon assumes a bound this site's clipping does not
    keep: align privacy_unit and clip_norm with the aggregator's).
    `metrics`, if given, is kept up to date (run() passes the one it serves). `noise_rng`:
    the generator of the round's DP noise and rounding; None (every deployment: nothing in
    a site's config or CLI sets it) draws fresh OS entropy. Simulations pass a seeded one so
    a benchmark run repeats; noise an observer can regenerate protects nothing."""
    metrics = metrics or SiteMetrics()
    key = identity or load_identity_key(config.identity_key)
    public_key = config.aggregator_public_key()
    config.data_dir.mkdir(parents=True, exist_ok=True)
    activated = [v for v in (_refresh(config, channel, public_key),) if v is not None]
    _report_active(config, metrics)

    with SessionStore(config.data_dir) as store:
        # Before consolidating, settle uploads a crash left unrecorded: sessions a completed
        # round already carried are spent, and those of an undecided round wait.
        held = settle_outbox(config, channel, key, public_key, store)
        unconsumed = store.unconsumed()
        metrics.sessions(len(store), len(unconsumed))
        free = [s for s in unconsumed if s.id not in held]
        history, last_cap = _participation(config, key)
        # The stricter of the site's cap and the fleet's, as last seen in the outbox; a
        # round that carries a stricter one is learned below (RoundCapError).
        cap = stricter_cap(config.participation_cap, last_cap)
        while True:
            # Held, not consumed: a unit at its cap never enters again, so its sessions are
            # left out of the count toward min_new_sessions (and never marked as learned).
            sessions, capped = within_cap(config, free, history, cap)
            if capped:
                log.info("%s: %d session(s) left out: their %s is at the participation cap "
                         "of %d rounds", config.name, len(capped), config.privacy_unit,
                         cap.max_rounds if cap else 0)
            if len(sessions) < config.min_new_sessions:
                return Outcome(tuple(activated), len(sessions))
            base_version = current_version(config.data_dir)
            if base_version is None:
                raise VersionError("no version is active yet (the aggregator published "
                                   "none); the site consolidates only on a verified global "
                                   "version")
            result, update = consolidate(config, sessions, base_version, store.get)
            metrics.consolidated(result.stats.tokens)
            # A plain_sum round (no secure aggregation) shows the aggregator this update:
            # sent only to an aggregator on this machine, where that ablation runs.
            on_loopback = is_loopback(split_host_port(config.aggregator)[0])
            try:
                with Outbox(config.data_dir / OUTBOX_FILE, key) as outbox:
                    done = participate(channel, key, config.name, update, outbox,
                                       rng=noise_rng, timeout=config.round_timeout_s,
                                       allow_plain_sum=on_loopback,
                                       participation=Participation.for_sessions(
                                           config, sessions, history))
            except RoundCapError as error:
                # Nothing was sent. The round's cap is stricter than the one filtered with:
                # filter with it and consolidate again (once: it is then the strictest).
                learned = stricter_cap(cap.max_rounds if cap else None, error.round_cap)
                if learned is None or (cap is not None
                                       and learned.max_rounds >= cap.max_rounds):
                    raise
                log.warning("%s: the round's participation cap is %d rounds, stricter than "
                            "this site knew: leaving out the units at it and consolidating "
                            "again", config.name, learned.max_rounds)
                cap = learned
                continue
            break
        # Only now: a round that failed leaves the sessions for the next one.
        store.record_consolidation(result.consolidation_id, [s.id for s in sessions])
        metrics.rounds.inc()
        metrics.sessions(len(store), len(unconsumed) - len(sessions))
    log.info("%s: round %d published version %d with %d sites", config.name, done.round_id,
             done.version, done.cohort_size)
    fresh = _refresh(config, channel, public_key)
    if fresh is not None:
        activated.append(fresh)
    _report_active(config, metrics)
    return Outcome(tuple(activated), len(sessions), done, result.consolidation_id)


def _participation(config: SiteConfig, key: Ed25519PrivateKey
                   ) -> tuple[dict[str, tuple[int, ...]], int | None]:
    """Each privacy unit's rounds entered, and the last cap recorded, from the outbox (none
    yet: nothing entered, no cap seen)."""
    path = config.data_dir / OUTBOX_FILE
    if not path.exists():
        return {}, None
    with Outbox(path, key) as outbox:
        return outbox_participation(outbox)


# ---- the loop ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter, capped: first, first*2, ... up to `cap`."""

    first_s: float = 1.0
    cap_s: float = 300.0
    idle_s: float = 30.0  # between iterations that found nothing to do

    def delay(self, failures: int, rng: random.Random) -> float:
        return rng.uniform(0, min(self.cap_s, self.first_s * 2 ** max(0, failures - 1)))


# StaleBaseError: a newer version was published while this site distilled; the next
# iteration activates it and consolidates the same (still unconsumed) sessions again.
_RETRYABLE = (grpc.RpcError, RoundAbortedError, StaleBaseError, ConnectionError)


def run(config: SiteConfig, stop: threading.Event | None = None,
        backoff: Backoff = Backoff(), channel_factory: Callable[[SiteConfig], grpc.Channel]
        = make_channel, rng: random.Random | None = None,
        metrics: SiteMetrics | None = None) -> None:
    """Runs iterations until `stop` is set. An unreachable or refusing aggregator, an
    aborted round or a cut stream is retried after a jittered, growing pause (logged);
    anything else (a bad config, a version that does not verify) is raised, because
    retrying cannot fix it. With config.metrics_listen, `metrics` (or a new SiteMetrics)
    is served over HTTP there until the loop ends."""
    stop = stop or threading.Event()
    rng = rng or random.Random()
    metrics = metrics or SiteMetrics()
    identity = load_identity_key(config.identity_key)
    failures = 0
    endpoint = metrics.serve(config.metrics_listen) if config.metrics_listen else None
    if endpoint is not None:
        log.info("%s: metrics on %s", config.name, endpoint.url)
    channel = channel_factory(config)
    try:
        while not stop.is_set():
            try:
                outcome = run_once(config, channel, identity, metrics)
            except _RETRYABLE as error:
                failures += 1
                metrics.failures.inc()
                pause = backoff.delay(failures, rng)
                detail = f"{error.code().name}: {error.details()}" \
                    if isinstance(error, grpc.RpcError) and hasattr(error, "code") else str(error)
                log.warning("%s: retry %d in %.1f s after %s", config.name, failures, pause,
                            detail)
                stop.wait(pause)
                continue
            failures = 0
            if outcome.round is None:  # nothing to send: wait for a version or for idle_s
                wait_for_version(channel, current_version(config.data_dir), backoff.idle_s,
                                 stop)
    finally:
        channel.close()
        if endpoint is not None:
            endpoint.stop()


def wait_for_version(channel: grpc.Channel, after: int | None, seconds: float,
                     stop: threading.Event) -> int | None:
    """Watches (Models.Watch) for a version newer than `after`, for at most `seconds`:
    returns its number as soon as it is announced, or None at the time limit or on a cut
    stream (the caller's next iteration looks again either way)."""
    request = models_pb2.WatchRequest()
    if after is not None:
        request.after_version = after
    stream = models_pb2_grpc.ModelsStub(channel).Watch(request, timeout=seconds)
    stopper = threading.Thread(target=lambda: stop.wait(seconds) and stream.cancel(),
                               daemon=True)
    stopper.start()
    try:
        for announcement in stream:
            return announcement.version
    except grpc.RpcError:
        return None  # deadline, cancel or a cut connection
    finally:
        stream.cancel()
    return None
