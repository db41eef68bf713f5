"""Canary exposure of a published version (Carlini et al. 2019, "The Secret Sharer").

A canary is a secret one user said once at one site; the fleet must not learn it. Its
exposure is log2|R| - log2(rank), where rank is the secret's place among all |R| secrets
of the same shape when the model scores them: 0 bits means the model puts the secret last,
log2|R| means it ranks it first, and a model that knows nothing scores about 1.4 bits on
average. What matters is the version against the base model. The measurement is
audit/exposure.py's (the demo uses the same); this module reads the canaries file, keeps
where each secret was said, and loads the two models: the base model alone, and the base
model with the version's adapter. torch and peft are imported only inside `measure`, so the
auditor's other commands run on an install without them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleetmind.aggregation.manifest import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from fleetmind.audit import exposure

__all__ = ["CanaryExposure", "SaidCanary", "check_adapter_folder", "exposure_report", "measure",
           "read_canaries"]


@dataclass(frozen=True)
class SaidCanary:
    """A canary and where it was said (site and session, as canaries.jsonl names them), and
    in how many sessions (`repeats`: 1 unless its row says; one user's repeated secret)."""

    site: str
    session: str
    canary: exposure.Canary
    repeats: int = 1

    @property
    def max_bits(self) -> float:
        """Exposure when the secret is ranked first among every candidate."""
        return math.log2(exposure.candidates(self.canary))


@dataclass(frozen=True)
class CanaryExposure:
    said: SaidCanary
    base_bits: float
    version_bits: float


def read_canaries(path: Path) -> list[SaidCanary]:
    """The rows of a canaries JSONL file (the toy world's canaries.jsonl: "site", "session",
    "repeats", "secret", "text" and "slots"). Raises ValueError naming the file and line of a
    bad row."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file; pass the world's canaries.jsonl") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot read it ({error})") from None
    said = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row: Any = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
            canary = exposure.canary_from_row(row)
            repeats = row.get("repeats", 1)
            if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
                raise ValueError(f"\"repeats\": {repeats!r} must be a whole number >= 1 (the "
                                 "sessions that said the secret)")
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from None
        except ValueError as error:
            raise ValueError(f"{path}:{number}: {error}") from None
        said.append(SaidCanary(str(row.get("site", "")), str(row.get("session", "")), canary,
                               repeats))
    if not said:
        raise ValueError(f"{path} holds no canaries")
    return said


def check_adapter_folder(folder: Path) -> None:
    """Raises ValueError unless `folder` holds a PEFT adapter (as every version does)."""
    folder = Path(folder)
    missing = [name for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
               if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"{folder}: no {' or '.join(missing)}; pass a published version "
                         "folder (a PEFT adapter with manifest.json)")


def measure(model_dir: Path, version_dir: Path, canaries: list[SaidCanary]
            ) -> list[CanaryExposure]:
    """Exposure of every canary in the base model and in the base model with the version's
    adapter (loaded by PEFT from the folder as published, as vLLM or any site would)."""
    from peft import PeftModel

    from fleetmind.client.model import load_model

    check_adapter_folder(version_dir)
    model, tokenizer = load_model(model_dir)
    plain = [said.canary for said in canaries]
    base = exposure.canary_exposure(model, tokenizer, plain)
    # The base model first: PeftModel wraps (and changes) the very model it is given.
    adapted = PeftModel.from_pretrained(model, str(version_dir), is_trainable=False)
    adapted.eval()
    version = exposure.canary_exposure(adapted, tokenizer, plain)
    return [CanaryExposure(said, float(b), float(v))
            for said, b, v in zip(canaries, base, version, strict=True)]


def exposure_report(model_dir: Path, version_dir: Path, results: list[CanaryExposure]
                    ) -> dict[str, Any]:
    """`audit canaries`' JSON document: each canary's exposure, and the means."""
    return {"model": str(model_dir), "version": str(version_dir),
            "canaries": [{"site": r.said.site, "session": r.said.session,
                          "repeats": r.said.repeats, "secret": r.said.canary.secret,
                          "base_bits": r.base_bits, "version_bits": r.version_bits,
                          "max_bits": r.said.max_bits}
                         for r in results],
            "mean_base_bits": sum(r.base_bits for r in results) / len(results),
            "mean_version_bits": sum(r.version_bits for r in results) / len(results)}
