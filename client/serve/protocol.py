"""The OpenAI Chat Completions wire format, as the endpoint reads and writes it.

`ChatRequest.parse` validates a request body once, at the edge; `ApiError` is every refusal,
in OpenAI's error shape (`{"error": {"message", "type", "param", "code"}}`) so the official
clients raise their usual exceptions; the `*_object` functions build what the endpoint
sends back.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fleetmind.client.store import DEFAULT_CHAT_FORMAT, ChatFormat, Message, read_messages


class ApiError(Exception):
    """A refusal: HTTP `status` and OpenAI's error fields."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = \
            status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def _number(body: Mapping[str, Any], name: str, default: float, low: float, high: float
            ) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or not low <= value <= high:
        raise ApiError(400, f"{name}={value!r}: must be a number from {low} to {high}",
                       param=name, code="invalid_value")
    return float(value)


@dataclass(frozen=True)
class ChatRequest:
    """A validated POST /v1/chat/completions body. `body` is the request as sent (what proxy
    mode forwards); `messages` its turns read as the store reads them."""

    body: dict[str, Any]
    model: str
    messages: tuple[Message, ...]
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    user: str | None = None
    store: bool = True
    conversation_id: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, raw: bytes, fmt: ChatFormat = DEFAULT_CHAT_FORMAT) -> ChatRequest:
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ApiError(400, f"the body is not valid JSON ({error}); send a JSON object",
                           code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, f"the body is a JSON {type(body).__name__}; send an object "
                                "with 'model' and 'messages'")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "'model' is missing: name the model to use", param="model",
                           code="missing_required_parameter")
        try:
            messages, _ = read_messages(body.get("messages"), fmt)
        except ValueError as error:
            raise ApiError(400, str(error), param="messages") from None
        if not messages:
            raise ApiError(400, "'messages' hold no turn with text: send at least one",
                           param="messages")
        n = body.get("n", 1)
        if n != 1:
            raise ApiError(400, f"n={n!r}: this endpoint returns one choice; send n=1",
                           param="n", code="unsupported_value")
        stream = body.get("stream") or False
        if not isinstance(stream, bool):
            raise ApiError(400, f"stream={stream!r}: must be true or false", param="stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, Mapping):
            raise ApiError(400, "stream_options must be an object", param="stream_options")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is not None and (isinstance(max_tokens, bool)
                                       or not isinstance(max_tokens, int) or max_tokens < 1):
            raise ApiError(400, f"max_tokens={max_tokens!r}: must be an integer >= 1",
                           param="max_tokens", code="invalid_value")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ApiError(400, f"seed={seed!r}: must be an integer", param="seed")
        stop = body.get("stop") or ()
        stop = (stop,) if isinstance(stop, str) else stop
        if not isinstance(stop, list | tuple) or len(stop) > 4 or not all(
                isinstance(s, str) and s for s in stop):
            raise ApiError(400, f"stop={body.get('stop')!r}: a string or up to 4 strings",
                           param="stop")
        user = body.get("user") or body.get("safety_identifier") or None
        if user is not None and not isinstance(user, str):
            raise ApiError(400, f"user={user!r}: must be a string", param="user")
        store = body.get("store", True)
        if not isinstance(store, bool | None):
            raise ApiError(400, f"store={store!r}: must be true or false", param="store")
        metadata = body.get("metadata") or {}
        if not isinstance(metadata, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ApiError(400, "metadata must be an object of strings", param="metadata")
        return cls(body=body, model=model, messages=messages, stream=stream,
                   include_usage=bool(options.get("include_usage")), max_tokens=max_tokens,
                   temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                   top_p=_number(body, "top_p", 1.0, 0.0, 1.0), seed=seed, stop=tuple(stop),
                   user=user, store=store is not False,
                   conversation_id=metadata.get("conversation_id"), metadata=dict(metadata))

    def chat(self) -> list[dict[str, Any]]:
        """The turns as chat-template dicts."""
        return [message.as_chat() for message in self.messages]


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage_object(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_object(completion_id: str, model: str, content: str, finish_reason: str,
                      usage: dict[str, int], fingerprint: str) -> dict[str, Any]:
    return {"id": completion_id, "object": "chat.completion", "created": int(time.time()),
            "model": model, "system_fingerprint": fingerprint,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage}


def chunk_object(completion_id: str, model: str, fingerprint: str, *,
                 delta: dict[str, Any] | None = None, finish_reason: str | None = None,
                 usage: dict[str, int] | None = None) -> dict[str, Any]:
    """One `chat.completion.chunk`: a delta, the finish, or (no choices) the usage."""
    chunk: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk",
                             "created": int(time.time()), "model": model,
                             "system_fingerprint": fingerprint, "choices": []}
    if usage is not None:
        chunk["usage"] = usage
    else:
        chunk["choices"] = [{"index": 0, "delta": delta or {}, "logprobs": None,
                             "finish_reason": finish_reason}]
    return chunk


def fingerprint(version: int | None) -> str:
    """Which version served a response (`system_fingerprint`): fm-v<8 digits>, fm-base."""
    return "fm-base" if version is None else f"fm-v{version:08d}"
