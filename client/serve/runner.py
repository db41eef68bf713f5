"""Running the endpoint under uvicorn: in the foreground (`fleetmind client serve`), or on a
background thread with an OS-picked port (tests, the demo, the benchmark)."""

from __future__ import annotations

import threading
import time
from typing import Any

import uvicorn

from fleetmind.client.serve.app import create_app
from fleetmind.client.serve.settings import ServeConfig, split_listen


def _server(config: ServeConfig, engine: Any = None, **uvicorn_options: Any) -> uvicorn.Server:
    host, port = split_listen(config.listen)
    options = {"log_level": "warning", "access_log": False, "lifespan": "on",
               **uvicorn_options}
    return uvicorn.Server(uvicorn.Config(create_app(config, engine), host=host, port=port,
                                         **options))


def serve_forever(config: ServeConfig, **uvicorn_options: Any) -> None:
    """Serves until SIGINT/SIGTERM (uvicorn's handlers: requests in flight finish first)."""
    _server(config, log_level="info", **uvicorn_options).run()


class BackgroundServer:
    """The endpoint on a thread of this process: `with BackgroundServer(config) as s:`
    then `s.url` ("http://127.0.0.1:PORT", the port the OS picked when listen's is 0)."""

    def __init__(self, config: ServeConfig, engine: Any = None, start_timeout_s: float = 120.0
                 ) -> None:
        self.config = config
        self.server = _server(config, engine)
        # uvicorn takes SIGINT/SIGTERM only on the main thread: this one leaves them alone.
        self._thread = threading.Thread(target=self.server.run, name="fleetmind-serve",
                                        daemon=True)
        self._timeout = start_timeout_s
        self.url = ""

    @property
    def app(self) -> Any:
        return self.server.config.app

    def start(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + self._timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"the endpoint did not start on {self.config.listen} (see "
                                   "the log above: a taken port, a bad model folder?)")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"the endpoint did not start within {self._timeout:g} s")
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
