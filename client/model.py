"""The one place that loads a causal language model and its tokenizer from a local folder.

Toy or real (Llama, Qwen, SmolLM...), everything in fleetmind loads models through
`load_model`, so the demo and the tests exercise the same path a deployment does.
Nothing is ever fetched from a hub: `HF_HUB_OFFLINE=1` is set before transformers loads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

DTYPES = ("float32", "float16", "bfloat16")


def load_model(path: str | Path, dtype: str = "float32", device: str = "cpu") -> tuple[Any, Any]:
    """Returns (model, tokenizer) for a local Hugging Face model folder, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json; pass a local Hugging Face model "
                                "folder (fleetmind never downloads models)")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: use one of {', '.join(DTYPES)}")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True,
                                                 dtype=getattr(torch, dtype))
    model.to(device)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
