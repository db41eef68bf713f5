"""The ClientApp: one SuperNode is one site, consolidating its sessions with fleetmind's
own OPSD (`client.consolidate.consolidate_sessions`) and replying with its adapted B.

State lives on disk in the site's folder (from the node config), not in Flower's
`Context.state`, which does not survive a run: the session store remembers which sessions
a consolidation used, so a later round or run learns only from new ones; the replay
buffer keeps dreams; every delta the site computed is kept as
`round-NNNN-update.safetensors` (before Flower's clipping mod, when DP is on, clips what
leaves).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, cast

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fleetmind.flower.settings import FlowerRun, SiteNode
from fleetmind.flower.strategy import ARRAYS, METRICS, WEIGHT, b_record, b_tensors


def clip_when_asked(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's `fixedclipping_mod` when the strategy sent a clipping norm (its DP wrapper
    does), else nothing: the mod refuses messages without one, and DP is optional."""
    config = next(iter(message.content.config_records.values()), ConfigRecord())
    if KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(message, context, call_next)
    return call_next(message, context)


def client_app(overrides: dict[str, Any] | None = None) -> ClientApp:
    """A ClientApp; `overrides` stand in for the run config where there is none (the
    in-process simulation)."""
    app = ClientApp(mods=[clip_when_asked])

    @app.train()
    def train(message: Message, context: Context) -> Message:
        run = FlowerRun.from_config({**context.run_config, **(overrides or {})})
        site = SiteNode.from_node_config(context.node_config, run)
        server_round = int(cast(int, message.content.config_records["config"]["server-round"]))
        return consolidate_site(message, run, site, server_round)

    return app


def consolidate_site(message: Message, run: FlowerRun, site: SiteNode,
                     server_round: int) -> Message:
    """One round at one site: its new sessions distilled from the B in `message`, with the
    world's guard prompts when the site has them (else consolidation's own, from the
    sessions). The reply carries the adapted B and the site's weight, or an error when
    every session was consolidated before."""
    from fleetmind.client import lora
    from fleetmind.client.consolidate import consolidate_sessions, read_prompts, write_atomic
    from fleetmind.client.replay import ReplayBuffer
    from fleetmind.client.store import SessionStore

    model, tokenizer = _adapted_model(str(run.model_path()), run.lora_seed, run.lora_rank,
                                      run.lora_alpha, run.torch_threads,
                                      _hashable(run.lora_targets), run.device,
                                      run.distill.dtype)
    lora.set_b(model, b_tensors(message.content.array_records[ARRAYS]))
    site.state.mkdir(parents=True, exist_ok=True)
    guard_file = Path(run.world) / "guard.jsonl"
    guard = read_prompts(guard_file) if guard_file.is_file() else ()
    with SessionStore(site.state) as store:
        store.ingest_file(site.sessions)
        sessions = store.unconsumed()
        if not sessions:
            # Not a crash (CLIENT_APP_RAISED_EXCEPTION): the reason says what it is.
            reason = (f"site {site.name}: every session was used by an earlier "
                      "consolidation; nothing new to contribute")
            return Message(Error(ErrorCode.UNKNOWN, reason), reply_to=message)
        replay = ReplayBuffer(site.state / "replay.db")
        try:
            result = consolidate_sessions(model, tokenizer, sessions, run.distill,
                                          site=site.name, base_version=server_round - 1,
                                          seed=run.lora_seed, guard=guard, replay=replay,
                                          progress=False)
        finally:
            replay.close()
        write_atomic(site.state / f"round-{server_round:04d}-update.safetensors",
                     result.update.to_bytes())
        store.record_consolidation(result.consolidation_id, [s.id for s in sessions])
    # consolidate_sessions left B at (sent B + delta): the reply Flower's clipping expects.
    metrics = MetricRecord({WEIGHT: result.update.metadata.weight, "sessions": len(sessions),
                            "tokens": result.stats.tokens})
    return Message(RecordDict({ARRAYS: b_record(lora.get_b(model)), METRICS: metrics}),
                   reply_to=message)


def _hashable(targets: str | list[str]) -> str | tuple[str, ...]:
    return targets if isinstance(targets, str) else tuple(targets)


@functools.cache
def _adapted_model(model: str, seed: int, rank: int, alpha: float, threads: int,
                   targets: str | tuple[str, ...] = "mlp", device: str = "cpu",
                   dtype: str = "float32") -> tuple[Any, Any]:
    """One PEFT model per process, reused across rounds and across the virtual sites a
    simulation worker serves in turn (B is set from each message, A is the seed's)."""
    import torch

    from fleetmind.client import lora
    from fleetmind.client.model import load_model

    # Simulation workers share the machine's cores; one torch thread each avoids
    # oversubscribing them.
    torch.set_num_threads(threads)
    base, tokenizer = load_model(model, dtype=dtype, device=device)
    return lora.attach_lora(base, seed=seed, rank=rank, alpha=alpha,
                            targets=targets if isinstance(targets, str) else list(targets)
                            ), tokenizer


app = client_app()
