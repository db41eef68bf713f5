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
or an aborted round leaves them to the next iteration. A crash between an acknowledged upload
and that record is settled from the outbox at the next start: if the round published with
this site's vector, its sessions are recorded as consumed and never sent again.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import math
import os
import random
import secrets
import threading
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from fleetmind.aggregation import dp
from fleetmind.aggregation.manifest import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MANIFEST,
    Manifest,
    VersionError,
)
from fleetmind.aggregation.merge import flatten, staleness_weight, unflatten
from fleetmind.client.agent import (
    RoundAbortedError,
    RoundResult,
    SiteUpdate,
    StaleBaseError,
    enroll,
    participate,
)
from fleetmind.client.distill import DistillConfig
from fleetmind.client.metrics import SiteMetrics
from fleetmind.client.outbox import Outbox, OutboxRecord
from fleetmind.client.store import Session, SessionStore
from fleetmind.client.versions import (
    CURRENT,
    activate,
    current_version,
    download_latest,
    verify_folder,
)
from fleetmind.protos.fleetmind.v1 import fleet_pb2, fleet_pb2_grpc, models_pb2, models_pb2_grpc

if TYPE_CHECKING:  # consolidate pulls in the distillation stack; only its type is needed
    from fleetmind.client.consolidate import SiteConsolidation

__all__ = ["Backoff", "ConfigError", "Outcome", "SiteConfig", "SiteTls", "is_loopback",
           "load_identity_key", "make_channel", "public_key_bytes", "run", "run_once",
           "split_address"]

log = logging.getLogger(__name__)

OUTBOX_FILE = "outbox.sqlite"
REPLAY_FILE = "replay.db"
# transformers' lazy imports and from_pretrained's meta-device init are not thread-safe, so
# agents sharing a process (tests, one host running several sites) load models one at a time.
_LOAD_LOCK = threading.Lock()
_PEFT_PREFIX = "base_model.model."
_B_SUFFIX = ".lora_B.weight"


class ConfigError(ValueError):
    """The site's configuration is unusable; the message names the field and the fix."""


# ---- configuration ----------------------------------------------------------------------


@dataclass(frozen=True)
class SiteTls:
    """mTLS to the aggregator: the fleet CA, and this site's certificate and key."""

    ca_certificate: Path
    certificate: Path
    private_key: Path


def is_loopback(host: str) -> bool:
    # Duplicated from the server's check on purpose: client code never imports the server.
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"aggregator={address!r} must be HOST:PORT (e.g. agg.example:7443, "
                          "[::1]:7443)")
    return host, int(port)


@dataclass(frozen=True)
class SiteConfig:
    """One site's settings, validated at construction.

    aggregator_key: the aggregator's Ed25519 public key (32 raw bytes, or a file holding
    them raw, as 64 hex digits, or as PEM): it pins who may sign versions, and the
    enrolment reply must name the same key. clip_norm must be the aggregator's
    privacy.clip_norm: the site clips before masking because the server cannot see the
    update. privacy_unit: what one clip bounds. "session": each session is distilled alone
    and clipped alone; "user": each session is distilled alone, and an end user's sessions
    are summed and clipped together, so a user who says a secret in many sessions counts
    once (a session without a user id is its own user, so give every session its user id;
    the site logs how many had none); "site": the site's whole delta is one clipped unit.
    The default, "session", is the aggregator's default. A round whose accountant assumes a
    finer unit or a larger clip (a coarser unit keeps a finer one's bound only at half the
    clip) is refused before anything is sent (agent.ClipMismatchError)."""

    name: str
    data_dir: Path
    model_dir: Path
    aggregator: str
    identity_key: Path
    aggregator_key: Path | bytes
    min_new_sessions: int = 8
    distill: DistillConfig = field(default_factory=DistillConfig)
    guard_prompts: Path | None = None
    insecure: bool = False
    tls: SiteTls | None = None
    clip_norm: float = 1.0
    privacy_unit: str = "session"
    round_timeout_s: float = 120.0
    serving_url: str | None = None
    metrics_listen: str | None = None  # "host:port" for Prometheus /metrics (port 0: any)

    def __post_init__(self) -> None:
        for name in ("data_dir", "model_dir", "identity_key", "guard_prompts"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        if not isinstance(self.aggregator_key, bytes | bytearray):
            object.__setattr__(self, "aggregator_key", Path(self.aggregator_key))
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError("name is empty: give the site the name it enrols under")
        host, _ = split_address(self.aggregator)
        if self.insecure and self.tls is not None:
            raise ConfigError("both insecure and tls are set: pick one (tls for any real "
                              "aggregator)")
        if self.insecure and not is_loopback(host):
            raise ConfigError(f"plaintext refused to {self.aggregator}: insecure is only for a "
                              "loopback aggregator (127.0.0.1, ::1, localhost); configure tls")
        if not self.insecure and self.tls is None:
            raise ConfigError("no tls: set tls.ca_certificate, tls.certificate and "
                              "tls.private_key, or insecure = true for a loopback aggregator")
        for what, value in (("min_new_sessions", self.min_new_sessions),):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{what}={value!r} must be an integer >= 1")
        if self.privacy_unit not in dp.PRIVACY_UNITS:
            raise ConfigError(f"privacy_unit={self.privacy_unit!r} must be one of "
                              f"{', '.join(dp.PRIVACY_UNITS)} (the aggregator's "
                              "privacy.privacy_unit, or coarser)")
        if not isinstance(self.distill, DistillConfig):
            raise ConfigError("distill must be a DistillConfig (a [distill] table in the file)")
        for what, value in (("clip_norm", self.clip_norm),
                            ("round_timeout_s", self.round_timeout_s)):
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{what}={value!r} must be a finite number > 0")
        if not (self.model_dir / "config.json").is_file():
            raise ConfigError(f"model_dir={self.model_dir}: no config.json; pass the local "
                              "Hugging Face folder of the fleet's base model")
        if self.guard_prompts is not None and not self.guard_prompts.is_file():
            raise ConfigError(f"guard_prompts={self.guard_prompts}: no such file; pass a JSONL "
                              "of {\"messages\": [...]} or leave it out")
        if isinstance(self.aggregator_key, Path) and not self.aggregator_key.is_file():
            raise ConfigError(f"aggregator_key={self.aggregator_key}: no such file; copy the "
                              "aggregator's public key there")
        if self.serving_url is not None and not (
                isinstance(self.serving_url, str)
                and self.serving_url.startswith(("http://", "https://"))):
            raise ConfigError(f"serving_url={self.serving_url!r}: give the serving endpoint's "
                              "base URL, e.g. http://127.0.0.1:8000 (vLLM), or leave it out")
        if self.metrics_listen is not None:
            host, _, port = str(self.metrics_listen).rpartition(":")
            if not isinstance(self.metrics_listen, str) or not host or not port.isdigit() \
                    or int(port) > 65535:
                raise ConfigError(f"metrics_listen={self.metrics_listen!r} must be HOST:PORT "
                                  "(e.g. 0.0.0.0:9465; port 0: any free one), or left out "
                                  "for no metrics endpoint")
        self.aggregator_public_key()  # a malformed key fails here, not mid-round

    def aggregator_public_key(self) -> bytes:
        """The pinned key as 32 raw bytes."""
        raw = bytes(self.aggregator_key) if isinstance(self.aggregator_key, bytes | bytearray) \
            else self.aggregator_key.read_bytes()
        return public_key_bytes(raw, str(self.aggregator_key)
                                 if isinstance(self.aggregator_key, Path) else "aggregator_key")

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], base: Path = Path(".")) -> SiteConfig:
        """From a parsed JSON/TOML document; relative paths are relative to `base` (the
        config file's folder)."""
        known = {f.name for f in fields(cls)}
        if "per_session" in raw:
            raise ConfigError("per_session was replaced by privacy_unit: write privacy_unit = "
                              "\"session\" (or \"user\", or \"site\" for per_session = "
                              "false), the aggregator's privacy.privacy_unit or coarser")
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"unknown setting(s) {unknown}; known: {sorted(known)}")
        values: dict[str, Any] = dict(raw)

        def path(value: Any) -> Path:
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{value!r} is not a path")
            return Path(value) if Path(value).is_absolute() else base / value

        for name in ("data_dir", "model_dir", "identity_key", "aggregator_key",
                     "guard_prompts"):
            if values.get(name) is not None:
                values[name] = path(values[name])
        if "tls" in values:
            tls = values["tls"]
            if not isinstance(tls, Mapping) or set(tls) != {"ca_certificate", "certificate",
                                                            "private_key"}:
                raise ConfigError("tls must hold exactly ca_certificate, certificate and "
                                  "private_key")
            values["tls"] = SiteTls(**{k: path(v) for k, v in tls.items()})
        if "distill" in values:
            try:
                values["distill"] = DistillConfig(**dict(values["distill"]))
            except (TypeError, ValueError) as error:
                raise ConfigError(f"distill: {error}") from None
        missing = sorted({"name", "data_dir", "model_dir", "aggregator", "identity_key",
                          "aggregator_key"} - set(values))
        if missing:
            raise ConfigError(f"missing setting(s) {missing}")
        try:
            return cls(**values)
        except TypeError as error:
            raise ConfigError(str(error)) from None

    @classmethod
    def load(cls, path: Path) -> SiteConfig:
        """A .json or .toml file."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as error:
            raise ConfigError(f"cannot read {path}: {error.strerror}") from None
        try:
            raw = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
            raise ConfigError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'}"
                              f" ({error})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a table of settings")
        return cls.from_mapping(raw, path.parent)


def public_key_bytes(raw: bytes, source: str) -> bytes:
    text = raw.strip()
    if len(raw) == 32:
        return raw
    if len(text) == 64:
        try:
            return bytes.fromhex(text.decode())
        except (ValueError, UnicodeDecodeError):
            pass
    if text.startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(text)
        except ValueError as error:
            raise ConfigError(f"{source}: unreadable PEM ({error})") from None
        if isinstance(key, Ed25519PublicKey):
            return key.public_bytes_raw()
    raise ConfigError(f"{source}: not an Ed25519 public key (32 raw bytes, 64 hex digits or "
                      "PEM); take it from the aggregator's operator")


# ---- identity ---------------------------------------------------------------------------


def load_identity_key(path: Path, create: bool = True) -> Ed25519PrivateKey:
    """The site's Ed25519 identity (32 raw bytes or PKCS#8 PEM). Absent and `create`: a new
    key is written as PEM, mode 0600, atomically (a temporary file hard-linked into place,
    so two agents starting at once end with the same single key)."""
    path = Path(path)
    if not path.exists() and create:
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(descriptor, "wb") as stream:
                stream.write(pem)
                stream.flush()
                os.fsync(stream.fileno())
            # link(2) refuses to replace: if another process created the key first, keep it.
            with contextlib.suppress(FileExistsError):
                os.link(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
    try:
        mode = path.stat().st_mode
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"identity key {path} does not exist; create it or let the agent "
                          "create it") from None
    if mode & 0o077:
        raise ConfigError(f"identity key {path} is readable by others (mode {mode & 0o777:o}); "
                          f"run `chmod 600 {path}`")
    if len(raw) == 32:
        return Ed25519PrivateKey.from_private_bytes(raw)
    try:
        key = serialization.load_pem_private_key(raw, password=None)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"identity key {path}: not a raw or unencrypted PEM key ({error})") \
            from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"identity key {path} is a {type(key).__name__}, not Ed25519")
    return key


def make_channel(config: SiteConfig) -> grpc.Channel:
    """A channel to the aggregator: mTLS, or plaintext only to loopback (SiteConfig)."""
    if config.insecure:
        return grpc.insecure_channel(config.aggregator)
    assert config.tls is not None  # SiteConfig requires one of the two
    credentials = grpc.ssl_channel_credentials(
        root_certificates=config.tls.ca_certificate.read_bytes(),
        private_key=config.tls.private_key.read_bytes(),
        certificate_chain=config.tls.certificate.read_bytes())
    return grpc.secure_channel(config.aggregator, credentials)


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
    activate(config.data_dir, folder, public_key)
    log.info("%s: activated version %d", config.name, number)
    if config.serving_url:
        notify_serving(config.serving_url, f"{config.name}-v{number}", folder)
    return number


def notify_serving(base_url: str, name: str, folder: Path, timeout: float = 10.0) -> bool:
    """Asks a serving endpoint to load the activated adapter (vLLM's
    `POST /v1/load_lora_adapter`, which needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=True). Each
    version gets its own name, since vLLM refuses to load a name twice. A failure is logged,
    not raised: the version is active on disk either way, and serving can be told again."""
    import urllib.error
    import urllib.request

    body = json.dumps({"lora_name": name, "lora_path": str(Path(folder).resolve())}).encode()
    request = urllib.request.Request(base_url.rstrip("/") + "/v1/load_lora_adapter", data=body,
                                     headers={"Content-Type": "application/json"},
                                     method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            ok = 200 <= reply.status < 300
    except (urllib.error.URLError, OSError) as error:
        log.warning("serving endpoint %s did not load %s: %s", base_url, name, error)
        return False
    if ok:
        log.info("serving endpoint %s loaded %s", base_url, name)
    return ok


def _active_adapter(config: SiteConfig) -> tuple[Manifest, dict[str, Any], dict[str, np.ndarray]]:
    """The active version's manifest, adapter config and B tensors by module name."""
    from safetensors.numpy import load_file

    folder = config.data_dir / CURRENT
    manifest = Manifest.from_bytes((folder / MANIFEST).read_bytes())
    adapter = json.loads((folder / ADAPTER_CONFIG).read_text())
    b = {key[len(_PEFT_PREFIX):-len(_B_SUFFIX)]: tensor
         for key, tensor in load_file(str(folder / ADAPTER_WEIGHTS)).items()
         if key.startswith(_PEFT_PREFIX) and key.endswith(_B_SUFFIX)}
    if not b:
        raise VersionError(f"{folder / ADAPTER_WEIGHTS} holds no LoRA B tensors")
    return manifest, adapter, b


def _site_update(config: SiteConfig, result: SiteConsolidation, sessions: list[Session],
                 base_version: int, latest_version: int) -> SiteUpdate:
    """Clips before anything leaves: each session, each end user, or the site as one unit."""
    delta = {name: np.asarray(t, dtype=np.float32) for name, t in result.update.tensors.items()}
    shapes = {name: tuple(np.shape(t)) for name, t in delta.items()}
    if config.privacy_unit != "site" and result.session_updates:
        users = {s.id: s.user or s.id for s in sessions}
        if config.privacy_unit == "user" and (anonymous := sum(not s.user for s in sessions)):
            log.warning("%s: %d of %d sessions have no user id; each is clipped as its own "
                        "user", config.name, anonymous, len(sessions))
        contributions = [dp.Contribution(sid, users[sid], flatten(d, shapes))
                         for sid, d in result.session_updates]
        unit = config.privacy_unit
        flat, norms = dp.clip_and_sum(contributions, config.clip_norm, unit)
        units = len(norms)
        # The outbox's "before clipping" is the unclipped sum's norm: what would have left.
        norm_before = float(np.linalg.norm(np.sum([c.delta for c in contributions], axis=0,
                                                  dtype=np.float64)))
    else:
        flat, norm_before = dp.clip_to_norm(flatten(delta, shapes), config.clip_norm)
        unit, units = "site", 1
    return SiteUpdate(
        delta=unflatten(flat.astype(np.float32), shapes), base_version=base_version,
        weight=staleness_weight(latest_version - base_version),
        session_ids=tuple(sorted(s.id for s in sessions)), scrubbed=result.scrubbed,
        norm_before_clip=norm_before, contributing_units=units, clip_norm=config.clip_norm,
        privacy_unit=unit)


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
             metrics: SiteMetrics | None = None) -> Outcome:
    """One iteration: activate a newer version if there is one; with at least
    min_new_sessions unconsumed sessions, consolidate them on the active version, join a
    round, record the consolidation once the round completed, and activate what it
    published. Raises grpc.RpcError (aggregator unreachable or refusing),
    RoundAbortedError, ConfigError/VersionError (fix the site, then run again),
    PlainSumRefusedError (an aggregator off loopback asked for unmasked updates), or
    ClipMismatchError (the round's epsilon assumes a bound this site's clipping does not
    keep: align privacy_unit and clip_norm with the aggregator's).
    `metrics`, if given, is kept up to date (run() passes the one it serves)."""
    metrics = metrics or SiteMetrics()
    key = identity or load_identity_key(config.identity_key)
    public_key = config.aggregator_public_key()
    config.data_dir.mkdir(parents=True, exist_ok=True)
    activated = [v for v in (_refresh(config, channel, public_key),) if v is not None]
    _report_active(config, metrics)

    with SessionStore(config.data_dir) as store:
        # Before consolidating, settle uploads a crash left unrecorded: sessions a completed
        # round already carried are spent, and those of an undecided round wait.
        held = _settle_outbox(config, channel, key, public_key, store)
        unconsumed = store.unconsumed()
        metrics.sessions(len(store), len(unconsumed))
        sessions = [s for s in unconsumed if s.id not in held]
        if len(sessions) < config.min_new_sessions:
            return Outcome(tuple(activated), len(sessions))
        base_version = current_version(config.data_dir)
        if base_version is None:
            raise VersionError("no version is active yet (the aggregator published none); "
                               "the site consolidates only on a verified global version")
        result, update = _consolidate(config, sessions, base_version, store.get)
        metrics.consolidated(result.stats.tokens)
        # A plain_sum round (no secure aggregation) shows the aggregator this update: sent
        # only to an aggregator on this machine, where that ablation runs.
        on_loopback = is_loopback(split_address(config.aggregator)[0])
        with Outbox(config.data_dir / OUTBOX_FILE, key) as outbox:
            done = participate(channel, key, config.name, update, outbox,
                               timeout=config.round_timeout_s, allow_plain_sum=on_loopback)
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


# ---- recovery after a crash -------------------------------------------------------------

_SPENT, _FREE, _UNDECIDED = "spent", "free", "undecided"
_SETTLE_TIMEOUT_S = 5.0  # how long a re-attach may take to replay a round's end


def _settle_outbox(config: SiteConfig, channel: grpc.Channel, key: Ed25519PrivateKey,
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
# Phases a site can miss while its vector is still not in the sum.
_BEFORE_SUM = ("advertise_keys", "share_keys", "masked_input_collection")


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
                reason = event.aborted.reason
                # "site N missed <phase> and left round R" ends this site's part only: a
                # site that missed unmasking had uploaded, and secure aggregation still
                # sums its vector; one that missed an earlier phase never counted.
                if "and left round" in reason:
                    return _OUT if any(f"missed {phase} " in reason for phase in _BEFORE_SUM) \
                        else _RUNNING
                return _OUT  # the whole round was aborted or abandoned at a restart
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


def _consolidate(config: SiteConfig, sessions: list[Session], base_version: int,
                 earlier: Callable[[str], Session]) -> tuple[SiteConsolidation, SiteUpdate]:
    with _LOAD_LOCK:
        from fleetmind.client import lora
        from fleetmind.client.consolidate import consolidate_sessions, read_prompts
        from fleetmind.client.model import load_model
        from fleetmind.client.replay import ReplayBuffer

        # Verified again here: download_latest may have kept (and only logged) a problem,
        # and what is distilled on must be exactly what the aggregator signed.
        verify_folder(config.data_dir / CURRENT, config.aggregator_public_key())
        manifest, adapter, b = _active_adapter(config)
        if manifest.version != base_version:
            raise VersionError(f"{config.data_dir / CURRENT} holds version {manifest.version},"
                               f" the link says {base_version}: roll back or download again")
        guard = read_prompts(config.guard_prompts) if config.guard_prompts else []
        model, tokenizer = load_model(config.model_dir)
        # The version's own adapter config: its exact module paths, rank and alpha, so the
        # delta's shapes are the aggregator's and A is the version's public frozen A.
        targets = adapter.get("target_modules") or list(lora.MLP_TARGETS)
        peft_model = lora.attach_lora(model, seed=manifest.frozen_a_seed,
                                      rank=int(adapter["r"]),
                                      alpha=float(adapter["lora_alpha"]), targets=targets)
        lora.set_b(peft_model, b)
    replay = ReplayBuffer(config.data_dir / REPLAY_FILE)
    try:
        result = consolidate_sessions(peft_model, tokenizer, sessions, config.distill,
                                      site=config.name, base_version=base_version,
                                      seed=manifest.frozen_a_seed, guard=guard, replay=replay,
                                      earlier=earlier,
                                      per_session=config.privacy_unit != "site",
                                      progress=False)
    finally:
        replay.close()
    # Staleness is counted against the active version: it was just refreshed, so it is 0
    # unless the aggregator published while this site was distilling.
    return result, _site_update(config, result, sessions, base_version, base_version)


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
