"""The site's trainable adapter: PEFT LoRA whose A is frozen from the version's public seed.

Only B trains, so the aggregator's merge of B deltas is exact (docs/design.md "Exact
merge").
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
from fleetmind.aggregation.manifest import DEFAULT_ALPHA, DEFAULT_RANK

ADAPTER = "default"
# The MLPs, not attention: knowledge is stored in the MLPs, while reading the context is
# attention's work, which the adapter must leave alone; all linear layers forget more at
# equal recovery (docs/measurements.md "Consolidation (OPSD)"). Which modules are a family's
# MLP is PEFT's knowledge, not ours (`target_names`); this is what it gives for the Llama
# family (Llama, Qwen, SmolLM, Mistral, Gemma), kept for callers that name the toy model's
# targets.
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
# `targets` settings besides an explicit list of module names:
#   "mlp"        every linear layer of each block's MLP (the default, see above)
#   "peft"       PEFT's own default LoRA targets for the model family (attention q, v)
#   "all-linear" PEFT's every linear layer but the output head
TARGET_CHOICES = ("mlp", "peft", "all-linear")
_PREFIX = "base_model.model."


def _linear_like(module: Any) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2's layers: weight stored (in, out))."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, torch.nn.Linear | Conv1D)


def is_conv1d(module: Any) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def mlp_modules(model: Any) -> list[str]:
    """The full names of every linear layer inside each block's MLP.

    PEFT names each family's feed-forward output layer
    (TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING: `down_proj`, `mlp.c_proj`,
    `dense_4h_to_h`...); the MLP is that layer's parent, and all its linear layers are
    adapted (the Llama family's gate, up and down projections). A family PEFT does not list
    (Phi-3) has its MLP found by the block's own attribute name, `mlp`."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING

    named = dict(model.named_modules())
    model_type = str(getattr(model.config, "model_type", ""))
    outputs = TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type)
    if outputs:
        parents = {name.rpartition(".")[0] for name, module in named.items()
                   if _linear_like(module)
                   and any(name == o or name.endswith("." + o) for o in outputs)}
    else:
        parents = {name for name in named if name.rpartition(".")[2] == "mlp"}
    found = [name for name, module in named.items()
             if _linear_like(module) and name.rpartition(".")[0] in parents]
    if not found:
        raise ValueError(f"no MLP linear layers found in this {model_type!r} model: pass "
                         "targets as module names (e.g. [\"fc1\", \"fc2\"]), \"peft\" or "
                         "\"all-linear\"")
    return found


def target_names(model: Any, targets: str | Sequence[str] = "mlp") -> str | list[str]:
    """What PEFT's LoraConfig.target_modules gets for a `targets` setting: for "mlp", the
    shortest name suffixes that match the MLP's layers and nothing else (the Llama family:
    gate_proj, up_proj, down_proj; GPT-2: c_fc, mlp.c_proj, since attn.c_proj exists too);
    for "peft", PEFT's per-family default (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING);
    "all-linear" and explicit names pass through."""
    if not isinstance(targets, str):
        names = list(targets)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"targets={targets!r}: name at least one module")
        return names
    if targets == "all-linear":
        return targets
    if targets == "peft":
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

        model_type = str(getattr(model.config, "model_type", ""))
        defaults = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
        if not defaults:
            raise ValueError(f"PEFT has no default LoRA targets for model_type "
                             f"{model_type!r}: use targets=\"mlp\", \"all-linear\" or names")
        return list(defaults)
    if targets != "mlp":
        raise ValueError(f"targets={targets!r} must be one of {', '.join(TARGET_CHOICES)} or "
                         "a list of module names")
    chosen = mlp_modules(model)
    others = [name for name, module in model.named_modules()
              if _linear_like(module) and name not in set(chosen)]
    suffixes: list[str] = []
    for name in chosen:
        parts = name.split(".")
        for cut in range(len(parts) - 1, -1, -1):
            suffix = ".".join(parts[cut:])
            if not any(o == suffix or o.endswith("." + suffix) for o in others):
                break
        if suffix not in suffixes:
            suffixes.append(suffix)
    return suffixes


def matched_modules(model: Any, names: str | Sequence[str]) -> dict[str, Any]:
    """The model's modules that PEFT would adapt for target_modules `names`, by full name."""
    from peft import LoraConfig, PeftConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    config: PeftConfig = LoraConfig(target_modules=names if isinstance(names, str) else list(names))
    if names == "all-linear":
        from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

        config = _maybe_include_all_linear_layers(config, model)
    return {name: module for name, module in model.named_modules()
            if name and _linear_like(module) and check_target_module_exists(config, name)}


def fan_in_fan_out(modules: dict[str, Any]) -> bool:
    """True when the adapted layers are Conv1D (GPT-2: weight stored (in, out)), which PEFT's
    and vLLM's adapter config must say; a mix of Conv1D and Linear is refused, because one
    adapter config holds one flag."""
    kinds = {is_conv1d(module) for module in modules.values()}
    if len(kinds) > 1:
        conv = sorted(n for n, m in modules.items() if is_conv1d(m))[:2]
        raise ValueError(f"the targets mix Conv1D layers ({conv}...) with Linear ones; one "
                         "adapter config has one fan_in_fan_out: choose targets of one kind")
    return kinds == {True}


def attach_lora(model: Any, seed: int, rank: int = DEFAULT_RANK, alpha: float = DEFAULT_ALPHA,
                targets: str | Sequence[str] = "mlp") -> Any:
    """Wraps `model` in PEFT LoRA (B = 0) and sets every A from `seed`, frozen. `targets`:
    "mlp" (the default), "peft", "all-linear" or module names (`target_names`); a version's
    adapter config gives the full module paths."""
    import torch
    from peft import LoraConfig, get_peft_model

    target_modules = target_names(model, targets)
    modules = matched_modules(model, target_modules)
    if not modules:
        raise ValueError(f"targets {target_modules!r} match no linear layer of this "
                         f"{getattr(model.config, 'model_type', '?')!r} model")
    # PEFT annotates lora_alpha as int but scales by lora_alpha / r in floats.
    config = LoraConfig(r=rank, lora_alpha=alpha,  # type: ignore[arg-type]
                        target_modules=target_modules, lora_dropout=0.0,
                        bias="none", task_type="CAUSAL_LM",
                        fan_in_fan_out=fan_in_fan_out(modules))
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


def a_trains(peft_model: Any) -> bool:
    """Whether `freeze_a(..., frozen=False)` let A train (the FedIT baseline)."""
    return bool(getattr(peft_model, _A_TRAINS, False))


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


_UNITS = "_fleetmind_units"  # the UnitDeltas attached to the model, if any


class UnitDeltas:
    """Many privacy units' own deltas of every B, trained side by side on one model.

    Each unit u has its own delta D_u (out, rank) per adapted layer: a pass adds
    scaling * (x A^T) D_u^T to a layer's output for the unit of each row (or packed token)
    that `routed` names, and nothing for rows of no unit. PEFT's own factors stay at the
    global value, so the teacher and the guard's reference (`frozen_global`) are unchanged.
    One pass over many units' rows replaces a pass per unit, as multi-adapter serving
    (S-LoRA, punica) batches adapters; the units' rows never meet, so each unit's gradient is
    its own (docs/design.md "Batched distillation"). With A frozen x A^T is computed once for
    every unit.

    Where A trains (`freeze_a(..., frozen=False)`, the FedIT baseline) each unit also has its
    own delta E_u (rank, in) of A, and a pass adds what the unit's factors (A + E_u, B + D_u)
    add beyond the global ones: scaling * ((x A^T) D_u^T + (x E_u^T)(B + D_u)^T)."""

    def __init__(self, peft_model: Any, units: int) -> None:
        import torch

        if getattr(peft_model, _UNITS, None) is not None:
            raise ValueError("the model already trains a set of unit deltas")
        self.units = units
        self.trains_a = a_trains(peft_model)
        self.route: Any = None  # (rows, 1) or (rows, tokens) unit indices, -1 for none
        self.deltas: dict[str, Any] = {}
        self.a_deltas: dict[str, Any] = {}
        self._hooks = []
        for name, layer in lora_layers(peft_model).items():
            for factor, store in (("B", self.deltas), ("A", self.a_deltas)):
                if factor == "A" and not self.trains_a:
                    continue
                # The global factor holds still: gradients go to the units' deltas.
                weight = _factor(layer, factor)
                weight.requires_grad_(False)
                store[name] = torch.nn.Parameter(
                    torch.zeros((units, *weight.shape), dtype=weight.dtype,
                                device=weight.device))
            self._hooks.append(layer.register_forward_hook(self._adder(name)))
        self._model = peft_model
        setattr(peft_model, _UNITS, self)

    def _adder(self, name: str) -> Any:
        def add(layer: Any, args: tuple[Any, ...], output: Any) -> Any:
            if self.route is None:
                return output
            import torch.nn.functional as F

            a = layer.lora_A[ADAPTER]
            x = args[0].to(a.weight.dtype)
            h = a(x)  # (rows, tokens, rank), shared by every unit
            route = self.route.expand(h.shape[:-1])
            # Each token's h placed in its unit's slot of a (units x rank) row, so one matmul
            # with every unit's delta stacked applies each token's own unit's delta.
            hot = F.one_hot(route.clamp(min=0), self.units).to(h.dtype) * (route >= 0)[..., None]
            spread = (hot[..., None] * h[..., None, :]).flatten(-2)
            delta = self.deltas[name]  # (units, out, rank)
            stacked = delta.transpose(1, 2).reshape(-1, delta.shape[1])  # (units*rank, out)
            added = spread @ stacked
            if self.trains_a:
                a_delta = self.a_deltas[name]  # (units, rank, in)
                # x E_u^T for every unit, kept only in the token's own unit's slot.
                own = (x @ a_delta.reshape(-1, a_delta.shape[-1]).T) * hot.repeat_interleave(
                    a_delta.shape[1], dim=-1)
                b = layer.lora_B[ADAPTER].weight  # (out, rank)
                added = added + own @ (stacked + b.T.repeat(self.units, 1))
            return output + (layer.scaling[ADAPTER] * added).to(output.dtype)
        return add

    def parameters(self) -> list[Any]:
        return [*self.deltas.values(), *self.a_deltas.values()]

    def unit_deltas(self, factor: str = "B") -> list[dict[str, np.ndarray]]:
        """Each unit's delta of every B (of every A with factor="A", where A trains), float32
        copies, unit by unit."""
        store = self.deltas if factor == "B" else self.a_deltas
        return [{name: delta[u].detach().float().cpu().numpy().copy()
                 for name, delta in store.items()} for u in range(self.units)]

    def detach(self) -> None:
        """Takes the hooks off the model; the model is as it was before."""
        for hook in self._hooks:
            hook.remove()
        for layer in lora_layers(self._model).values():
            _factor(layer, "B").requires_grad_(True)
        freeze_a(self._model, frozen=not self.trains_a)
        delattr(self._model, _UNITS)


@contextmanager
def routed(peft_model: Any, units: Any) -> Iterator[None]:
    """The passes inside add each row's (or packed token's) own unit's delta: `units` holds
    unit indices, (rows, 1) or (rows, tokens), -1 for none; None, or a model without
    UnitDeltas, adds nothing."""
    deltas = getattr(peft_model, _UNITS, None)
    if deltas is None or units is None:
        yield
        return
    deltas.route = units
    try:
        yield
    finally:
        deltas.route = None


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
