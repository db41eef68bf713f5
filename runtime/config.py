"""Loading a config file: one reader for TOML and JSON, one error type, environment
overrides. The settings themselves (what is known, what is valid) belong to each side's
config dataclass (client/site_config.py, server/config.py).

    raw = load_document(path, dataclass_types(SiteConfig), {"tls": dataclass_types(SiteTls)})

A file is TOML when it ends in .toml and JSON when it ends in .json; anything else is
refused rather than guessed. Then each known setting may be overridden from the
environment: FLEETMIND_<KEY> for a top-level key (FLEETMIND_DATA_DIR), and
FLEETMIND_<TABLE>__<KEY> for a key of a table (FLEETMIND_PRIVACY__CLIP_NORM). A setting
whose type names str or Path takes the variable's text as is; any other is read as a TOML
value (true, 8, 0.5, ["a", "b"]). Only known settings are looked up, so unrelated
FLEETMIND_* variables (FLEETMIND_CACHE) are left alone. The environment wins over the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["ENV_PREFIX", "ConfigError", "apply_env", "dataclass_types", "env_name",
           "load_document", "read_document"]

ENV_PREFIX = "FLEETMIND_"
_FORMATS = {".toml": "TOML", ".json": "JSON"}


class ConfigError(ValueError):
    """A configuration is unusable; the message names the setting, the value and the fix."""


def read_document(path: Path) -> dict[str, Any]:
    """The top-level table of a .toml or .json file. Raises ConfigError naming the file."""
    path = Path(path)
    kind = _FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ConfigError(f"{path}: name the config file .toml or .json (its ending says how "
                          "to read it)")
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"cannot read config {path}: {error.strerror or error}") from None
    try:
        raw = tomllib.loads(text) if kind == "TOML" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path} is not valid {kind}: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a table of settings")
    return raw


def dataclass_types(cls: type) -> dict[str, str]:
    """Setting name -> its type as written (`str | None`, `Path`, `int`), for `apply_env`."""
    return {f.name: f.type if isinstance(f.type, str) else getattr(f.type, "__name__",
                                                                   str(f.type))
            for f in dataclasses.fields(cls)}


def env_name(*keys: str, prefix: str = ENV_PREFIX) -> str:
    """The variable that overrides `keys` (a top-level key, or a table and its key)."""
    return prefix + "__".join(key.upper() for key in keys)


def apply_env(raw: Mapping[str, Any], types: Mapping[str, str],
              tables: Mapping[str, Mapping[str, str]] | None = None,
              environ: Mapping[str, str] | None = None,
              prefix: str = ENV_PREFIX) -> dict[str, Any]:
    """`raw` with every setting in `types` (top level) and `tables` (table -> its settings)
    that the environment names replaced by the environment's value. `raw` is not changed."""
    environ = os.environ if environ is None else environ
    merged = dict(raw)
    for key, annotation in types.items():
        if key in (tables or {}):
            continue
        name = env_name(key, prefix=prefix)
        if name in environ:
            merged[key] = _value(environ[name], annotation)
    for table, settings in (tables or {}).items():
        for key, annotation in settings.items():
            name = env_name(table, key, prefix=prefix)
            if name not in environ:
                continue
            section = merged.get(table, {})
            if not isinstance(section, Mapping):
                raise ConfigError(f"{name} overrides {table}.{key}, but {table} in the file is "
                                  "not a table")
            merged[table] = {**section, key: _value(environ[name], annotation)}
    return merged


def load_document(path: Path, types: Mapping[str, str] | None = None,
                  tables: Mapping[str, Mapping[str, str]] | None = None,
                  environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """`read_document(path)` with the environment's overrides of the known settings."""
    raw = read_document(path)
    return apply_env(raw, types or {}, tables, environ)


def _value(text: str, annotation: str) -> Any:
    if "str" in annotation or "Path" in annotation:
        return text
    try:
        value = tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text  # the setting's own check names what it wanted
    return value if isinstance(value, bool | int | float | str | list | dict) else text
