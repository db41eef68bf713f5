"""The Prometheus /metrics HTTP endpoint, for any CollectorRegistry (each side keeps its
own metric definitions: client/metrics.py, server/metrics.py). Plain HTTP and
unauthenticated, like every Prometheus target: bind it where only the scraper reaches it."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

from fleetmind.runtime.addresses import join_host_port, split_host_port

__all__ = ["MetricsEndpoint", "serve_registry"]


@dataclass
class MetricsEndpoint:
    """A running /metrics HTTP server; `stop()` closes its socket."""

    server: WSGIServer
    thread: threading.Thread
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{join_host_port(self.host, self.port)}/metrics"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve_registry(registry: CollectorRegistry, listen: str,
                   key: str = "metrics_listen") -> MetricsEndpoint:
    """prometheus_client's threaded HTTP server for `registry` on "host:port" (port 0: the
    OS picks one). Raises ConfigError for a malformed address and OSError naming the
    address when it cannot bind."""
    host, port = split_host_port(listen, key)
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as error:
        raise OSError(f"cannot serve metrics on {listen}: {error.strerror or error}; pick "
                      f"another {key} port (0: any free one)") from None
    return MetricsEndpoint(server, thread, host, server.server_port)
