"""Recovery after a crash: settling uploads the outbox recorded but the session store did
not. The store marks sessions consumed only after the round that used them completed; a
crash between an acknowledged upload and that record is settled here at the next start:
if the round published with this site's vector, its sessions are recorded as consumed and
never sent again; if it certainly did not, they are free; if that cannot be told yet, they
wait.
"""

from __future__ import annotations

import logging

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from fleetmind.aggregation.manifest import Manifest, VersionError
from fleetmind.aggregation.records import OutboxRecord
from fleetmind.client.agent import enroll, may_be_summed
from fleetmind.client.outbox import Outbox
from fleetmind.client.site_config import SiteConfig
from fleetmind.client.store import SessionStore
from fleetmind.protos.fleetmind.v1 import fleet_pb2, fleet_pb2_grpc, models_pb2, models_pb2_grpc
from fleetmind.runtime.layout import OUTBOX_FILE

__all__ = ["settle_outbox"]

log = logging.getLogger(__name__)

_SPENT, _FREE, _UNDECIDED = "spent", "free", "undecided"
_SETTLE_TIMEOUT_S = 5.0  # how long a re-attach may take to replay a round's end


def settle_outbox(config: SiteConfig, channel: grpc.Channel, key: Ed25519PrivateKey,
                  public_key: bytes, store: SessionStore) -> set[str]:
    """Resolves outbox records whose sessions the store has not marked consumed: the site
    died between sending and recording (or the round failed). Sessions of a round that
    published are recorded as consumed (sending them again would count them twice); those
    of a round that did not publish stay free. Returns the ids of sessions whose round's
    fate is still unknown (it may be running, or it dropped this site after its upload):
    the caller must not send them this iteration."""
    path = config.data_dir / OUTBOX_FILE
    if not path.exists():
        return set()
    with Outbox(path, key) as outbox:
        # The last record of each round: a retried send records again, same sessions.
        latest: dict[int, OutboxRecord] = {e.record.round_id: e.record for e in outbox}
    held: set[str] = set()
    for round_id, record in sorted(latest.items()):
        open_ids = [sid for sid in record.session_ids
                    if sid in store and not store.consolidations_using(sid)]
        if not open_ids:
            continue  # recorded after the round, or never stored here
        fate = _round_fate(config, channel, key, public_key, record)
        if fate == _SPENT:
            # The consolidation's own id died with the crash; this one names the round and
            # payload, so an auditor can match it to the outbox and the ledger.
            store.record_consolidation(f"round-{round_id}-{record.payload_sha256[:16]}",
                                       open_ids)
            log.warning("%s: round %d published with sessions a crash left unrecorded; "
                        "recorded them as consumed", config.name, round_id)
        elif fate == _UNDECIDED:
            held.update(open_ids)
            log.warning("%s: round %d's outcome is not known yet; its %d sessions wait",
                        config.name, round_id, len(open_ids))
    return held


def _round_fate(config: SiteConfig, channel: grpc.Channel, key: Ed25519PrivateKey,
                public_key: bytes, record: OutboxRecord) -> str:
    """Whether this site's upload in the round of `record` is in a published sum (_SPENT),
    certainly is not (_FREE), or cannot be told yet (_UNDECIDED)."""
    rounds = _published_rounds(channel, public_key, record.base_version,
                               config.round_timeout_s)
    part = _my_part(config, channel, key, record)
    if record.round_id in rounds:
        # Published: spent unless the aggregator says this site's vector was not summed
        # (it left before or during the upload). Not knowing counts as spent: sending
        # twice is the error that must never happen.
        return _FREE if part == _OUT else _SPENT
    if rounds:
        # A version newer than the round's base exists and it is not this round's: rounds
        # run one at a time, and the round merged against base_version, so it is over.
        return _FREE
    if part == _IN:
        return _SPENT  # it completed between the two questions
    if part == _RUNNING:
        return _UNDECIDED  # still running, or it may publish with this site's vector
    return _FREE  # ended without publishing, abandoned at a restart, or unknown there


_IN, _OUT, _RUNNING, _UNKNOWN = "in", "out", "running", "unknown"


def _my_part(config: SiteConfig, channel: grpc.Channel, key: Ed25519PrivateKey,
             record: OutboxRecord) -> str:
    """Re-attaches to the round and reads how it ended for this site: its vector summed in
    a completed round (_IN), certainly not summed (_OUT), the round still running or this
    site left it after uploading (_RUNNING: the sum may yet include it), or the aggregator
    no longer knows the round (_UNKNOWN)."""
    me = enroll(channel, key, config.name, config.round_timeout_s)
    stream = fleet_pb2_grpc.FleetStub(channel).JoinRound(
        fleet_pb2.JoinRoundRequest(site=me.site, round_id=record.round_id,
                                   base_version=record.base_version),
        timeout=_SETTLE_TIMEOUT_S)
    try:
        for event in stream:
            which = event.WhichOneof("event")
            if which == "completed":
                return _OUT if me.site in event.completed.dropped else _IN
            if which == "aborted":
                # From the outcome's phase and drop reason (agent.may_be_summed), not its text.
                return _RUNNING if may_be_summed(event.aborted) else _OUT
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.FAILED_PRECONDITION:
            return _UNKNOWN  # neither running nor among the rounds it still remembers
        if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
    finally:
        stream.cancel()
    return _RUNNING


def _published_rounds(channel: grpc.Channel, public_key: bytes, after_version: int,
                      timeout: float) -> set[int]:
    """Round ids named by the signed manifests of every version after `after_version`."""
    from cryptography.exceptions import InvalidSignature

    models = models_pb2_grpc.ModelsStub(channel)
    try:
        last = models.Latest(models_pb2.LatestRequest(), timeout=timeout).version
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.NOT_FOUND:
            return set()
        raise
    if last <= after_version:
        return set()
    verifier = Ed25519PublicKey.from_public_bytes(public_key)
    rounds: set[int] = set()
    stream = models.Watch(models_pb2.WatchRequest(after_version=after_version),
                          timeout=timeout)
    try:
        for announcement in stream:
            try:  # only what the pinned key signed may decide that sessions are spent
                verifier.verify(announcement.manifest_sig, announcement.manifest)
            except InvalidSignature:
                raise VersionError(f"version {announcement.version}: the manifest does not "
                                   "verify with the aggregator key") from None
            manifest = Manifest.from_bytes(announcement.manifest)
            if manifest.round_id is not None:
                rounds.add(manifest.round_id)
            if announcement.version >= last:
                break
    finally:
        stream.cancel()
    return rounds
