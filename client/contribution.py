"""What a site contributes to a round: its sessions distilled on the active version, then
clipped per privacy unit (each session, each end user, or the whole site) into the update
that is masked and sent (agent.SiteUpdate).

    result, update = consolidate(config, sessions, base_version, store.get)
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from fleetmind.aggregation import dp
from fleetmind.aggregation.manifest import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MANIFEST,
    Manifest,
    VersionError,
)
from fleetmind.aggregation.merge import flatten, staleness_weight, unflatten
from fleetmind.client.agent import SiteUpdate
from fleetmind.client.site_config import SiteConfig
from fleetmind.client.store import Session
from fleetmind.client.versions import CURRENT, verify_folder

if TYPE_CHECKING:  # consolidate pulls in the distillation stack; only its type is needed
    from fleetmind.client.consolidate import SiteConsolidation

__all__ = ["REPLAY_FILE", "active_adapter", "consolidate", "site_update"]

log = logging.getLogger(__name__)

REPLAY_FILE = "replay.db"  # dreams kept for replay, in the site's data folder
# transformers' lazy imports and from_pretrained's meta-device init are not thread-safe, so
# agents sharing a process (tests, one host running several sites) load models one at a time.
_LOAD_LOCK = threading.Lock()
# How PEFT names a LoRA B tensor in adapter_model.safetensors: prefix + module + suffix.
_PEFT_PREFIX = "base_model.model."
_B_SUFFIX = ".lora_B.weight"


def active_adapter(config: SiteConfig) -> tuple[Manifest, dict[str, Any], dict[str, np.ndarray]]:
    """The active version's manifest, adapter config and B tensors by module name."""
    from safetensors.numpy import load_file

    folder = config.data_dir / CURRENT
    manifest = Manifest.from_bytes((folder / MANIFEST).read_bytes())
    adapter = json.loads((folder / ADAPTER_CONFIG).read_text())
    b = {key[len(_PEFT_PREFIX):-len(_B_SUFFIX)]: tensor
         for key, tensor in load_file(str(folder / ADAPTER_WEIGHTS)).items()
         if key.startswith(_PEFT_PREFIX) and key.endswith(_B_SUFFIX)}
    if not b:
        raise VersionError(f"{folder / ADAPTER_WEIGHTS} holds no LoRA B tensors")
    return manifest, adapter, b


def consolidate(config: SiteConfig, sessions: list[Session], base_version: int,
                earlier: Callable[[str], Session]) -> tuple[SiteConsolidation, SiteUpdate]:
    with _LOAD_LOCK:
        from fleetmind.client import lora
        from fleetmind.client.consolidate import consolidate_sessions, read_prompts
        from fleetmind.client.model import load_model
        from fleetmind.client.replay import ReplayBuffer

        # Verified again here: download_latest may have kept (and only logged) a problem,
        # and what is distilled on must be exactly what the aggregator signed.
        verify_folder(config.data_dir / CURRENT, config.aggregator_public_key())
        manifest, adapter, b = active_adapter(config)
        if manifest.version != base_version:
            raise VersionError(f"{config.data_dir / CURRENT} holds version {manifest.version},"
                               f" the link says {base_version}: roll back or download again")
        guard = read_prompts(config.guard_prompts) if config.guard_prompts else []
        model, tokenizer = load_model(config.model_dir)
        # The version's own adapter config: its exact module paths, rank and alpha, so the
        # delta's shapes are the aggregator's and A is the version's public frozen A.
        targets = adapter.get("target_modules") or list(lora.MLP_TARGETS)
        peft_model = lora.attach_lora(model, seed=manifest.frozen_a_seed,
                                      rank=int(adapter["r"]),
                                      alpha=float(adapter["lora_alpha"]), targets=targets)
        lora.set_b(peft_model, b)
    replay = ReplayBuffer(config.data_dir / REPLAY_FILE)
    try:
        result = consolidate_sessions(peft_model, tokenizer, sessions, config.distill,
                                      site=config.name, base_version=base_version,
                                      seed=manifest.frozen_a_seed, guard=guard, replay=replay,
                                      earlier=earlier,
                                      per_session=config.privacy_unit != "site",
                                      progress=False)
    finally:
        replay.close()
    # Staleness is counted against the active version: it was just refreshed, so it is 0
    # unless the aggregator published while this site was distilling.
    return result, site_update(config, result, sessions, base_version, base_version)


def site_update(config: SiteConfig, result: SiteConsolidation, sessions: list[Session],
                base_version: int, latest_version: int) -> SiteUpdate:
    """Clips before anything leaves: each session, each end user, or the site as one unit."""
    delta = {name: np.asarray(t, dtype=np.float32) for name, t in result.update.tensors.items()}
    shapes = {name: tuple(np.shape(t)) for name, t in delta.items()}
    if config.privacy_unit != "site" and result.session_updates:
        users = {s.id: s.user or s.id for s in sessions}
        if config.privacy_unit == "user" and (anonymous := sum(not s.user for s in sessions)):
            log.warning("%s: %d of %d sessions have no user id; each is clipped as its own "
                        "user", config.name, anonymous, len(sessions))
        contributions = [dp.Contribution(sid, users[sid], flatten(d, shapes))
                         for sid, d in result.session_updates]
        unit = config.privacy_unit
        flat, norms = dp.clip_and_sum(contributions, config.clip_norm, unit)
        units = len(norms)
        # The outbox's "before clipping" is the unclipped sum's norm: what would have left.
        norm_before = float(np.linalg.norm(np.sum([c.delta for c in contributions], axis=0,
                                                  dtype=np.float64)))
    else:
        flat, norm_before = dp.clip_to_norm(flatten(delta, shapes), config.clip_norm)
        unit, units = "site", 1
    return SiteUpdate(
        delta=unflatten(flat.astype(np.float32), shapes), base_version=base_version,
        weight=staleness_weight(latest_version - base_version),
        session_ids=tuple(sorted(s.id for s in sessions)), scrubbed=result.scrubbed,
        norm_before_clip=norm_before, contributing_units=units, clip_norm=config.clip_norm,
        privacy_unit=unit)
