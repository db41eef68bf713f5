"""The site's trainable adapter: PEFT LoRA whose A is frozen from the version's public seed.

Only B trains, so the aggregator's merge of B deltas is exact (DESIGN.md "Exact merge").
Module names are the base model's (`model.layers.0.self_attn.q_proj`), the same on every
site and in every update.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from fleetmind.aggregation.frozen_a import frozen_a

ADAPTER = "default"
# The MLPs, not attention: knowledge is stored in the MLPs, while reading the context is
# attention's work, which the adapter must leave alone. Measured on the toy model (60 OPSD
# steps, one site): recovery 1.0 both ways, forgetting 1.4-2.0 points on MLPs only against
# 2.8-3.6 on all linear layers. The names are the Llama family's (Llama, Qwen, SmolLM,
# Mistral); pass `targets` for other architectures.
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
_PREFIX = "base_model.model."


def attach_lora(model: Any, seed: int, rank: int = 8, alpha: float = 16.0,
                targets: str | Sequence[str] = MLP_TARGETS) -> Any:
    """Wraps `model` in PEFT LoRA (B = 0) and sets every A from `seed`, frozen."""
    import torch
    from peft import LoraConfig, get_peft_model

    target_modules = targets if isinstance(targets, str) else list(targets)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules, lora_dropout=0.0,
                        bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    for name, layer in lora_layers(peft_model).items():
        weight = layer.lora_A[ADAPTER].weight  # (rank, in_features)
        values = frozen_a(seed, name, weight.shape[0], weight.shape[1])
        with torch.no_grad():
            weight.copy_(torch.from_numpy(values))
    freeze_a(peft_model)
    return peft_model


_A_TRAINS = "_fleetmind_a_trains"  # the intent, kept on the model: PEFT flips requires_grad


def freeze_a(peft_model: Any, frozen: bool = True) -> None:
    """Freezes every A (the default), or lets A train (`frozen=False`): the FedIT baseline
    only, whose merge is then no longer exact."""
    setattr(peft_model, _A_TRAINS, not frozen)
    for layer in lora_layers(peft_model).values():
        layer.lora_A[ADAPTER].weight.requires_grad_(not frozen)


@contextmanager
def adapter_disabled(peft_model: Any) -> Iterator[None]:
    """The frozen global model (the teacher). PEFT marks every adapter weight trainable
    again when it re-enables the adapter, so A is put back as `freeze_a` last left it."""
    try:
        with peft_model.disable_adapter():
            yield
    finally:
        freeze_a(peft_model, frozen=not getattr(peft_model, _A_TRAINS, False))


_GLOBAL = "_fleetmind_global"  # the trainable factors' values when consolidation began


def hold_global(peft_model: Any) -> None:
    """Records the adapter as it is now as the frozen global model: what `frozen_global`
    serves as the teacher and the forgetting guard's reference while B trains."""
    factors = ("A", "B") if getattr(peft_model, _A_TRAINS, False) else ("B",)
    setattr(peft_model, _GLOBAL, {(name, factor): _factor(layer, factor).detach().clone()
                                  for name, layer in lora_layers(peft_model).items()
                                  for factor in factors})


@contextmanager
def frozen_global(peft_model: Any) -> Iterator[None]:
    """The frozen global model: the adapter as `hold_global` recorded it (the base model,
    through `adapter_disabled`, when nothing was recorded). Disabling the adapter instead
    would make every round's guard pull the model back to the base, undoing what earlier
    rounds merged. Values are swapped through `.data`, which autograd does not track, and
    put back on exit, so a student graph built before stays valid for its backward."""
    held = getattr(peft_model, _GLOBAL, None)
    if held is None:
        with adapter_disabled(peft_model):
            yield
        return
    layers = lora_layers(peft_model)
    current = {key: _factor(layers[key[0]], key[1]).data.clone() for key in held}
    try:
        for key, value in held.items():
            _factor(layers[key[0]], key[1]).data.copy_(value)
        yield
    finally:
        for key, value in current.items():
            _factor(layers[key[0]], key[1]).data.copy_(value)


def lora_layers(peft_model: Any) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    return {name.removeprefix(_PREFIX): module for name, module in peft_model.named_modules()
            if isinstance(module, LoraLayer)}


def _factor(layer: Any, factor: str) -> Any:
    return (layer.lora_B if factor == "B" else layer.lora_A)[ADAPTER].weight


def get_b(peft_model: Any, factor: str = "B") -> dict[str, np.ndarray]:
    """B of every module, float32 copies: (out_features, rank); A with factor="A"."""
    return {name: _factor(layer, factor).detach().float().cpu().numpy().copy()
            for name, layer in lora_layers(peft_model).items()}


def set_b(peft_model: Any, tensors: dict[str, np.ndarray], factor: str = "B") -> None:
    import torch

    layers = lora_layers(peft_model)
    missing = sorted(set(layers) - set(tensors))
    unknown = sorted(set(tensors) - set(layers))
    if missing or unknown:
        raise ValueError(f"{factor} tensors do not match the adapter: missing {missing[:3]}, "
                         f"unknown {unknown[:3]}")
    for name, layer in layers.items():
        weight = _factor(layer, factor)
        if tuple(tensors[name].shape) != tuple(weight.shape):
            raise ValueError(f"{factor} for {name} has shape {tensors[name].shape}, the "
                             f"adapter expects {tuple(weight.shape)}")
        with torch.no_grad():
            weight.copy_(torch.from_numpy(np.asarray(tensors[name], dtype=np.float32)))


def trainable_parameters(peft_model: Any) -> list[Any]:
    """Every B, and every A once `freeze_a(..., frozen=False)` let A train (the intent, not
    requires_grad, which PEFT sets on every adapter weight when it re-enables one)."""
    factors = ("A", "B") if getattr(peft_model, _A_TRAINS, False) else ("B",)
    return [_factor(layer, factor) for layer in lora_layers(peft_model).values()
            for factor in factors]


def save_adapter(peft_model: Any, out: Path) -> Path:
    """A standard PEFT adapter folder (adapter_config.json + adapter_model.safetensors)."""
    peft_model.save_pretrained(out)
    return out
