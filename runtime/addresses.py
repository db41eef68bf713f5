"""host:port, parsed once for every address a setting or a flag names: the aggregator a
site dials, the aggregator's listen address, a metrics endpoint, an auditor's --server."""

from __future__ import annotations

import ipaddress

from fleetmind.runtime.config import ConfigError

__all__ = ["LOOPBACK_NAMES", "is_loopback", "join_host_port", "split_host_port"]

LOOPBACK_NAMES = ("localhost",)


def split_host_port(address: object, key: str = "address", *,
                    any_port: bool = True) -> tuple[str, int]:
    """(host, port) of "host:port" or "[v6]:port". `key` names the setting in the error;
    `any_port` allows port 0 (a listener's "the OS picks one"), which a dialled address
    never is. Raises ConfigError (a ValueError) saying what to write."""
    example = "e.g. 127.0.0.1:7443 or [::1]:7443" + (" (port 0: the OS picks one)"
                                                      if any_port else "")
    if not isinstance(address, str):
        raise ConfigError(f"{key}={address!r} must be a \"host:port\" string, {example}")
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not (port.isascii() and port.isdigit()) \
            or not (0 if any_port else 1) <= int(port) <= 65535:
        raise ConfigError(f"{key}={address!r} must be host:port, {example}")
    return host, int(port)


def join_host_port(host: str, port: int) -> str:
    """The inverse of split_host_port: an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine only (localhost, 127.0.0.0/8, ::1)."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
