"""`ServeConfig`: every setting of `fleetmind client serve`, validated once, at the edge.

Read from the command line (quick start) or from the site's config file: the site's
`data_dir` (the session store and the versions live there) and `model_dir`, plus an
optional `[serve]` table with the settings below.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from fleetmind.client.model import check_device, dtype_name
from fleetmind.client.site_config import SERVE_TABLE
from fleetmind.client.store import MAX_SESSION_BYTES, TOOL_SETTINGS


class ServeConfigError(ValueError):
    """A setting of `client serve` is wrong; the message names it and its value."""


def split_listen(address: str) -> tuple[str, int]:
    """"HOST:PORT" (IPv6 as [::1]:PORT) into its parts; port 0 means any free one."""
    host, _, port = str(address).rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ServeConfigError(f"listen={address!r} must be HOST:PORT (e.g. 127.0.0.1:8000; "
                               "port 0: any free one)")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class ServeConfig:
    """One site endpoint's settings.

    Where: `data_dir` holds the session store (sessions.db) and the site's versions
    (versions/, current); `model_dir` the base model (embedded mode). `upstream` (a base
    URL like http://127.0.0.1:8001) switches to proxy mode: requests go there under the
    active adapter's name, `upstream_model` being the base model's name upstream (asked
    from its /v1/models when left out). `served_model_name` is the one name clients use.

    Limits: `max_concurrency` requests in flight (more get 429), `max_request_bytes` per
    request body (more get 413), `max_tokens` the completion length when a request sets
    none, and the most it may ask for. `keep_adapters`: adapters kept loaded (the active
    one and the ones before it, while requests still use them).

    Capture: `capture` is the site-wide switch; `user_header` names the header that says
    who the end user is when the request's `user` field does not; `conversation_header`
    the one that carries a conversation id (the request's metadata.conversation_id does
    too); `ttl_s` deletes stored sessions older than that; `tools` keeps or drops tool
    turns; `max_session_bytes` caps one session."""

    data_dir: Path | None = None
    model_dir: Path | None = None
    listen: str = "127.0.0.1:8000"
    served_model_name: str = "fleetmind"
    device: str = "auto"
    dtype: str = "float32"
    upstream: str | None = None
    upstream_model: str | None = None
    upstream_api_key: str | None = None
    upstream_timeout_s: float = 600.0
    keep_adapters: int = 2
    runtime_lora: bool = False
    max_concurrency: int = 16
    max_request_bytes: int = 1 << 20
    max_tokens: int = 256
    capture: bool = True
    user_header: str | None = "x-fleetmind-user"
    conversation_header: str = "x-fleetmind-conversation"
    ttl_s: float | None = None
    tools: str = "keep"
    max_session_bytes: int = MAX_SESSION_BYTES

    def __post_init__(self) -> None:
        for name in ("data_dir", "model_dir"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        split_listen(self.listen)
        if not isinstance(self.served_model_name, str) or not self.served_model_name.strip():
            raise ServeConfigError("served_model_name is empty: give the name clients use")
        if self.upstream is None:
            if self.model_dir is None or not (self.model_dir / "config.json").is_file():
                raise ServeConfigError(f"model_dir={self.model_dir}: no config.json; pass the "
                                       "local Hugging Face folder of the site's base model, or "
                                       "upstream=URL for proxy mode")
        elif not isinstance(self.upstream, str) or not self.upstream.startswith(
                ("http://", "https://")):
            raise ServeConfigError(f"upstream={self.upstream!r}: give the upstream server's "
                                   "base URL, e.g. http://127.0.0.1:8001 (vLLM)")
        try:
            if self.device != "auto":  # auto: a GPU when one is present, else the CPU
                check_device(self.device)
            object.__setattr__(self, "dtype", dtype_name(self.dtype))
        except ValueError as error:
            raise ServeConfigError(str(error)) from None
        for name in ("keep_adapters", "max_concurrency", "max_request_bytes", "max_tokens",
                     "max_session_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ServeConfigError(f"{name}={value!r} must be an integer >= 1")
        for name in ("upstream_timeout_s", "ttl_s"):
            value = getattr(self, name)
            if value is None and name == "ttl_s":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not math.isfinite(value) or value <= 0:
                raise ServeConfigError(f"{name}={value!r} must be a finite number > 0")
        if self.tools not in TOOL_SETTINGS:
            raise ServeConfigError(f"tools={self.tools!r}: use one of {', '.join(TOOL_SETTINGS)}")
        for name in ("capture", "runtime_lora"):
            if not isinstance(getattr(self, name), bool):
                raise ServeConfigError(f"{name}={getattr(self, name)!r} must be true or false")
        for name in ("user_header", "conversation_header"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()
                                      or not value.isascii() or " " in value):
                raise ServeConfigError(f"{name}={value!r} must be an HTTP header name")

    @property
    def proxy(self) -> bool:
        return self.upstream is not None

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], base: Path = Path("."),
                     **overrides: Any) -> ServeConfig:
        """From a site config document: its `data_dir` and `model_dir`, and its `[serve]`
        table; the site's other settings (the agent's) are not this command's. Relative
        paths are relative to `base`; `overrides` (from the command line) win."""
        table = raw.get(SERVE_TABLE, {})
        if not isinstance(table, Mapping):
            raise ServeConfigError("serve must be a table of settings")
        known = {f.name for f in fields(cls)} - {"data_dir", "model_dir"}
        unknown = sorted(set(table) - known)
        if unknown:
            raise ServeConfigError(f"unknown [serve] setting(s) {unknown}; known: "
                                   f"{sorted(known)}")
        values: dict[str, Any] = dict(table)
        for name in ("data_dir", "model_dir"):
            if raw.get(name) is not None:
                path = Path(str(raw[name]))
                values[name] = path if path.is_absolute() else base / path
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except TypeError as error:
            raise ServeConfigError(str(error)) from None

    @classmethod
    def load(cls, path: Path, **overrides: Any) -> ServeConfig:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except OSError as error:
            raise ServeConfigError(f"cannot read {path}: {error.strerror}") from None
        except tomllib.TOMLDecodeError as error:
            raise ServeConfigError(f"{path}: not valid TOML ({error})") from None
        return cls.from_mapping(raw, path.parent, **overrides)

    def but(self, **changes: Any) -> ServeConfig:
        return replace(self, **changes)
