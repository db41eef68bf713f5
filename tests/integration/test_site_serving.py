"""Telling a serving endpoint (vLLM's runtime LoRA API) to load an activated version."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from fleetmind.client import site


def endpoint(status: int) -> tuple[HTTPServer, list[tuple[str, dict]]]:
    seen: list[tuple[str, dict]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers["Content-Length"])
            seen.append((self.path, json.loads(self.rfile.read(length))))
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


@pytest.mark.parametrize("status, loaded", [(200, True), (500, False)])
def test_the_adapter_folder_is_posted_to_load_lora_adapter(tmp_path: Path, status: int,
                                                           loaded: bool) -> None:
    server, seen = endpoint(status)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        assert site.notify_serving(url, "site-00-v3", tmp_path / "versions" / "3") is loaded
    finally:
        server.shutdown()
    assert seen == [("/v1/load_lora_adapter",
                     {"lora_name": "site-00-v3",
                      "lora_path": str((tmp_path / "versions" / "3").resolve())})]


def test_an_unreachable_endpoint_is_logged_not_raised(tmp_path: Path) -> None:
    server, _ = endpoint(200)
    port = server.server_address[1]
    server.shutdown()
    server.server_close()
    assert site.notify_serving(f"http://127.0.0.1:{port}", "s-v1", tmp_path, timeout=2) is False


def test_a_serving_url_that_is_not_http_is_refused(toy_model_dir, tmp_path: Path) -> None:
    with pytest.raises(site.ConfigError, match="serving_url"):
        site.SiteConfig(name="s", data_dir=tmp_path, model_dir=toy_model_dir,
                        aggregator="127.0.0.1:7443", identity_key=tmp_path / "id.key",
                        aggregator_key=bytes(32), insecure=True, serving_url="ftp://x")
