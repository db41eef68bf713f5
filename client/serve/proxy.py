"""Proxy mode: the site's active version served by an upstream OpenAI-compatible server
(vLLM, or anything that speaks the API), for sites that already serve.

Each request goes upstream under the active version's adapter name (`<served name>-v<8
digits>`; the base model's name before the first activation) and comes back under the one
stable served name, so clients never change theirs. A new version is loaded upstream with
`POST /v1/load_lora_adapter` (vLLM's runtime LoRA API: VLLM_ALLOW_RUNTIME_LORA_UPDATING=True
and --enable-lora) the first time a request needs it, and a superseded one unloaded with
`POST /v1/unload_lora_adapter` once no request in flight uses it and it is not among the
`keep_adapters` newest. The adapter's folder must be readable by the upstream at the same
path (the same machine, or a shared volume mounted at the same place).

A request the upstream refuses keeps the upstream's status and message (4xx); one it fails
or never answers is a 502/504. Either way nothing is captured.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from fleetmind.client.serve.active import ActiveVersions, Served
from fleetmind.client.serve.metrics import ServeMetrics
from fleetmind.client.serve.protocol import ApiError, ChatRequest, fingerprint
from fleetmind.client.serve.settings import ServeConfig


class ProxyEngine:
    """Forwards to `config.upstream` under the active adapter's name."""

    kind = "proxy"

    def __init__(self, config: ServeConfig, metrics: ServeMetrics,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config, self.metrics = config, metrics
        self.versions = ActiveVersions(config.data_dir, config.keep_adapters,
                                       lambda n: f"{config.served_model_name}-v{n:08d}")
        headers = {"authorization": f"Bearer {config.upstream_api_key}"} \
            if config.upstream_api_key else {}
        # No read timeout beyond the configured one: a long generation is not a failure.
        self._client = httpx.AsyncClient(
            base_url=str(config.upstream).rstrip("/"), headers=headers, transport=transport,
            timeout=httpx.Timeout(config.upstream_timeout_s, connect=10.0),
            limits=httpx.Limits(max_connections=config.max_concurrency + 4,
                                max_keepalive_connections=config.max_concurrency + 4))
        self._load_lock = asyncio.Lock()
        self._evictions: set[asyncio.Task] = set()
        self.base_model = config.upstream_model
        self.ready = False

    async def start(self) -> None:
        with contextlib.suppress(ApiError):  # not ready yet: /ready says so, and the next
            await self._check_upstream()     # request tries again

    async def _check_upstream(self) -> None:
        reply = await self._call("GET", "/v1/models")
        if self.base_model is None:
            try:
                self.base_model = reply.json()["data"][0]["id"]
            except (ValueError, KeyError, IndexError, TypeError):
                raise ApiError(502, f"the upstream {self.config.upstream} lists no model at "
                                    "/v1/models; set upstream_model", type="upstream_error",
                               code="upstream_error") from None
        self.ready = True

    async def close(self) -> None:
        self.ready = False
        await self._client.aclose()

    def model_names(self) -> list[str]:
        return [self.config.served_model_name]

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            reply = await self._client.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise ApiError(504, f"the upstream {self.config.upstream} did not answer within "
                                f"{self.config.upstream_timeout_s:g} s", type="upstream_error",
                           code="upstream_timeout") from None
        except httpx.HTTPError as error:
            raise ApiError(502, f"the upstream {self.config.upstream} cannot be reached "
                                f"({type(error).__name__}: {error})", type="upstream_error",
                           code="upstream_unreachable") from None
        return reply

    # -- versions ------------------------------------------------------------------------------

    @asynccontextmanager
    async def serving(self, model: str) -> AsyncIterator[Served]:
        if model != self.config.served_model_name:
            raise ApiError(404, f"model {model!r} is not served here: use "
                                f"{self.config.served_model_name!r} (the site's active "
                                "version, whichever it is)", param="model",
                           code="model_not_found")
        if not self.ready:
            await self._check_upstream()
        served = self.versions.current()
        if served.adapter is not None and not self.versions.is_loaded(served.adapter):
            async with self._load_lock:
                if not self.versions.is_loaded(served.adapter):
                    await self._load(served)
        self.metrics.version.set(-1 if served.version is None else served.version)
        with self.versions.pin(served):
            yield served
        # Unloading waits for nobody: the response is not held for it.
        task = asyncio.get_running_loop().create_task(self.evict())
        self._evictions.add(task)
        task.add_done_callback(self._evictions.discard)

    async def _load(self, served: Served) -> None:
        if served.adapter is None or served.folder is None:
            return  # the base model: always there
        reply = await self._call("POST", "/v1/load_lora_adapter", json={
            "lora_name": served.adapter, "lora_path": str(served.folder.resolve())})
        # vLLM answers 400 "...has already been loaded" after our own restart: that is fine.
        if reply.status_code != 200 and "already been loaded" not in reply.text:
            raise ApiError(502, f"the upstream refused to load version {served.version} as "
                                f"{served.adapter} ({reply.status_code}: {reply.text[:300]}); "
                                "start vLLM with --enable-lora and "
                                "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, and make "
                                f"{served.folder} readable to it at that path",
                           type="upstream_error", code="adapter_load_failed")
        self.versions.loaded(served.adapter)
        self.metrics.adapter_loads.inc()

    async def evict(self) -> None:
        for name in self.versions.superseded():
            async with self._load_lock:
                if name not in self.versions.superseded():
                    continue
                try:
                    reply = await self._call("POST", "/v1/unload_lora_adapter",
                                             json={"lora_name": name})
                except ApiError:
                    return  # the upstream is away: try again after the next request
                if reply.status_code not in (200, 404):
                    return
                self.versions.unloaded(name)
                self.metrics.adapter_unloads.inc()

    # -- requests ------------------------------------------------------------------------------

    def _body(self, request: ChatRequest, served: Served, stream: bool) -> dict[str, Any]:
        body = dict(request.body)
        body["model"] = served.adapter or self.base_model
        # The site's own fields: who the user is and whether to store stay here.
        for key in ("store", "metadata"):
            body.pop(key, None)
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    def _refusal(self, reply: httpx.Response) -> ApiError:
        try:
            error = reply.json()["error"]
            message = error.get("message") or reply.text
        except (ValueError, KeyError, TypeError, AttributeError):
            message = reply.text
        if 400 <= reply.status_code < 500 and reply.status_code != 404:
            return ApiError(reply.status_code, f"the upstream refused the request: "
                                               f"{message[:500]}", code="upstream_refused")
        return ApiError(502, f"the upstream failed the request ({reply.status_code}: "
                             f"{message[:500]})", type="upstream_error", code="upstream_error")

    def _restamp(self, obj: dict[str, Any], served: Served) -> dict[str, Any]:
        obj["model"] = self.config.served_model_name
        obj["system_fingerprint"] = fingerprint(served.version)
        return obj

    async def _lost(self, reply: httpx.Response, served: Served) -> bool:
        """True when the upstream no longer knows our adapter (it restarted) and loaded it
        again: the caller retries once."""
        if reply.status_code != 404 or served.adapter is None:
            return False
        self.versions.unloaded(served.adapter)
        async with self._load_lock:
            if not self.versions.is_loaded(served.adapter):
                await self._load(served)
        return True

    async def complete(self, request: ChatRequest, served: Served) -> dict[str, Any]:
        body = self._body(request, served, stream=False)
        reply = await self._call("POST", "/v1/chat/completions", json=body)
        if await self._lost(reply, served):
            reply = await self._call("POST", "/v1/chat/completions", json=body)
        if reply.status_code != 200:
            raise self._refusal(reply)
        try:
            completion = reply.json()
            completion["choices"][0]["message"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ApiError(502, "the upstream's answer is not a chat completion",
                           type="upstream_error", code="upstream_error") from None
        return self._restamp(completion, served)

    async def stream(self, request: ChatRequest, served: Served
                     ) -> AsyncIterator[dict[str, Any]]:
        body = self._body(request, served, stream=True)
        for attempt in (1, 2):
            async for chunk in self._stream_once(request, served, body, retry=attempt == 1):
                if chunk is None:  # the upstream had lost the adapter; it is loaded again
                    break
                yield chunk
            else:
                return

    async def _stream_once(self, request: ChatRequest, served: Served, body: dict[str, Any],
                           retry: bool) -> AsyncIterator[dict[str, Any] | None]:
        try:
            async with self._client.stream("POST", "/v1/chat/completions", json=body) as reply:
                if reply.status_code != 200:
                    await reply.aread()
                    if retry and await self._lost(reply, served):
                        yield None
                        return
                    raise self._refusal(reply)
                async for line in reply.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise ApiError(502, f"the upstream failed mid-stream: "
                                            f"{chunk['error']}", type="upstream_error",
                                       code="upstream_error")
                    if chunk.get("usage") and not chunk.get("choices") \
                            and not request.include_usage:
                        continue
                    if not request.include_usage:
                        chunk.pop("usage", None)
                    yield self._restamp(chunk, served)
        except httpx.TimeoutException:
            raise ApiError(504, "the upstream stopped answering mid-stream",
                           type="upstream_error", code="upstream_timeout") from None
        except (httpx.HTTPError, json.JSONDecodeError) as error:
            raise ApiError(502, f"the upstream stream broke ({type(error).__name__})",
                           type="upstream_error", code="upstream_error") from None
