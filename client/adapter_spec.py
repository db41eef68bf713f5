"""The aggregator's genesis adapter, read from a local model folder.

`fleetmind server adapter --model DIR --out FILE` writes what the aggregator's `[adapter]`
table holds (fleetmind.server.config): the base model's id and sha256, the frozen-A seed,
rank, alpha, whether the layers are Conv1D (`fan_in_fan_out`), and every adapted module with
its shapes, so no operator types a module by hand. Reading a model's modules needs
transformers, which the aggregator never imports: this runs where the model is, and the
aggregator reads only the file. The model is built on the meta device from its config, so
no weight is loaded (an 8B model's spec takes seconds); its weights are read once, for the
hash (`model.base_model_hash`).

The file, TOML (or JSON for a .json name):

    [adapter]
    base_model_id = "SmolLM2-135M-Instruct"
    base_model_sha256 = "<64 hex>"
    frozen_a_seed = 0
    rank = 32
    alpha = 64.0
    fan_in_fan_out = false
    modules = [
      {name = "model.layers.0.mlp.gate_proj", in_features = 576, out_features = 1536},
      ...
    ]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fleetmind.aggregation.manifest import DEFAULT_ALPHA, DEFAULT_RANK
from fleetmind.client import lora
from fleetmind.client.model import base_model_hash

SPEC_KEYS = ("base_model_id", "base_model_sha256", "frozen_a_seed", "rank", "alpha",
             "fan_in_fan_out", "modules")


def module_shapes(model: Any, targets: str | Sequence[str] = "mlp"
                  ) -> tuple[list[dict[str, Any]], bool]:
    """Every module a `targets` setting adapts, as {name, in_features, out_features} (A is
    (rank, in), B (out, rank)), in the model's order, and whether they are Conv1D."""
    modules = lora.matched_modules(model, lora.target_names(model, targets))
    if not modules:
        raise ValueError(f"targets {targets!r} match no linear layer of this model")
    shapes = []
    for name, module in modules.items():
        if lora.is_conv1d(module):  # weight stored (in, out)
            in_features, out_features = module.weight.shape
        else:
            in_features, out_features = module.in_features, module.out_features
        shapes.append({"name": name, "in_features": int(in_features),
                       "out_features": int(out_features)})
    return shapes, lora.fan_in_fan_out(modules)


def skeleton(model_dir: str | Path) -> Any:
    """The model of a local folder, built from its config on the meta device: every module
    and shape, no weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json; pass a local Hugging Face model "
                                "folder (fleetmind never downloads models)")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def adapter_spec(model_dir: str | Path, *, rank: int = DEFAULT_RANK,
                 alpha: float = DEFAULT_ALPHA,
                 frozen_a_seed: int = 0, targets: str | Sequence[str] = "mlp",
                 base_model_id: str | None = None) -> dict[str, Any]:
    """The `[adapter]` table for the model in `model_dir` (keys: SPEC_KEYS). The base
    model's id defaults to the folder's name."""
    if rank < 1:
        raise ValueError(f"rank={rank} must be >= 1")
    if not alpha > 0:
        raise ValueError(f"alpha={alpha} must be > 0")
    if not 0 <= frozen_a_seed < 2**63:
        raise ValueError(f"frozen_a_seed={frozen_a_seed} must be in 0..2^63-1")
    folder = Path(model_dir)
    modules, conv1d = module_shapes(skeleton(folder), targets)
    return {"base_model_id": base_model_id or folder.resolve().name,
            "base_model_sha256": base_model_hash(folder), "frozen_a_seed": frozen_a_seed,
            "rank": rank, "alpha": float(alpha), "fan_in_fan_out": conv1d, "modules": modules}


def to_toml(spec: dict[str, Any]) -> str:
    """The spec as an `[adapter]` TOML table. JSON strings are TOML basic strings."""
    lines = ["[adapter]"]
    for key in SPEC_KEYS[:-1]:
        value = spec[key]
        text = ("true" if value else "false") if isinstance(value, bool) else json.dumps(value)
        lines.append(f"{key} = {text}")
    lines.append("modules = [")
    for m in spec["modules"]:
        lines.append(f"  {{name = {json.dumps(m['name'])}, in_features = {m['in_features']}, "
                     f"out_features = {m['out_features']}}},")
    lines.append("]")
    return "\n".join(lines) + "\n"


def write_adapter_spec(model_dir: str | Path, out: str | Path, **settings: Any
                       ) -> dict[str, Any]:
    """Writes the spec to `out`: TOML, or JSON ({"adapter": {...}}) for a .json name."""
    spec = adapter_spec(model_dir, **settings)
    out = Path(out)
    text = (json.dumps({"adapter": spec}, indent=2) + "\n" if out.suffix == ".json"
            else to_toml(spec))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return spec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`fleetmind server adapter`'s options."""
    parser.add_argument("--model", type=Path, required=True, metavar="DIR",
                        help="the base model's local Hugging Face folder")
    parser.add_argument("--out", type=Path, required=True, metavar="FILE",
                        help="where to write the [adapter] table (.toml, or .json)")
    parser.add_argument("--rank", type=int, default=DEFAULT_RANK,
                        help=f"LoRA rank (default {DEFAULT_RANK})")
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                        help=f"LoRA alpha (default {DEFAULT_ALPHA:g})")
    parser.add_argument("--seed", type=int, default=0, dest="frozen_a_seed",
                        help="the public seed every site derives the frozen A from (default 0)")
    parser.add_argument("--targets", default="mlp",
                        help="mlp (default: each block's MLP), peft (PEFT's default for the "
                             "family), all-linear, or comma-separated module names")
    parser.add_argument("--id", dest="base_model_id",
                        help="the base model's name in manifests (default: the folder's name)")


def run_command(args: argparse.Namespace) -> int:
    """Writes the spec the options ask for and says what it holds."""
    targets = args.targets if args.targets in lora.TARGET_CHOICES else [
        name.strip() for name in args.targets.split(",") if name.strip()]
    try:
        spec = write_adapter_spec(args.model, args.out, rank=args.rank, alpha=args.alpha,
                                  frozen_a_seed=args.frozen_a_seed, targets=targets,
                                  base_model_id=args.base_model_id)
    except (OSError, ValueError) as error:
        raise argparse.ArgumentError(None, str(error)) from None
    print(f"{args.out}: {len(spec['modules'])} modules of {spec['base_model_id']} "
          f"(sha256 {spec['base_model_sha256'][:12]}...), rank {spec['rank']}, "
          f"fan_in_fan_out {str(spec['fan_in_fan_out']).lower()}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m fleetmind.client.adapter_spec --model DIR --out FILE ...`: the command as
    a process of its own, for an aggregator's CLI, which may not import the client side."""
    parser = argparse.ArgumentParser(prog="fleetmind server adapter",
                                     description="Write the aggregator's genesis [adapter] "
                                                 "table from a local model folder.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_command(args)
    except argparse.ArgumentError as error:
        parser.error(str(error))
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
