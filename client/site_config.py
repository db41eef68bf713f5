"""A site's settings (`SiteConfig`), validated once, at the edge.

A config file is TOML or JSON (fleetmind.runtime.config: FLEETMIND_<KEY> and
FLEETMIND_TLS__<KEY>, FLEETMIND_DISTILL__<KEY> in the environment override it):

    name = "site-a"                   # the name it enrols under
    data_dir = "site-a"               # relative to the config file
    model_dir = "models/base"         # the fleet's base model, a local Hugging Face folder
    aggregator = "agg.example:7443"
    identity_key = "site-a/identity.pem"
    aggregator_key = "aggregator.pub" # raw, 64 hex digits or PEM
    [tls]
    ca_certificate = "certs/ca.crt"; certificate = "certs/site-a.crt"; private_key = "..."
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fleetmind.aggregation import dp
from fleetmind.aggregation.participation import ParticipationCap
from fleetmind.client.distill_config import DistillConfig, per_unit_config
from fleetmind.runtime.addresses import is_loopback, split_host_port
from fleetmind.runtime.config import ConfigError, dataclass_types, load_document
from fleetmind.runtime.keys import public_key_bytes, read_key_file
from fleetmind.runtime.tls import TlsFiles

__all__ = ["SERVE_TABLE", "ConfigError", "SiteConfig", "SiteTls"]

SERVE_TABLE = "serve"  # the site config's table for `client serve`


# mTLS to the aggregator: the fleet CA, and this site's certificate and key.
SiteTls = TlsFiles


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
    clip) is refused before anything is sent (agent.ClipMismatchError).
    participation_cap: K, the most rounds each of this site's privacy units (as
    privacy_unit says) may enter over the fleet's life (None: no cap of the site's own).
    The site enforces the stricter of this and the round's cap (RoundConfig.
    participation_cap) and records each unit's count in its outbox (docs/privacy-budget.md)."""

    name: str
    data_dir: Path
    model_dir: Path
    aggregator: str
    identity_key: Path
    aggregator_key: Path | bytes
    min_new_sessions: int = 8
    # Each privacy unit is distilled alone and clipped: the per-unit settings, not
    # `client consolidate`'s joint ones (`distill_config.per_unit_config`).
    distill: DistillConfig = field(default_factory=per_unit_config)
    guard_prompts: Path | None = None
    insecure: bool = False
    tls: SiteTls | None = None
    clip_norm: float = 1.0
    privacy_unit: str = "session"
    participation_cap: int | None = None
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
        host, _ = split_host_port(self.aggregator, "aggregator", any_port=False)
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
        if self.participation_cap is not None:
            try:
                ParticipationCap(self.participation_cap)
            except ValueError as error:
                raise ConfigError(f"participation_cap: {error}") from None
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
            split_host_port(self.metrics_listen, "metrics_listen")
        self.aggregator_public_key()  # a malformed key fails here, not mid-round

    def aggregator_public_key(self) -> bytes:
        """The pinned key as 32 raw bytes."""
        if isinstance(self.aggregator_key, bytes | bytearray):
            return public_key_bytes(bytes(self.aggregator_key), "aggregator_key")
        return public_key_bytes(read_key_file(self.aggregator_key, "aggregator_key"),
                                str(self.aggregator_key))

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], base: Path = Path(".")) -> SiteConfig:
        """From a parsed JSON/TOML document; relative paths are relative to `base` (the
        config file's folder)."""
        known = {f.name for f in fields(cls)}
        if "per_session" in raw:
            raise ConfigError("per_session was replaced by privacy_unit: write privacy_unit = "
                              "\"session\" (or \"user\", or \"site\" for per_session = "
                              "false), the aggregator's privacy.privacy_unit or coarser")
        # [serve] belongs to `client serve` (client/serve/settings.py), which checks it.
        unknown = sorted(set(raw) - known - {SERVE_TABLE})
        if unknown:
            raise ConfigError(f"unknown setting(s) {unknown}; known: {sorted(known)}")
        values: dict[str, Any] = {k: v for k, v in raw.items() if k != SERVE_TABLE}

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
                values["distill"] = per_unit_config(**dict(values["distill"]))
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
        """A .toml or .json file, with the environment's overrides (module docstring)."""
        path = Path(path)
        tables = {"tls": dataclass_types(SiteTls), "distill": dataclass_types(DistillConfig)}
        return cls.from_mapping(load_document(path, dataclass_types(cls), tables), path.parent)
