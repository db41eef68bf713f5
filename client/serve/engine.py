"""The embedded engine: the site's active version on the local model, in this process.

transformers loads the base model once (client/model.py, the one loading path); each
version is a PEFT adapter loaded beside it under its own name, and every forward pass names
the adapter it runs with (PEFT's `adapter_names`), so requests on different versions share
one model and a request in flight keeps its version while new ones get the next. Forward
passes run one at a time under a lock, token by token, so concurrent requests interleave
at token granularity (and an adapter loads or unloads between two passes, never during
one). Plain greedy or temperature/top-p sampling with a KV cache: no generation framework
to hide which adapter ran.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio

from fleetmind.client.serve.active import ActiveVersions, Served
from fleetmind.client.serve.metrics import ServeMetrics
from fleetmind.client.serve.protocol import (
    ApiError,
    ChatRequest,
    chunk_object,
    completion_object,
    fingerprint,
    new_id,
    usage_object,
)
from fleetmind.client.serve.settings import ServeConfig

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in adapter_names


def version_adapter(number: int) -> str:
    return f"v{number:08d}"


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class _Decoding:
    """One request's generation: the prompt, the tokens so far, the KV cache. `step` runs
    one forward pass (under the engine's lock) and picks the next token."""

    def __init__(self, engine: EmbeddedEngine, prompt: list[int], adapter: str | None,
                 request: ChatRequest, max_new: int) -> None:
        import torch

        self.engine, self.prompt, self.adapter, self.request = engine, prompt, adapter, request
        self.max_new = max_new
        self.generated: list[int] = []
        self.finish: str | None = None
        self.text = ""
        self._past: Any = None
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(request.seed if request.seed is not None
                                    else random.getrandbits(63))

    def step(self) -> None:
        import torch

        engine = self.engine
        feed = self.prompt if self._past is None else self.generated[-1:]
        ids = torch.tensor([feed], device=engine.device)
        with engine.lock, torch.no_grad():
            kwargs = {}
            if engine.peft is not None:
                kwargs["adapter_names"] = [self.adapter or BASE_ADAPTER]
            elif self.adapter is not None:
                raise RuntimeError(f"adapter {self.adapter} is not loaded")
            out = (engine.peft or engine.model)(input_ids=ids, cache=self._past,
                                                use_cache=True, logits_to_keep=1, **kwargs)
        self._past = out.cache
        token = self._pick(out.logits[0, -1].float().cpu())
        if token in engine.ends:
            self.finish = "stop"
            return
        self.generated.append(token)
        self.text = engine.tokenizer.decode(self.generated, skip_special_tokens=True)
        for stop in self.request.stop:
            at = self.text.find(stop)
            if at >= 0:
                self.text, self.finish = self.text[:at], "stop"
                return
        if len(self.generated) >= self.max_new:
            self.finish = "length"

    def _pick(self, logits: Any) -> int:
        import torch

        if self.request.temperature == 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / self.request.temperature, dim=-1)
        if self.request.top_p < 1:
            ordered, order = torch.sort(probs, descending=True)
            outside = torch.cumsum(ordered, dim=-1) - ordered > self.request.top_p
            ordered[outside] = 0
            probs = torch.zeros_like(probs).scatter(0, order, ordered)
        return int(torch.multinomial(probs, 1, generator=self._generator))

    def run(self) -> None:
        while self.finish is None:
            self.step()

    def safe_text(self) -> str:
        """The text that can be sent now: not a half-decoded character, nor what may yet
        turn out to be the start of a stop string."""
        text = self.text.rstrip("\ufffd")
        if self.finish is None and self.request.stop:
            hold = max(len(stop) for stop in self.request.stop) - 1
            text = text[:max(0, len(text) - hold)]
        return text

    def usage(self) -> dict[str, int]:
        return usage_object(len(self.prompt), len(self.generated))


class EmbeddedEngine:
    """Serves the site's active version on a local causal LM."""

    kind = "embedded"

    def __init__(self, config: ServeConfig, metrics: ServeMetrics) -> None:
        self.config, self.metrics = config, metrics
        self.versions = ActiveVersions(config.data_dir, config.keep_adapters, version_adapter)
        self.lock = threading.Lock()
        self._load_lock = asyncio.Lock()
        self._evictions: set[asyncio.Task] = set()
        self._named: dict[str, Path] = {}  # loaded through /v1/load_lora_adapter
        self.model: Any = None
        self.peft: Any = None
        self.tokenizer: Any = None
        self.device = "cpu"
        self.ends: set[int] = set()
        self.context = 0
        self.ready = False

    async def start(self) -> None:
        from fleetmind.client.model import context_length, load_model
        from fleetmind.client.tokens import turn_end_ids

        if self.config.model_dir is None:
            raise ValueError("the embedded engine needs model_dir")
        self.device = resolve_device(self.config.device)
        self.model, self.tokenizer = await anyio.to_thread.run_sync(
            load_model, Path(self.config.model_dir), self.config.dtype, self.device)
        self.ends = turn_end_ids(self.tokenizer)
        self.context = context_length(self.model.config)
        await self._resolve(self.config.served_model_name)  # the active version, up front
        self.ready = True

    async def close(self) -> None:
        self.ready = False

    def model_names(self) -> list[str]:
        return [self.config.served_model_name, *self._named]

    # -- versions ----------------------------------------------------------------------------

    @asynccontextmanager
    async def serving(self, model: str) -> AsyncIterator[Served]:
        """The version (or named adapter) a request for `model` gets, held loaded until the
        block ends; superseded adapters are unloaded once free."""
        served = await self._resolve(model)
        with self.versions.pin(served):
            yield served
        # Unloading waits for nobody: the response is not held for it.
        task = asyncio.get_running_loop().create_task(self.evict())
        self._evictions.add(task)
        task.add_done_callback(self._evictions.discard)

    async def _resolve(self, model: str) -> Served:
        if model in self._named:
            return Served(None, model, self._named[model])
        if model != self.config.served_model_name:
            raise ApiError(404, f"model {model!r} is not served here: use "
                                f"{self.config.served_model_name!r} (the site's active "
                                "version, whichever it is)", param="model",
                           code="model_not_found")
        served = self.versions.current()
        if served.adapter is not None and served.folder is not None \
                and not self.versions.is_loaded(served.adapter):
            async with self._load_lock:
                if not self.versions.is_loaded(served.adapter):
                    try:
                        await anyio.to_thread.run_sync(self._load, served.adapter,
                                                       served.folder)
                    except (OSError, ValueError, KeyError, RuntimeError) as error:
                        raise ApiError(503, f"the active version {served.version} cannot be "
                                            f"loaded from {served.folder} ({error}); roll "
                                            "back (`fleetmind client rollback`) or fix it",
                                       type="server_error", code="version_unavailable"
                                       ) from None
                    self.versions.loaded(served.adapter)
                    self.metrics.adapter_loads.inc()
        self.metrics.version.set(-1 if served.version is None else served.version)
        return served

    def _load(self, name: str, folder: Path) -> None:
        from peft import PeftModel

        with self.lock:
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.model, folder, adapter_name=name,
                                                      is_trainable=False)
                self.peft.eval()
            else:
                self.peft.load_adapter(folder, adapter_name=name, is_trainable=False)

    def _unload(self, name: str) -> None:
        with self.lock:
            self.peft.delete_adapter(name)

    async def evict(self) -> None:
        for name in self.versions.superseded():
            async with self._load_lock:
                if name in self.versions.superseded():
                    await anyio.to_thread.run_sync(self._unload, name)
                    self.versions.unloaded(name)
                    self.metrics.adapter_unloads.inc()

    async def load_named(self, name: str, path: Path) -> None:
        """vLLM's runtime LoRA loading, for a fleetmind endpoint standing in as upstream."""
        if name == self.config.served_model_name or name in self.versions.adapters:
            raise ApiError(400, f"lora_name {name!r} is taken by this endpoint; pick another")
        if name in self._named:
            raise ApiError(400, f"The lora adapter '{name}' has already been loaded.",
                           code="already_loaded")
        if not (Path(path) / "adapter_config.json").is_file():
            raise ApiError(400, f"lora_path {str(path)!r} holds no adapter_config.json: pass a "
                                "PEFT adapter folder on this machine", param="lora_path")
        async with self._load_lock:
            await anyio.to_thread.run_sync(self._load, name, Path(path))
        self._named[name] = Path(path)
        self.metrics.adapter_loads.inc()

    async def unload_named(self, name: str) -> None:
        if name not in self._named:
            raise ApiError(404, f"The lora adapter '{name}' is not loaded.",
                           code="not_found")
        del self._named[name]  # new requests for it now get 404
        while self.versions.in_use(name):  # requests in flight finish on it first
            await asyncio.sleep(0.01)
        async with self._load_lock:
            await anyio.to_thread.run_sync(self._unload, name)
        self.metrics.adapter_unloads.inc()

    # -- generation ----------------------------------------------------------------------------

    def _decoding(self, request: ChatRequest, served: Served) -> _Decoding:
        from fleetmind.client.tokens import chat_ids

        try:
            prompt = chat_ids(self.tokenizer, request.chat(), generation=True)
        except Exception as error:  # a template that cannot render these turns
            raise ApiError(400, f"the model's chat template cannot render these messages "
                                f"({error})", param="messages") from None
        wanted = request.max_tokens or self.config.max_tokens
        if wanted > self.config.max_tokens:
            raise ApiError(400, f"max_tokens={wanted}: this endpoint generates at most "
                                f"{self.config.max_tokens} tokens per request",
                           param="max_tokens", code="invalid_value")
        room = self.context - len(prompt)
        if room < 1:
            raise ApiError(400, f"the messages are {len(prompt)} tokens; this model's context "
                                f"is {self.context} tokens: shorten them",
                           param="messages", code="context_length_exceeded")
        return _Decoding(self, prompt, served.adapter, request, min(wanted, room))

    def _fingerprint(self, served: Served) -> str:
        return f"fm-{served.adapter}" if served.version is None and served.adapter \
            else fingerprint(served.version)

    async def complete(self, request: ChatRequest, served: Served) -> dict[str, Any]:
        decoding = self._decoding(request, served)
        await anyio.to_thread.run_sync(decoding.run)
        return completion_object(new_id(), request.model, decoding.text, decoding.finish or
                                 "stop", decoding.usage(), self._fingerprint(served))

    async def stream(self, request: ChatRequest, served: Served
                     ) -> AsyncIterator[dict[str, Any]]:
        decoding = self._decoding(request, served)
        completion_id, mark = new_id(), self._fingerprint(served)
        yield chunk_object(completion_id, request.model, mark,
                           delta={"role": "assistant", "content": ""})
        sent = ""
        while decoding.finish is None:
            await anyio.to_thread.run_sync(decoding.step)
            text = decoding.safe_text()
            if len(text) > len(sent) and text.startswith(sent):
                yield chunk_object(completion_id, request.model, mark,
                                   delta={"content": text[len(sent):]})
                sent = text
        if decoding.text != sent and decoding.text.startswith(sent):
            yield chunk_object(completion_id, request.model, mark,
                               delta={"content": decoding.text[len(sent):]})
        yield chunk_object(completion_id, request.model, mark, finish_reason=decoding.finish)
        if request.include_usage:
            yield chunk_object(completion_id, request.model, mark, usage=decoding.usage())


