"""The one place that loads a causal language model and its tokenizer from a local folder.

Toy or real (Llama, Qwen, Gemma, Phi-3, GPT-2, GPT-NeoX...), everything in fleetmind loads
models through `load_model`, so the demo and the tests exercise the same path a deployment
does. Nothing is ever fetched from a hub: `HF_HUB_OFFLINE=1` is set before transformers
loads. What else a site must know of its model lives here too: its context length and the
rule for sessions longer than it (`fit_to_context`), and the hash that names its weights
(`base_model_hash`), which a version's manifest must carry before the site activates it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fleetmind.aggregation.manifest import VersionError, base_model_digest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

DTYPES = ("float32", "float16", "bfloat16")
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
DEVICES = ("cpu", "cuda", "mps")
# The files whose bytes are the base model's weights, in the order a folder may hold them:
# safetensors (one file or shards), else PyTorch's pickles.
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
# Adapter files are not the base model, even when a folder holds one next to it.
NOT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def dtype_name(dtype: str) -> str:
    """float32, float16 or bfloat16, from those names or fp32 / fp16 / bf16."""
    name = DTYPE_ALIASES.get(dtype, dtype)
    if name not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: use one of {', '.join(DTYPES)} (or fp32, fp16, "
                         "bf16)")
    return name


def check_device(device: str) -> str:
    """cpu, cuda, cuda:N or mps."""
    if device.partition(":")[0] not in DEVICES or (
            ":" in device and not (device.startswith("cuda:")
                                   and device.partition(":")[2].isdigit())):
        raise ValueError(f"device={device!r}: use cpu, cuda, cuda:N or mps")
    return device


def load_model(path: str | Path, dtype: str = "float32", device: str = "cpu") -> tuple[Any, Any]:
    """Returns (model, tokenizer) for a local Hugging Face model folder, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json; pass a local Hugging Face model "
                                "folder (fleetmind never downloads models)")
    dtype = dtype_name(dtype)
    check_device(device)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True,
                                                 dtype=getattr(torch, dtype))
    model.to(device)  # type: ignore[arg-type]  # transformers types its `to` wrapper unbound
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# ---- context length ----------------------------------------------------------------------

# Where a model config says how many positions the model reads, by family: Llama, Qwen2,
# Gemma, Phi-3 and GPT-NeoX say max_position_embeddings, GPT-2 n_positions.
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length",
                 "n_ctx")


def context_length(config: Any) -> int:
    """The most positions the model reads, from its config (a PretrainedConfig or its
    dict); Gemma-style sliding windows do not shorten it, they only limit what each
    position attends to."""
    get = config.get if isinstance(config, dict) else (lambda k: getattr(config, k, None))
    text = get("text_config")  # multimodal configs keep the language model's apart
    if text is not None:
        return context_length(text)
    for key in _CONTEXT_KEYS:
        value = get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    raise ValueError(f"the model config names no context length (none of {_CONTEXT_KEYS}); "
                     "set max_position_embeddings in its config.json")


def fit_to_context(messages: Sequence[dict[str, str]],
                   count_tokens: Callable[[Sequence[dict[str, str]]], int],
                   limit: int) -> tuple[list[dict[str, str]], int]:
    """A session cut to fit `limit` tokens, by the one rule fleetmind applies: the oldest
    turns go first, whole, a leading system message is kept, and what is kept starts at a
    user turn (a teacher reading an answer without its question learns a wrong thing).
    `count_tokens` renders messages as the model reads them (the chat template).

    Returns (kept messages, how many turns were dropped); the caller reports the dropped
    count, never drops silently. Raises ValueError when not even the last user turn (and
    what follows it) fits: such a session cannot teach this model and must be split or
    removed by whoever wrote it."""
    if limit < 1:
        raise ValueError(f"limit={limit}: the model's context leaves no room for a session")
    messages = [dict(m) for m in messages]
    if count_tokens(messages) <= limit:
        return messages, 0
    head = messages[:1] if messages and messages[0].get("role") == "system" else []
    body = messages[len(head):]
    starts = [i for i, m in enumerate(body) if m.get("role") == "user"]
    for start in starts[1:]:  # the whole session did not fit: drop from the front
        kept = head + body[start:]
        if count_tokens(kept) <= limit:
            return kept, len(messages) - len(kept)
    last = body[starts[-1]:] if starts else body
    raise ValueError(f"a session of {len(messages)} messages does not fit the model's "
                     f"context: even its last user turn takes {count_tokens(head + last)} "
                     f"tokens, more than the {limit} it has room for; split the session or "
                     "use a model with a longer context")


# ---- the base model's hash -----------------------------------------------------------------

_HASHED: dict[tuple, str] = {}  # (folder, the weight files' stat stamps) -> hash


def weight_files(folder: str | Path) -> list[Path]:
    """The files holding the base model's weights: its safetensors (one file or shards),
    else its PyTorch .bin files."""
    folder = Path(folder)
    for pattern in WEIGHT_PATTERNS:
        found = sorted(p for p in folder.glob(pattern)
                       if p.is_file() and p.name not in NOT_WEIGHTS)
        if found:
            return found
    raise FileNotFoundError(f"{folder}: no *.safetensors or *.bin weight files; pass a local "
                            "Hugging Face model folder")


def base_model_hash(folder: str | Path) -> str:
    """The sha256 that names a base model: over its weight files' own sha256s, as
    aggregation.manifest.base_model_digest defines it (by hand: `sha256sum *.safetensors |
    sha256sum` in the folder). Only the weights count: config.json is rewritten by every
    transformers release that saves it, and the tokenizer does not change what an adapter
    is applied to. Cached per process while the files' size and mtime stay the same (an
    8B model's 16 GB take about a minute to hash)."""
    files = weight_files(folder)
    stamp = (str(Path(folder).resolve()),
             tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if stamp not in _HASHED:
        digests = {}
        for path in files:
            digest = hashlib.sha256()
            with open(path, "rb") as stream:
                for block in iter(lambda: stream.read(1 << 22), b""):
                    digest.update(block)
            digests[path.name] = digest.hexdigest()
        _HASHED[stamp] = base_model_digest(digests)
    return _HASHED[stamp]


def check_base_model(manifest: Any, folder: str | Path) -> None:
    """Raises VersionError unless the version's manifest names this site's base model: an
    adapter trained on other weights would activate without error and serve nonsense. Call
    before activating anything."""
    local = base_model_hash(folder)
    if manifest.base_model_sha256 != local:
        raise VersionError(f"version {manifest.version} is for base model "
                           f"{manifest.base_model_id!r} (sha256 {manifest.base_model_sha256}),"
                           f" not this site's model at {folder} (sha256 {local}); do not "
                           "activate it: point the site at the fleet's base model, or the "
                           "aggregator at this one (`fleetmind server adapter --model DIR`)")
