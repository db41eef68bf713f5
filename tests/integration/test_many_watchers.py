"""One aggregator holds more Watch streams than grpc's default pending-call limit (3,000)
lets a burst of new streams through (docs/scale.md, "5,000 watchers held"): 3,600 streams,
a thread each on the aggregator, about 10 s. At grpc's defaults it fails."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc

from fleetmind.protos.fleetmind.v1 import models_pb2, models_pb2_grpc
from fleetmind.server.config import ServerConfig
from fleetmind.server.limits import ServerLimits
from fleetmind.server.service import serve

WATCHERS = 3600
PER_CHANNEL = 100


async def _watch_all(address: str, deadline_s: float) -> int:
    """Opens WATCHERS Watch streams at once; how many heard of version 0 in time."""
    channels = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool",
                                                              1)])
                for _ in range(WATCHERS // PER_CHANNEL)]
    heard = 0

    async def one(i: int) -> None:
        nonlocal heard
        stream = models_pb2_grpc.ModelsStub(channels[i // PER_CHANNEL]).Watch(
            models_pb2.WatchRequest())
        async for announcement in stream:
            if announcement.version == 0:
                heard += 1
                return

    tasks = [asyncio.create_task(one(i)) for i in range(WATCHERS)]
    await asyncio.wait(tasks, timeout=deadline_s)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in channels:
        await channel.close()
    return heard


def test_thousands_of_watchers_attach_at_once(tmp_path: Path) -> None:
    streams = WATCHERS + 100
    running = serve(ServerConfig(data_dir=tmp_path / "aggregator", insecure=True,
                                 max_workers=streams),
                    ServerLimits(max_streams=streams))
    try:
        assert asyncio.run(_watch_all(running.address, 180.0)) == WATCHERS
    finally:
        running.stop(grace=None)
