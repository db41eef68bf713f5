"""The aggregator's configuration: typed, validated once, at the edge (`load_config`).

A config file is TOML or JSON with these keys (all optional but `data_dir`); the
environment overrides any of them (fleetmind.runtime.config): FLEETMIND_LISTEN,
FLEETMIND_PRIVACY__CLIP_NORM, ...

    listen = "127.0.0.1:7443"        # host:port; port 0 lets the OS pick
    metrics_listen = "0.0.0.0:9464"  # Prometheus /metrics over HTTP; absent: no endpoint
    data_dir = "aggregator-data"     # relative to the config file
    insecure = false                 # plaintext: only on a loopback address
    [tls]                            # mTLS (required unless insecure)
    certificate = "certs/aggregator.crt"
    private_key = "certs/aggregator.key"
    ca_certificate = "certs/ca.crt"
    [cohort]                         # CohortPolicy
    min_size = 3; target_size = 10; deadline_s = 60; phase_deadline_s = 60
    secure_aggregation = true        # false: the plain-sum ablation, loopback listen only
    [privacy]                        # PrivacyPolicy
    clip_norm = 1.0; noise_multiplier = 1.0; noise_mode = "distributed"; epsilon_budget = 10
    adapter_file = "adapter.toml"    # the [adapter] table `fleetmind server adapter` wrote,
                                     # relative to the config file; or the table itself:
    [adapter]                        # what genesis adapts (only read for a fresh data dir)
    base_model_id = "..."; base_model_sha256 = "..."; frozen_a_seed = 0; rank = 8
    alpha = 16.0; fan_in_fan_out = false   # true for Conv1D layers (GPT-2)
    modules = [{name = "model.layers.0.mlp.gate_proj", in_features = 64, out_features = 128}]

Neither adapter_file nor [adapter]: DEV_ADAPTER, the committed toy model's (development).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fleetmind.aggregation.dp import PRIVACY_UNITS
from fleetmind.aggregation.manifest import DEFAULT_ALPHA, DEFAULT_RANK
from fleetmind.aggregation.participation import ParticipationCap
from fleetmind.aggregation.quantize import RING_BITS
from fleetmind.runtime.addresses import LOOPBACK_NAMES, is_loopback, split_host_port
from fleetmind.runtime.config import ConfigError, dataclass_types, load_document, read_document
from fleetmind.server.limits import ServerLimits
from fleetmind.server.versions import AdapterSpec, TargetModule

__all__ = ["DEV_ADAPTER", "LOOPBACK_NAMES", "CohortPolicy", "ConfigError", "PrivacyPolicy",
           "ServerConfig", "TlsPaths", "is_loopback", "load_config", "parse_config",
           "split_listen"]


@dataclass(frozen=True)
class CohortPolicy:
    """A cohort closes when `target_size` sites are ready, or `deadline_s` after the first
    ready site if at least `min_size` are. Each secure-aggregation phase closes when every
    live site has answered or `phase_deadline_s` has passed (the rest count as dropped).
    `max_size` is the ring's headroom: the most sites one sum may hold.

    `secure_aggregation = False` is an ablation for measuring what SecAgg+ costs: rounds
    skip key advertisement, key sharing and unmasking, each site uploads its encoded
    vector unmasked, and the aggregator sums what arrived by the phase deadline. The
    aggregator then sees every site's update (with distributed noise, each carries only
    its share of the noise), so ServerConfig allows it only on a loopback address, and the
    ledger and manifest of each such round say it was not securely aggregated."""

    min_size: int = 3
    target_size: int = 10
    deadline_s: float = 60.0
    phase_deadline_s: float = 60.0
    max_size: int = 200
    ring_bits: int = 32
    dropout_rate: float = 0.1  # sizes the SecAgg+ neighbour graph (graph.secagg_plus_degree)
    secure_aggregation: bool = True

    def __post_init__(self) -> None:
        if not 3 <= self.min_size <= self.target_size <= self.max_size:
            raise ConfigError(f"cohort sizes must satisfy 3 <= min_size ({self.min_size}) <= "
                              f"target_size ({self.target_size}) <= max_size ({self.max_size}):"
                              " each site splits its secrets among at least two others, and a "
                              "sum of two sites tells each the other's update")
        for name in ("deadline_s", "phase_deadline_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"cohort.{name}={value} must be a positive number of seconds")
        if self.ring_bits not in RING_BITS:
            raise ConfigError(f"cohort.ring_bits={self.ring_bits} must be one of {RING_BITS}")
        if not 0 <= self.dropout_rate < 0.5:
            raise ConfigError(f"cohort.dropout_rate={self.dropout_rate} must be in [0, 0.5)")
        if not isinstance(self.secure_aggregation, bool):
            raise ConfigError(f"cohort.secure_aggregation={self.secure_aggregation!r} must be "
                              "true or false (a TOML/JSON boolean, not a string)")


@dataclass(frozen=True)
class PrivacyPolicy:
    """DP-FedAvg as docs/design.md "Differential privacy" describes. Noise is never off: a round
    without noise has no finite epsilon, so the ledger could not record what it spent.
    `fixed_point_clip` bounds each coordinate of a site's whole clipped sum (up to its
    units x clip_norm); `unit_uses` is how often one unit's contribution may enter a sum."""

    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    noise_mode: str = "distributed"
    privacy_unit: str = "session"
    epsilon_budget: float = 10.0
    delta: float = 1e-5
    accountant: str = "rdp"
    unit_uses: int = 1
    fixed_point_clip: float = 4.0
    server_learning_rate: float = 1.0
    # The privacy units a round sums at which server_learning_rate was tuned: a round summing
    # U more steps this / U as far (aggregation.merge.cohort_step). None: never scaled.
    server_step_units: int | None = None
    # K: the most rounds one privacy unit may enter over the fleet's life; epsilon_budget is
    # then per unit over K rounds (docs/privacy-budget.md). None: no cap, every round composes.
    participation_cap: int | None = None

    def __post_init__(self) -> None:
        for name in ("clip_norm", "noise_multiplier", "epsilon_budget", "fixed_point_clip",
                     "server_learning_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"privacy.{name}={value!r} must be a finite number > 0")
        if self.noise_mode not in ("distributed", "central", "local"):
            raise ConfigError(f"privacy.noise_mode={self.noise_mode!r} must be distributed, "
                              "central or local")
        if self.privacy_unit not in PRIVACY_UNITS:
            raise ConfigError(f"privacy.privacy_unit={self.privacy_unit!r} must be session, "
                              "user or site")
        if not 0 < self.delta < 1:
            raise ConfigError(f"privacy.delta={self.delta} must be in (0, 1)")
        if self.accountant not in ("rdp", "pld"):
            raise ConfigError(f"privacy.accountant={self.accountant!r} must be rdp or pld")
        if self.unit_uses < 1:
            raise ConfigError(f"privacy.unit_uses={self.unit_uses} must be >= 1")
        if self.server_step_units is not None and (
                isinstance(self.server_step_units, bool)
                or not isinstance(self.server_step_units, int) or self.server_step_units < 1):
            raise ConfigError(f"privacy.server_step_units={self.server_step_units!r} must be a "
                              "whole number of privacy units >= 1 (or absent: no scaling)")
        if self.participation_cap is not None:
            try:
                ParticipationCap(self.participation_cap)
            except ValueError as error:
                raise ConfigError(f"privacy.participation_cap: {error}") from None


@dataclass(frozen=True)
class TlsPaths:
    """The aggregator's certificate and key, and the fleet CA that signs site certificates."""

    certificate: Path
    private_key: Path
    ca_certificate: Path


# For development without a config file: the committed toy model's MLPs (sim/toy_model,
# Llama, hidden 128, intermediate 512, 2 layers), as `fleetmind server adapter --model
# sim/toy_model` writes them with its defaults, so a bare `fleetmind server run --insecure
# --data DIR` and a site on the toy model complete a round. Hard-coded because the server
# never imports the client; tests/integration/test_models_wiring.py checks it against the
# model folder.
TOY_MODEL_SHA256 = "6d1019f7feafdace8177de6d61e066475ded7276c5d1da170e061d008d2a6f1b"
DEV_ADAPTER = AdapterSpec(
    base_model_id="toy_model", base_model_sha256=TOY_MODEL_SHA256,
    modules=tuple(TargetModule(f"model.layers.{layer}.mlp.{name}", *shape)
                  for layer in (0, 1)
                  for name, shape in (("gate_proj", (128, 512)), ("up_proj", (128, 512)),
                                      ("down_proj", (512, 128)))),
    frozen_a_seed=0, rank=DEFAULT_RANK, alpha=DEFAULT_ALPHA)


@dataclass(frozen=True)
class ServerConfig:
    data_dir: Path
    listen: str = "127.0.0.1:0"
    insecure: bool = False
    tls: TlsPaths | None = None
    cohort: CohortPolicy = field(default_factory=CohortPolicy)
    privacy: PrivacyPolicy = field(default_factory=PrivacyPolicy)
    adapter: AdapterSpec = DEV_ADAPTER
    max_workers: int = 256  # each open JoinRound / Watch stream holds a worker thread
    # Plain HTTP and unauthenticated, like every Prometheus target: it carries counts and
    # timings, never updates or keys. Bind it where only the scraper can reach it.
    metrics_listen: str | None = None
    # What the server takes on at once ([limits], server/limits.py); serve() uses these
    # unless it is handed its own.
    limits: ServerLimits = field(default_factory=ServerLimits)

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        host, port = split_listen(self.listen)
        if self.metrics_listen is not None:
            if not isinstance(self.metrics_listen, str):
                raise ConfigError(f"metrics_listen={self.metrics_listen!r} must be a "
                                  "\"host:port\" string, e.g. \"0.0.0.0:9464\"")
            metrics_host, metrics_port = split_listen(self.metrics_listen, "metrics_listen")
            if metrics_port and metrics_port == port and metrics_host == host:
                raise ConfigError(f"metrics_listen={self.metrics_listen!r} is the gRPC "
                                  f"address (listen={self.listen!r}): give metrics a port "
                                  "of its own, e.g. 9464")
        if self.insecure and self.tls is not None:
            raise ConfigError("both insecure and tls are set: pick one (tls for any real "
                              "deployment)")
        if self.insecure and not is_loopback(host):
            raise ConfigError(f"plaintext refused on {self.listen}: --insecure only binds a "
                              "loopback address (127.0.0.1, ::1, localhost); configure tls "
                              "to listen elsewhere")
        if not self.cohort.secure_aggregation and not is_loopback(host):
            raise ConfigError(f"cohort.secure_aggregation=false refused on listen="
                              f"{self.listen!r}: without secure aggregation the aggregator "
                              "sees every site's update, so this ablation only listens on a "
                              "loopback address (127.0.0.1, ::1, localhost); listen there, "
                              "or set cohort.secure_aggregation = true (the default)")
        if not self.insecure and self.tls is None:
            raise ConfigError("no tls configured: give [tls] certificate, private_key and "
                              "ca_certificate (see `fleetmind server certs`), or --insecure "
                              "on a loopback address for development")
        if self.max_workers < 4:
            raise ConfigError(f"max_workers={self.max_workers} must be >= 4")


def split_listen(listen: str, key: str = "listen") -> tuple[str, int]:
    """(host, port) of "host:port" or "[v6]:port" (port 0: the OS picks one); `key` names
    the setting in errors."""
    return split_host_port(listen, key)


def _section(raw: dict[str, Any], name: str, cls: type) -> Any:
    values = raw.get(name, {})
    if not isinstance(values, dict):
        raise ConfigError(f"[{name}] must be a table of keys")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"[{name}] has unknown keys {unknown}; known: {sorted(known)}")
    try:
        return cls(**values)
    except TypeError as error:
        raise ConfigError(f"[{name}]: {error}") from None


def adapter_from_table(raw: Any, source: str = "[adapter]") -> AdapterSpec:
    """The genesis AdapterSpec of an [adapter] table (fan_in_fan_out included)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} must be a table of keys")
    values = dict(raw)
    known = {f.name for f in fields(AdapterSpec)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{source} has unknown keys {unknown}; known: {sorted(known)}")
    try:
        values["modules"] = tuple(TargetModule(**m) for m in values.get("modules", ()))
        return AdapterSpec(**values)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{source}: {error}") from None


def _adapter_file(value: Any, base: Path) -> AdapterSpec:
    """The [adapter] table of the file `adapter_file` names (as `fleetmind server adapter`
    writes it: TOML, or JSON with an "adapter" object), relative to the config file."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"adapter_file={value!r} must be a path (a string), e.g. "
                          "\"adapter.toml\" as `fleetmind server adapter --out` wrote it")
    path = base / Path(value).expanduser()
    try:
        document = read_document(path)
    except ConfigError as error:
        raise ConfigError(f"adapter_file={value!r}: {error}; write it with `fleetmind "
                          "server adapter --model DIR --out FILE`") from None
    if "adapter" not in document:
        raise ConfigError(f"adapter_file={value!r}: {path} has no [adapter] table")
    return adapter_from_table(document["adapter"], f"[adapter] of {path}")


def parse_config(raw: dict[str, Any], base: Path) -> ServerConfig:
    """A ServerConfig from a parsed TOML/JSON document; relative paths are against `base`."""
    known = {"listen", "data_dir", "insecure", "tls", "cohort", "privacy", "adapter",
             "adapter_file", "max_workers", "metrics_listen", "limits"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown keys {unknown}; known: {sorted(known)}")
    if "adapter" in raw and "adapter_file" in raw:
        raise ConfigError("both [adapter] and adapter_file are given: keep one (adapter_file, "
                          "as `fleetmind server adapter` wrote it, or the table itself)")
    if "data_dir" not in raw:
        raise ConfigError("data_dir is missing: name the folder for versions, ledger and "
                          "enrolments")

    def path(value: Any) -> Path:
        return base / Path(str(value)).expanduser()

    tls = None
    if "tls" in raw:
        section = raw["tls"]
        missing = sorted({"certificate", "private_key", "ca_certificate"} - set(section))
        if missing:
            raise ConfigError(f"[tls] is missing {missing}")
        tls = TlsPaths(path(section["certificate"]), path(section["private_key"]),
                       path(section["ca_certificate"]))
    if not isinstance(raw.get("limits", {}), dict):
        raise ConfigError("[limits] must be a table of keys")
    try:
        limits = ServerLimits(**raw.get("limits", {}))
    except (TypeError, ValueError) as error:
        raise ConfigError(f"[limits]: {error}; see server/limits.py for the keys") from None
    if "adapter_file" in raw:
        adapter = _adapter_file(raw["adapter_file"], base)
    elif "adapter" in raw:
        adapter = adapter_from_table(raw["adapter"])
    else:
        adapter = DEV_ADAPTER
    try:
        return ServerConfig(
            data_dir=path(raw["data_dir"]), listen=str(raw.get("listen", "127.0.0.1:0")),
            insecure=bool(raw.get("insecure", False)), tls=tls,
            cohort=_section(raw, "cohort", CohortPolicy),
            privacy=_section(raw, "privacy", PrivacyPolicy),
            adapter=adapter,
            max_workers=int(raw.get("max_workers", 256)),
            metrics_listen=raw.get("metrics_listen"), limits=limits)
    except ConfigError:
        raise
    except ValueError as error:
        raise ConfigError(str(error)) from None


def load_config(path: Path) -> ServerConfig:
    """Reads a .toml or .json config file; FLEETMIND_<KEY> and FLEETMIND_<TABLE>__<KEY> in
    the environment override what it says (fleetmind.runtime.config)."""
    path = Path(path)
    tables = {"tls": dataclass_types(TlsPaths), "cohort": dataclass_types(CohortPolicy),
              "privacy": dataclass_types(PrivacyPolicy),
              "limits": dataclass_types(ServerLimits)}
    types = {**dataclass_types(ServerConfig), "adapter_file": "str"}
    return parse_config(load_document(path, types, tables), path.parent)
