"""What a site contributes to a round: its sessions distilled on the active version, then
clipped per privacy unit (each session, each end user, or the whole site) into the update
that is masked and sent (agent.SiteUpdate).

    result, update = consolidate(config, sessions, base_version, store.get)

Participation caps (aggregation/participation.py) are enforced here too, before anything is
distilled: `within_cap` keeps the sessions whose privacy unit is still under the cap, and
`Participation` is what agent.participate calls just before it writes the outbox record,
the last guard before the payload leaves:

    history, last_cap = outbox_participation(outbox)
    cap = stricter_cap(config.participation_cap, last_cap)
    kept, capped = within_cap(config, sessions, history, cap)
    participation = Participation.for_sessions(config, kept, history)
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

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
from fleetmind.aggregation.participation import (
    CapReachedError,
    ParticipationCap,
    eligible_units,
    participation_history,
    record_round,
)
from fleetmind.aggregation.records import participation_records
from fleetmind.client.agent import SiteUpdate
from fleetmind.client.outbox import Outbox
from fleetmind.client.site_config import SiteConfig
from fleetmind.client.store import Session
from fleetmind.client.versions import CURRENT
from fleetmind.runtime.layout import verify_folder

if TYPE_CHECKING:  # consolidate pulls in the distillation stack; only its type is needed
    from fleetmind.client.consolidate import SiteConsolidation

__all__ = ["REPLAY_FILE", "ClippedDelta", "Participation", "RoundCapError", "active_adapter",
           "clip_per_unit", "consolidate", "outbox_participation", "round_cap", "site_update",
           "stricter_cap", "unit_id", "unit_of", "within_cap", "within_unit_cap"]

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
        # The site's own device and dtype ([distill] device/dtype in its config).
        model, tokenizer = load_model(config.model_dir, dtype=config.distill.dtype,
                                      device=config.distill.device)
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
    clipped = clip_per_unit(result, sessions, cast("dp.PrivacyUnit", config.privacy_unit),
                            config.clip_norm, config.name)  # SiteConfig checked the unit
    return SiteUpdate(
        delta=clipped.delta, base_version=base_version,
        weight=staleness_weight(latest_version - base_version),
        session_ids=tuple(sorted(s.id for s in sessions)), scrubbed=result.scrubbed,
        norm_before_clip=clipped.norm_before, contributing_units=clipped.units,
        clip_norm=config.clip_norm, privacy_unit=clipped.unit)


@dataclass(frozen=True)
class ClippedDelta:
    """A consolidation's delta clipped per privacy unit: the sum of the units' clipped
    deltas, its norm before clipping (the unclipped sum's), how many units it holds and
    which unit was clipped ("site" when the consolidation kept no per-session deltas)."""

    delta: dict[str, np.ndarray]
    norm_before: float
    units: int
    unit: str


def clip_per_unit(result: SiteConsolidation, sessions: Sequence[Session],
                  privacy_unit: dp.PrivacyUnit, clip_norm: float, site: str) -> ClippedDelta:
    """The one clipping rule of a site, on every transport (the site agent's site_update,
    the Flower ClientApp): each session's or each end user's delta (a session without a
    user id is its own user, as unit_id says) clipped to `clip_norm` and summed
    (dp.clip_and_sum), or the whole delta clipped as one unit for "site"."""
    delta = {name: np.asarray(t, dtype=np.float32) for name, t in result.update.tensors.items()}
    shapes = {name: tuple(np.shape(t)) for name, t in delta.items()}
    if privacy_unit != "site" and result.session_updates:
        users = {s.id: unit_id("user", site, s) for s in sessions}
        if privacy_unit == "user" and (anonymous := sum(not s.user for s in sessions)):
            log.warning("%s: %d of %d sessions have no user id; each is clipped as its own "
                        "user", site, anonymous, len(sessions))
        contributions = [dp.Contribution(sid, users[sid], flatten(d, shapes))
                         for sid, d in result.session_updates]
        flat, norms = dp.clip_and_sum(contributions, clip_norm, privacy_unit)
        # The outbox's "before clipping" is the unclipped sum's norm: what would have left.
        norm_before = float(np.linalg.norm(np.sum([c.delta for c in contributions], axis=0,
                                                  dtype=np.float64)))
        return ClippedDelta(unflatten(flat.astype(np.float32), shapes), norm_before,
                            len(norms), privacy_unit)
    flat, norm_before = dp.clip_to_norm(flatten(delta, shapes), clip_norm)
    return ClippedDelta(unflatten(flat.astype(np.float32), shapes), norm_before, 1, "site")


# ---- participation caps -----------------------------------------------------------------


def unit_of(config: SiteConfig, session: Session) -> str:
    """The privacy unit `session` counts toward under the site's config (unit_id)."""
    return unit_id(cast("dp.PrivacyUnit", config.privacy_unit), config.name, session)


def unit_id(privacy_unit: dp.PrivacyUnit, site: str, session: Session) -> str:
    """The privacy unit `session` counts toward, by the rule clipping uses (clip_per_unit):
    the session itself, its end user (a session without a user id is its own user), or the
    whole site."""
    if privacy_unit == "site":
        return site
    if privacy_unit == "user":
        return session.user or session.id
    return session.id


def stricter_cap(*caps: int | None) -> ParticipationCap | None:
    """The strictest of `caps` (None or 0: no cap), or None when none is set. The round's
    accountant charges each unit for at most the round's K rounds, so a site may enforce a
    smaller K of its own, never a larger one."""
    known = [int(cap) for cap in caps if cap]
    return ParticipationCap(min(known)) if known else None


def round_cap(round_config: Any) -> int | None:
    """The cap a round's config carries (fleet_pb2.RoundConfig.participation_cap; 0, or an
    aggregator from before the field: none)."""
    return int(getattr(round_config, "participation_cap", 0) or 0) or None


def outbox_participation(outbox: Outbox) -> tuple[dict[str, tuple[int, ...]], int | None]:
    """From the site's outbox: unit -> the rounds it entered (checked:
    participation_history), and the cap in force at the last upload that carried one (None:
    no upload did), so a site learns the fleet's cap once and enforces it before
    distilling."""
    records = participation_records(entry.record for entry in outbox.entries())
    return participation_history(records), records[-1].max_rounds if records else None


def within_cap(config: SiteConfig, sessions: Iterable[Session],
               history: Mapping[str, Iterable[int]], cap: ParticipationCap | None
               ) -> tuple[list[Session], list[Session]]:
    """within_unit_cap under the site's config."""
    return within_unit_cap(cast("dp.PrivacyUnit", config.privacy_unit), config.name,
                           sessions, history, cap)


def within_unit_cap(privacy_unit: dp.PrivacyUnit, site: str, sessions: Iterable[Session],
                    history: Mapping[str, Iterable[int]], cap: ParticipationCap | None
                    ) -> tuple[list[Session], list[Session]]:
    """`sessions` split into those whose privacy unit (unit_id) is under `cap` and those
    whose unit already entered cap.max_rounds rounds (all kept when cap is None)."""
    sessions = list(sessions)
    if cap is None:
        return sessions, []
    rounds = {unit: tuple(entered) for unit, entered in history.items()}
    allowed = set(eligible_units([unit_id(privacy_unit, site, s) for s in sessions], rounds,
                                 cap))
    kept = [s for s in sessions if unit_id(privacy_unit, site, s) in allowed]
    return kept, [s for s in sessions if unit_id(privacy_unit, site, s) not in allowed]


class RoundCapError(CapReachedError):
    """The round's cap (`round_cap`) is stricter than the one the site filtered its
    sessions with, and some units of the update are at it: nothing was sent. Filter again
    with `round_cap` and consolidate again."""

    def __init__(self, message: str, round_cap: int | None) -> None:
        super().__init__(message)
        self.round_cap = round_cap


@dataclass(frozen=True)
class Participation:
    """What a site passes to agent.participate (`participation=`): the privacy units its
    update carries (unit_ids, by unit_of), the rounds each already entered (history, from
    the outbox) and the site's own cap. The agent calls it with the round id and the
    round's config just before it appends the outbox record: it returns the
    ParticipationRecord's JSON for that record (None: no cap in force, nothing recorded),
    or raises RoundCapError (a CapReachedError) if a unit is at the stricter of the two
    caps: the last guard, before the payload leaves."""

    privacy_unit: str
    unit_ids: tuple[str, ...]
    history: Mapping[str, tuple[int, ...]]
    site_cap: int | None = None

    @classmethod
    def for_sessions(cls, config: SiteConfig, sessions: Iterable[Session],
                     history: Mapping[str, tuple[int, ...]]) -> Participation:
        units = tuple(dict.fromkeys(unit_of(config, s) for s in sessions))
        return cls(config.privacy_unit, units, dict(history), config.participation_cap)

    def __call__(self, round_id: int, round_config: Any = None) -> dict | None:
        cap_of_round = round_cap(round_config)
        cap = stricter_cap(self.site_cap, cap_of_round)
        if cap is None:
            return None
        try:
            record = record_round(self.unit_ids, self.history, cap, round_id,
                                  self.privacy_unit)
        except CapReachedError as error:
            raise RoundCapError(str(error), cap_of_round) from None
        return record.to_json()
