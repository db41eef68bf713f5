"""Telling a serving endpoint (vLLM, or fleetmind's own client/serve/) to load a version the
site just activated."""

from __future__ import annotations

import json
import logging
from pathlib import Path

__all__ = ["notify_serving"]

log = logging.getLogger(__name__)


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
