"""`fleetmind bench scale`: how one aggregator's round latency and memory grow with the cohort,
and how it fans a new version out to thousands of enrolled watchers.

Three processes on 127.0.0.1, so the aggregator's memory and CPU are its own:

- the aggregator: `server.service.serve` in a child process (one per cohort size, so its
  peak RSS is that size's); a listener records when the cohort formed, each phase closed
  and the round ended (time.monotonic, one clock for every process on Linux);
- the sites: light synthetic sites, each `client.agent.participate` in its own thread on its
  own channel (the update of bench/wire.py: a two-module adapter, site noise off), at most
  SITES_PER_PROCESS threads to a process (`--site-processes`), all released together: one
  process of 1,000 site threads measured its own GIL and garbage collector, not the round;
- the watchers: a child process of grpc.aio clients that enrol (Fleet.Enroll, each with its
  own Ed25519 key) and hold one Models.Watch stream each, `--watchers-per-channel` streams
  on a channel.

rounds: one whole round per cohort size (enrol, join, the four SecAgg+ phases, upload,
publish); round_seconds = wall time from starting the sites to the last one returning, split
into phases by the aggregator's own events; the aggregator's RSS after the round and its
peak (VmHWM), its CPU seconds, and its thread count. growth_exponent is the least-squares
slope of log(round_seconds) on log(sites) over the feasible sizes (1 = linear);
ratio_to_100 is round_seconds(N) / round_seconds(100). A size is skipped when the time
left (--time-limit) cannot fit it at the growth seen so far.

watchers: the same aggregator holds a round of `watch_sites` sites while W enrolled watchers
watch; fanout_seconds is from the start of the version's publication to the last watcher's
announcement.
The peer: the same announcement bytes pushed to W streams held open on a plain gRPC
unary-stream method (thread-per-stream server, like the aggregator's; raw bytes, no
checks) in its own child process, released at once; ratio_to_plain = plain / ours.

broadcast: bench/wire.py's download measure (W watchers calling download_latest on a few-MB
version at once against a plain gRPC stream of the same bytes, in this process), for the
issue's "broadcast >= 0.5x a plain gRPC stream to 100 watchers".

Writes DIR/scale.json and DIR/scale.png (latency and memory against cohort size).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

DEFAULT_SIZES = (10, 50, 100, 200, 500, 1000)
DEFAULT_WATCHERS = 5000
SITES_PER_PROCESS = 125
# gRPC's blocking calls wake every 0.1 s only so that a main thread can take signals
# (grpc/grpc#19464); 125 site threads to a process would spend the machine on those
# wake-ups, which sites on their own machines never share, so the bench's sites wake
# every SITE_WAKE_S instead. A reply still wakes its thread at once (docs/scale.md).
SITE_WAKE_S = 5.0
MAX_SITE_PROCESSES = 8
DOWNLOAD_WATCHERS = 100
ROUND_DEADLINE_S = 600.0
CHILD_START_S = 60.0
ATTACH_STALL_S = 30.0  # watchers stop attaching (grpc refused pending calls: docs/scale.md)
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]  # a channel's own TCP connection


# ---- child processes -----------------------------------------------------------------


class _Child:
    """A child Python process speaking JSON lines: one object per line each way."""

    def __init__(self, role: str, spec: dict[str, Any], wrap: list[str] | None = None) -> None:
        code = f"from fleetmind.sim.bench.scale import _child_main; _child_main({role!r})"
        self.process = subprocess.Popen(
            [*(wrap or []), sys.executable, "-c", code, json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("{"):
                self._lines.put(line)
        self._lines.put(None)

    def recv(self, timeout: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"child gave no answer in {timeout:.0f} s") from None
        if line is None:
            raise RuntimeError(f"child exited (status {self.process.wait()})")
        return json.loads(line)

    def ask(self, command: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return self.recv(timeout)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # already gone, or stuck: ended below
            self.ask({"cmd": "stop"}, timeout=30)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _memory() -> dict[str, Any]:
    """This process's RSS and peak RSS (kB), threads and CPU seconds."""
    status = Path("/proc/self/status").read_text().splitlines()
    fields = {line.split(":")[0]: line.split(":")[1].strip() for line in status if ":" in line}
    times = os.times()
    return {"rss_kb": int(fields["VmRSS"].split()[0]), "hwm_kb": int(fields["VmHWM"].split()[0]),
            "threads": int(fields["Threads"]), "cpu_s": times.user + times.system}


def _child_main(role: str) -> None:
    spec = json.loads(sys.argv[1])
    {"aggregator": _aggregator_child, "plain": _plain_child, "sites": _sites_child,
     "watchers": _watchers_child}[role](spec)


def _say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _aggregator_child(spec: dict[str, Any]) -> None:
    from fleetmind.server.config import CohortPolicy, ServerConfig
    from fleetmind.server.coordinator import RoundListener
    from fleetmind.server.limits import ServerLimits
    from fleetmind.server.service import serve
    from fleetmind.sim.bench import wire

    sites = spec["sites"]
    streams = sites + spec["watchers"] + 64
    config = ServerConfig(
        data_dir=Path(spec["data"]), listen="127.0.0.1:0", insecure=True,
        cohort=CohortPolicy(min_size=sites, target_size=sites, max_size=max(200, sites),
                            deadline_s=spec["deadline"], phase_deadline_s=spec["deadline"]),
        privacy=wire.PRIVACY, adapter=wire.SPEC, max_workers=streams)
    limits = ServerLimits(max_streams=streams, max_calls=spec["max_calls"],
                          stream_max_s=max(600.0, spec["deadline"] * 2),
                          max_connection_age_grace_s=max(900.0, spec["deadline"] * 3))
    running = serve(config, limits)
    events: list[list[Any]] = []
    inner = running.coordinator.listener

    class Recorder(RoundListener):
        def round_started(self, round_id: int, cohort_size: int) -> None:
            events.append(["round_started", time.monotonic(), cohort_size])
            inner.round_started(round_id, cohort_size)

        def phase_closed(self, round_id: int, phase: str, seconds: float, dropped: int) -> None:
            events.append(["phase_closed", time.monotonic(), phase, seconds, dropped])
            inner.phase_closed(round_id, phase, seconds, dropped)

        def round_ended(self, round_id: int, outcome: str, seconds: float | None,
                        contributors: int = 0) -> None:
            events.append(["round_ended", time.monotonic(), outcome, seconds])
            inner.round_ended(round_id, outcome, seconds, contributors)

        def state(self, *args: Any) -> None:
            inner.state(*args)

    running.coordinator.listener = Recorder()
    registry, publish = running.coordinator.registry, running.coordinator.registry.publish

    def stamped_publish(*args: Any, **kwargs: Any) -> Any:
        # Fan-out is timed from the publication on (its watchers are woken once the round
        # has ended, server/coordinator.py `_announce`), so it includes the round's last
        # steps and is never negative.
        events.append(["publishing", time.monotonic()])
        return publish(*args, **kwargs)

    registry.publish = stamped_publish  # type: ignore[method-assign]
    if spec.get("profile"):  # CPU time per function over every thread (yappi, not a dependency)
        import yappi

        yappi.set_clock_type("cpu")
        yappi.start()
    _say({"port": running.port, **_memory()})
    for line in sys.stdin:
        command = json.loads(line)
        if command["cmd"] == "stop":
            if spec.get("profile"):
                yappi.stop()
                with open(spec["profile"], "w") as stream:
                    yappi.get_func_stats().sort("ttot").print_all(
                        out=stream, columns={0: ("name", 110), 1: ("ncall", 10),
                                             2: ("tsub", 8), 3: ("ttot", 8), 4: ("tavg", 8)})
            running.stop(grace=None)
            _say({"stopped": True})
            return
        watching = running.metrics.watchers._value.get()  # prometheus Gauge's value
        _say({**_memory(), "events": list(events), "watching": int(watching),
              "enrolled": len(running.coordinator.enrolments)})


def _plain_child(spec: dict[str, Any]) -> None:
    """W streams held open on a plain unary-stream method; `fire` releases the payload to
    all of them at once (thread-per-stream server, raw bytes)."""
    from concurrent import futures

    import grpc

    payload = bytes.fromhex(spec["payload_hex"])
    fire = threading.Event()
    lock = threading.Lock()
    waiting = [0]

    def wait(_request: bytes, context: grpc.ServicerContext):
        with lock:
            waiting[0] += 1
        fire.wait(spec["deadline"])
        yield payload

    from fleetmind.server.service import pending_call_options

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=spec["watchers"] + 16),
                         options=[("grpc.so_reuseport", 0),
                                  *pending_call_options(spec["watchers"] + 16)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "bench.Plain", {"Wait": grpc.unary_stream_rpc_method_handler(wait)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    _say({"port": port, **_memory()})
    fired = None
    for line in sys.stdin:
        command = json.loads(line)
        if command["cmd"] == "stop":
            server.stop(grace=None)
            _say({"stopped": True})
            return
        if command["cmd"] == "fire":
            fired = time.monotonic()
            fire.set()
        with lock:
            count = waiting[0]
        _say({**_memory(), "watching": count, "fired": fired})


def _watchers_child(spec: dict[str, Any]) -> None:
    import asyncio

    asyncio.run(_watchers(spec))


async def _watchers(spec: dict[str, Any]) -> None:
    """Enrol (aggregator mode) and open `count` streams; report each stream's first message
    (its time.monotonic and size) once all arrived or the deadline passed."""
    import asyncio

    import grpc
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fleetmind.aggregation.identity_proof import enroll_signed_bytes
    from fleetmind.protos.fleetmind.v1 import (
        fleet_pb2,
        fleet_pb2_grpc,
        models_pb2,
        models_pb2_grpc,
    )

    count, plain = spec["count"], spec["mode"] == "plain"
    channels = [grpc.aio.insecure_channel(spec["address"], options=OWN_CONNECTION)
                for _ in range(max(1, math.ceil(count / spec["per_channel"])))]
    enrol_seconds = 0.0
    if not plain:
        gate = asyncio.Semaphore(64)

        async def enrol(i: int) -> None:
            key = Ed25519PrivateKey.generate()
            public = key.public_key().public_bytes_raw()
            name = f"watcher-{i:05d}"
            async with gate:
                await fleet_pb2_grpc.FleetStub(channels[i % len(channels)]).Enroll(
                    fleet_pb2.EnrollRequest(site_name=name, identity_key=public,
                                            proof=key.sign(enroll_signed_bytes(name, public))),
                    timeout=spec["deadline"])
        started = time.monotonic()
        await asyncio.gather(*(enrol(i) for i in range(count)))
        enrol_seconds = time.monotonic() - started
    _say({"enrolled": 0 if plain else count, "enrol_seconds": enrol_seconds})

    received: list[tuple[float, int, bytes] | None] = [None] * count

    async def watch(i: int) -> None:
        channel = channels[i % len(channels)]
        if plain:
            call = channel.unary_stream("/bench.Plain/Wait")(b"", timeout=spec["deadline"])
        else:
            call = models_pb2_grpc.ModelsStub(channel).Watch(
                models_pb2.WatchRequest(after_version=spec["after_version"]),
                timeout=spec["deadline"])
        async for message in call:
            raw = message if plain else message.SerializeToString()
            received[i] = (time.monotonic(), len(raw), raw if i == 0 else b"")
            call.cancel()
            return

    tasks = [asyncio.ensure_future(watch(i)) for i in range(count)]
    _say({"opened": count})
    # Until every stream has its message, or `settle_s` pass without a new one once the
    # first arrived (streams the server never accepted wait forever), or the deadline.
    started = time.monotonic()
    while time.monotonic() - started < spec["deadline"]:
        await asyncio.sleep(0.2)
        got = [r for r in received if r is not None]
        if len(got) == count or (got and time.monotonic() - max(r[0] for r in got)
                                 > spec.get("settle_s", 10.0)):
            break
    errors = [repr(t.exception()) for t in tasks if t.done() and not t.cancelled()
              and t.exception() is not None]
    got = [r for r in received if r is not None]
    _say({"received": len(got), "first": min((r[0] for r in got), default=None),
          "last": max((r[0] for r in got), default=None),
          "bytes": got[0][1] if got else 0,
          "payload_hex": received[0][2].hex() if received[0] else "",
          "errors": errors[:3]})
    for task in tasks:
        task.cancel()
    for channel in channels:
        await channel.close()
    sys.stdin.readline()  # the parent's stop
    _say({"stopped": True})


# ---- the parent: sites, sizes, fits --------------------------------------------------


class _Sites:
    """Sites `first`..`first + count - 1`: keys, outboxes, updates and one channel each are
    made first; `run` starts one thread per site at once and returns what happened."""

    def __init__(self, address: str, first: int, count: int, work: Path,
                 deadline: float) -> None:
        import grpc
        import grpc._common
        import numpy as np
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from fleetmind.client.agent import SiteUpdate
        from fleetmind.client.outbox import Outbox
        from fleetmind.sim.bench import wire

        grpc._common.MAXIMUM_WAIT_TIMEOUT = SITE_WAKE_S
        work.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(first)
        self.first, self.count, self.deadline = first, count, deadline
        self.updates = [SiteUpdate(clip_norm=1.0, privacy_unit="session",
                                   delta={n: rng.uniform(-0.15, 0.15, s).astype(np.float32)
                                          for n, s in wire.SHAPES.items()},
                                   session_ids=(f"s{first + i}",)) for i in range(count)]
        self.keys = [Ed25519PrivateKey.generate() for _ in range(count)]
        self.outboxes = [Outbox(work / f"site-{first + i}.sqlite", k)
                         for i, k in enumerate(self.keys)]
        # Each site its own connection, as separate machines would have (channels in one
        # process otherwise share one TCP connection through gRPC's global subchannel pool).
        self.channels = [grpc.insecure_channel(address, options=OWN_CONNECTION)
                         for _ in range(count)]

    def run(self) -> dict[str, Any]:
        from fleetmind.client.agent import RoundResult, participate

        results: dict[int, Any] = {}
        latency: dict[int, float] = {}
        finished: dict[int, float] = {}

        def one(i: int) -> None:
            started = time.perf_counter()
            try:
                results[i] = participate(self.channels[i], self.keys[i],
                                         f"site-{self.first + i:05d}", self.updates[i],
                                         self.outboxes[i], add_noise=False,
                                         timeout=self.deadline)
            except BaseException as error:  # recorded in the result
                results[i] = error
            latency[i] = time.perf_counter() - started
            finished[i] = time.monotonic()

        threads = [threading.Thread(target=one, args=(i,), daemon=True)
                   for i in range(self.count)]
        cpu = os.times()
        start_mono = time.monotonic()
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(max(1.0, self.deadline * 4 + 30 - (time.monotonic() - start_mono)))
            after = os.times()
        finally:
            for channel in self.channels:
                channel.close()
            for outbox in self.outboxes:
                outbox.close()
        done = [r for r in results.values() if isinstance(r, RoundResult)]
        return {"count": self.count, "completed": len(done),
                "errors": [repr(r) for r in results.values()
                           if not isinstance(r, RoundResult)][:3]
                + ([] if len(results) == self.count else ["timed out"]),
                "versions": sorted({r.version for r in done}),
                "latencies": sorted(latency.values()), "started_mono": start_mono,
                "last_site_mono": max(finished.values(), default=start_mono),
                "cpu_seconds": after.user + after.system - cpu.user - cpu.system}


def _sites_child(spec: dict[str, Any]) -> None:
    sites = _Sites(spec["address"], spec["first"], spec["count"], Path(spec["work"]),
                   spec["deadline"])
    _say({"ready": True})
    sys.stdin.readline()  # go
    _say(sites.run())
    sys.stdin.readline()  # stop
    _say({"stopped": True})


def _run_sites(address: str, sites: int, work: Path, deadline: float,
               processes: int = 1) -> dict[str, Any]:
    """`sites` light sites, one thread and channel each, through one round at `address`,
    spread over `processes` processes (1: this one), all released together. The round's
    wall time runs from the first release to the last site returning."""
    share = [sites // processes + (1 if p < sites % processes else 0) for p in range(processes)]
    firsts = [sum(share[:p]) for p in range(processes)]
    parts: list[dict[str, Any]] = []
    if processes <= 1:
        parts.append(_Sites(address, 0, sites, work, deadline).run())
    else:
        children = [_Child("sites", {"address": address, "first": first, "count": count,
                                     "work": str(work / f"p{p}"), "deadline": deadline})
                    for p, (first, count) in enumerate(zip(firsts, share, strict=True))]
        try:
            for child in children:
                child.recv(CHILD_START_S + sites * 0.2)  # ready
            for child in children:
                assert child.process.stdin is not None
                child.process.stdin.write("go\n")
                child.process.stdin.flush()
            parts = [child.recv(deadline * 4 + 60) for child in children]
        finally:
            for child in children:
                child.close()
    completed = sum(p["completed"] for p in parts)
    errors = [e for p in parts for e in p["errors"]]
    versions = sorted({v for p in parts for v in p["versions"]})
    start = min(p["started_mono"] for p in parts)
    row: dict[str, Any] = {"sites": sites, "site_processes": processes, "completed": completed,
                           "feasible": completed == sites and not errors and len(versions) == 1,
                           "started_mono": start,
                           # the sites' processes: every site's crypto, encoding, gRPC client
                           "sites_cpu_seconds": sum(p["cpu_seconds"] for p in parts)}
    if row["feasible"]:
        times = sorted(t for p in parts for t in p["latencies"])
        last = max(p["last_site_mono"] for p in parts)
        row.update(round_seconds=last - start, site_mean_seconds=statistics.fmean(times),
                   site_p50_seconds=times[len(times) // 2], site_max_seconds=times[-1],
                   last_site_mono=last, version=versions[0])
    else:
        row.update(wall_seconds=max(p["last_site_mono"] for p in parts) - start,
                   errors=errors[:3] or ["timed out"])
    return row


def _phases(row: dict[str, Any], events: list[list[Any]]) -> dict[str, float]:
    """Seconds per step of the round, from the aggregator's events: join (sites started to
    the cohort formed: enrolment and JoinRound), each SecAgg+ phase, publish (last phase
    closed to the version published), deliver (published to the last site returning)."""
    phases: dict[str, float] = {}
    started = next((e[1] for e in events if e[0] == "round_started"), None)
    ended = next((e[1] for e in events if e[0] == "round_ended"), None)
    if started is not None:
        phases["join"] = started - row["started_mono"]
    last = started
    for event in events:
        if event[0] == "phase_closed":
            phases[event[2]] = event[3]
            last = event[1]
    if ended is not None and last is not None:
        phases["publish"] = ended - last
        if "last_site_mono" in row:
            phases["deliver"] = row["last_site_mono"] - ended
    return phases


def _memory_row(stats: dict[str, Any]) -> dict[str, Any]:
    return {"server_rss_mb": stats["rss_kb"] / 1024, "server_peak_rss_mb": stats["hwm_kb"] / 1024,
            "server_threads": stats["threads"], "server_cpu_seconds": stats["cpu_s"]}


def site_processes(sites: int) -> int:
    """Processes the sites of a cohort are spread over: at most SITES_PER_PROCESS threads
    each (one process of 1,000 site threads spends its time in the GIL, not the round)."""
    return max(1, min(MAX_SITE_PROCESSES, math.ceil(sites / SITES_PER_PROCESS)))


def bench_size(sites: int, work: Path, deadline: float, max_calls: int,
               wrap: list[str] | None = None, profile: Path | None = None,
               processes: int | None = None) -> dict[str, Any]:
    """One round of `sites` sites against a fresh aggregator child (`wrap`: a command the
    child runs under, such as py-spy; `profile`: where the child writes yappi's CPU profile
    of every thread)."""
    child = _Child("aggregator", {"sites": sites, "watchers": 0, "data": str(work / "data"),
                                  "deadline": deadline, "max_calls": max_calls,
                                  "profile": str(profile) if profile else None}, wrap)
    try:
        ready = child.recv(CHILD_START_S)
        idle = _memory_row(ready)
        row = _run_sites(f"127.0.0.1:{ready['port']}", sites, work / "sites", deadline,
                         processes or site_processes(sites))
        stats = child.ask({"cmd": "stats"})
    finally:
        child.close()
    row.update(_memory_row(stats))
    row["server_cpu_seconds"] -= idle["server_cpu_seconds"]
    row["server_idle_rss_mb"] = idle["server_rss_mb"]
    row["phases"] = _phases(row, stats["events"])
    for key in ("started_mono", "last_site_mono"):
        row.pop(key, None)
    return row


def _attach(child: _Child, watchers: int, deadline: float,
            stall_s: float = ATTACH_STALL_S) -> tuple[dict[str, Any], float]:
    """Polls `child` until `watchers` streams are open, the count has not grown for
    `stall_s`, or `deadline` passed; its last stats and the seconds waited."""
    started = grown = time.monotonic()
    seen = -1
    while True:
        stats = child.ask({"cmd": "stats"})
        now = time.monotonic()
        if stats["watching"] > seen:
            seen, grown = stats["watching"], now
        if seen >= watchers or now - grown > stall_s or now - started > deadline:
            return stats, now - started
        time.sleep(0.5)


def bench_watchers(sites: int, watchers: int, work: Path, deadline: float, max_calls: int,
                   per_channel: int, processes: int | None = None) -> dict[str, Any]:
    """A round of `sites` sites while `watchers` enrolled watchers watch; then the same
    announcement bytes to as many streams on a plain gRPC method."""
    result: dict[str, Any] = {"sites": sites, "watchers": watchers,
                              "watchers_per_channel": per_channel}
    aggregator = _Child("aggregator", {"sites": sites, "watchers": watchers,
                                       "data": str(work / "data"), "deadline": deadline,
                                       "max_calls": max_calls})
    watching = None
    try:
        ready = aggregator.recv(CHILD_START_S)
        address = f"127.0.0.1:{ready['port']}"
        watching = _Child("watchers", {"address": address, "count": watchers,
                                       "per_channel": per_channel, "after_version": 0,
                                       "mode": "aggregator", "deadline": deadline})
        enrolled = watching.recv(deadline)
        result["enrol_seconds"] = enrolled["enrol_seconds"]
        watching.recv(deadline)  # opened
        stats, result["attach_seconds"] = _attach(aggregator, watchers, deadline)
        result["watching_before_round"] = stats_before = stats["watching"]
        result["enrolled"] = stats["enrolled"]
        result.update({f"before_round_{k}": v for k, v in _memory_row(stats).items()
                       if k != "server_cpu_seconds"})
        row = _run_sites(address, sites, work / "sites", deadline,
                         processes or site_processes(sites))
        got = watching.recv(deadline + 30)
        stats = aggregator.ask({"cmd": "stats"})
    finally:
        if watching is not None:
            watching.close()
        aggregator.close()
    row["phases"] = _phases(row, stats["events"])
    result["round"] = {k: v for k, v in row.items() if k not in ("started_mono",
                                                                 "last_site_mono")}
    result.update(_memory_row(stats))
    published = next((e[1] for e in stats["events"] if e[0] == "publishing"), None)
    result.update(received=got["received"], announcement_bytes=got["bytes"],
                  watch_errors=got["errors"])
    if published is None or not got["received"] or not row["feasible"]:
        result.update(feasible=False)
        return result
    result.update(feasible=got["received"] == watchers,
                  fanout_seconds=got["last"] - published, attached=stats_before,
                  first_watcher_seconds=got["first"] - published)
    # The peer: the same bytes to as many streams as ours reached, on a plain
    # thread-per-stream gRPC server.
    count = got["received"]
    plain = _Child("plain", {"payload_hex": got["payload_hex"], "watchers": count,
                             "deadline": deadline})
    watching = None
    try:
        port = plain.recv(CHILD_START_S)["port"]
        watching = _Child("watchers", {"address": f"127.0.0.1:{port}", "count": count,
                                       "per_channel": per_channel, "after_version": 0,
                                       "mode": "plain", "deadline": deadline})
        watching.recv(deadline)  # enrolled (none: plain)
        watching.recv(deadline)  # opened
        plain_stats, _ = _attach(plain, count, deadline)
        result["plain_watching"] = plain_stats["watching"]
        fired = plain.ask({"cmd": "fire"})["fired"]
        plain_got = watching.recv(deadline + 30)
        plain_stats = plain.ask({"cmd": "stats"})
    finally:
        if watching is not None:
            watching.close()
        plain.close()
    result["plain_received"] = plain_got["received"]
    if plain_got["received"] == count:
        result.update(plain_fanout_seconds=plain_got["last"] - fired,
                      plain_server_rss_mb=plain_stats["rss_kb"] / 1024,
                      plain_server_threads=plain_stats["threads"])
        result["ratio_to_plain"] = result["plain_fanout_seconds"] / result["fanout_seconds"]
    result["plain"] = ("the same announcement bytes to as many streams held open on a plain "
                       "gRPC unary-stream method (thread-per-stream server, raw bytes), "
                       "released at once; its own child process")
    return result


def growth(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """growth_exponent (log-log least-squares slope over the feasible sizes), the slope
    between each pair of neighbouring sizes, and ratio_to_100 per size."""
    ok = [r for r in rows if r.get("feasible")]
    out: dict[str, Any] = {"growth_exponent": None, "local_exponents": [], "ratio_to_100": {}}
    if len(ok) >= 2:
        xs = [math.log(r["sites"]) for r in ok]
        ys = [math.log(r["round_seconds"]) for r in ok]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        out["growth_exponent"] = (sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
                                  / sum((x - mx) ** 2 for x in xs))
        out["local_exponents"] = [
            {"from": a["sites"], "to": b["sites"],
             "exponent": math.log(b["round_seconds"] / a["round_seconds"])
             / math.log(b["sites"] / a["sites"])} for a, b in itertools.pairwise(ok)]
    base = next((r for r in ok if r["sites"] == 100), None)
    if base is not None:
        out["ratio_to_100"] = {str(r["sites"]): r["round_seconds"] / base["round_seconds"]
                               for r in ok}
    return out


def _fits(rows: list[dict[str, Any]], sites: int, left: float) -> bool:
    """Whether a round of `sites` fits in `left` seconds at the growth seen so far (at
    least quadratic past two sizes, plus setup), with a 1.5x margin."""
    ok = [r for r in rows if r.get("feasible")]
    if not ok:
        return True
    last = ok[-1]
    exponent = max(2.0, growth(ok)["growth_exponent"] or 2.0)
    guess = last["round_seconds"] * (sites / last["sites"]) ** exponent + 0.02 * sites + 5
    return guess * 1.5 < left


def run(out: Path, sizes: tuple[int, ...] = DEFAULT_SIZES, watchers: int = DEFAULT_WATCHERS,
        watch_sites: int | None = None, download_watchers: int = DOWNLOAD_WATCHERS,
        time_limit: float = 1800.0, max_sites: int | None = None, max_calls: int | None = None,
        per_channel: int = 100, quick: bool = False,
        processes: int | None = None) -> dict[str, Any]:
    """Measure; write out/scale.json and out/scale.png; print the table; return the dict."""
    from fleetmind.sim.bench import wire

    began = time.monotonic()
    sizes = tuple(sorted(s for s in sizes if max_sites is None or s <= max_sites))
    work = Path(tempfile.mkdtemp(prefix="fleetmind-scale-"))
    rows: list[dict[str, Any]] = []
    try:
        for sites in sizes:
            left = time_limit - (time.monotonic() - began)
            if rows and not rows[-1].get("feasible"):
                rows.append({"sites": sites, "feasible": False, "skipped": True,
                             "errors": [f"skipped: {rows[-1]['sites']} sites failed"]})
                continue
            if not _fits(rows, sites, left):
                rows.append({"sites": sites, "feasible": False, "skipped": True,
                             "errors": [f"skipped: would not fit the {left:.0f} s left of "
                                        f"--time-limit {time_limit:g}"]})
                continue
            deadline = min(ROUND_DEADLINE_S, max(30.0, left))
            rows.append(bench_size(sites, work / f"round-{sites}", deadline,
                                   max_calls or max(64, sites), processes=processes))
            _print_row(rows[-1])
        feasible = [r["sites"] for r in rows if r.get("feasible")]
        watch: dict[str, Any] = {"watchers": watchers, "feasible": False}
        if watchers and feasible:
            n = min(watch_sites or max(feasible), max(feasible))
            left = time_limit - (time.monotonic() - began)
            watch = bench_watchers(n, watchers, work / "watchers",
                                   min(ROUND_DEADLINE_S, max(60.0, left)),
                                   max_calls or max(64, n), per_channel, processes)
        broadcast = (wire.bench_broadcast(download_watchers, work / "broadcast")
                     if download_watchers else None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"rounds": rows, **growth(rows), "watchers": watch, "broadcast": broadcast,
              "quick": quick, "cpus": os.cpu_count(),
              "largest_feasible_cohort": max(feasible) if feasible else 0,
              "time_limit_s": time_limit, "seconds": time.monotonic() - began,
              "sizes": list(sizes),
              "setup": "aggregator in its own process on 127.0.0.1; sites as threads, one "
                       f"channel each, in processes of at most {SITES_PER_PROCESS} (see "
                       "site_processes per row); watchers in a grpc.aio process"}
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "scale.png")
    print_table(result)
    return result


# ---- output --------------------------------------------------------------------------


def plot(result: dict[str, Any], path: Path) -> Path:
    """Round seconds (log-log, with a linear reference through the 100-site round) and the
    aggregator's RSS and peak RSS against cohort size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in result["rounds"] if r.get("feasible")]
    figure, (latency, memory) = plt.subplots(1, 2, figsize=(10, 3.8))
    if ok:
        xs = [r["sites"] for r in ok]
        latency.loglog(xs, [r["round_seconds"] for r in ok], "o-", label="round")
        # Linear growth from the 100-site round (the first size when there is none): the
        # smallest rounds are mostly fixed cost.
        base = next((r for r in ok if r["sites"] == 100), ok[0])
        latency.loglog(xs, [base["round_seconds"] * x / base["sites"] for x in xs], ":",
                       color="grey", label=f"linear from {base['sites']} sites")
        memory.plot(xs, [r["server_rss_mb"] for r in ok], "o-", label="RSS after the round")
        memory.plot(xs, [r["server_peak_rss_mb"] for r in ok], "s--", label="peak RSS")
    exponent = result.get("growth_exponent")
    latency.set_title("round latency" + (f" (slope {exponent:.2f})" if exponent else ""))
    latency.set_xlabel("sites in the round")
    latency.set_ylabel("seconds (loopback gRPC)")
    memory.set_title("aggregator memory")
    memory.set_xlabel("sites in the round")
    memory.set_ylabel("MB")
    if ok:
        latency.legend()
        memory.legend()
    figure.suptitle(f"one aggregator on {result['cpus']} CPUs")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _print_row(row: dict[str, Any]) -> None:
    if row.get("feasible"):
        phases = ", ".join(f"{k} {v:.2f}" for k, v in row["phases"].items())
        print(f"{row['sites']} sites: {row['round_seconds']:.2f} s ({phases}); server RSS "
              f"{row['server_rss_mb']:.0f} MB, peak {row['server_peak_rss_mb']:.0f} MB, "
              f"{row['server_cpu_seconds']:.1f} CPU s", flush=True)
    else:
        print(f"{row['sites']} sites: {row['errors'][0][:120]}", flush=True)


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table("sites", "round s", "×100-site", "server CPU s", "RSS MB", "peak MB",
                  "threads", "status",
                  title=f"one round per cohort size ({result['cpus']} CPUs); growth exponent "
                        f"{result['growth_exponent'] or float('nan'):.2f}")
    for row in result["rounds"]:
        if row.get("feasible"):
            ratio = result["ratio_to_100"].get(str(row["sites"]))
            table.add_row(str(row["sites"]), f"{row['round_seconds']:.2f}",
                          f"{ratio:.2f}" if ratio else "-", f"{row['server_cpu_seconds']:.1f}",
                          f"{row['server_rss_mb']:.0f}", f"{row['server_peak_rss_mb']:.0f}",
                          str(row["server_threads"]), "ok")
        else:
            table.add_row(str(row["sites"]), "-", "-", "-", "-", "-", "-",
                          row["errors"][0][:60])
    console.print(table)
    w = result["watchers"]
    if w.get("fanout_seconds") is not None:
        console.print(f"{w['watchers']} enrolled watchers during a {w['sites']}-site round: "
                      f"enrol {w['enrol_seconds']:.1f} s, fan-out {w['fanout_seconds']:.2f} s "
                      f"(plain {w.get('plain_fanout_seconds', float('nan')):.2f} s, ratio "
                      f"{w.get('ratio_to_plain', float('nan')):.2f}), round "
                      f"{w['round'].get('round_seconds', float('nan')):.2f} s, server RSS "
                      f"{w['server_rss_mb']:.0f} MB, {w['server_threads']} threads")
    elif w.get("watchers"):
        console.print(f"watchers: not measured or failed: {json.dumps(w)[:300]}")
    b = result["broadcast"]
    if b:
        console.print(f"download broadcast: {b['watchers']} watchers, {b['mb_per_s']:.0f} MB/s "
                      f"vs plain {b['plain_mb_per_s']:.0f} MB/s: ratio "
                      f"{b['ratio_to_plain']:.2f}; vs plain written as a site writes "
                      f"{b['plain_written_mb_per_s']:.0f} MB/s: ratio "
                      f"{b['ratio_to_plain_written']:.2f}")


def add_scale_command(commands: Any) -> None:
    """Adds `scale` to the `bench` sub-commands `commands` (sim/bench/cli.py's `sub`)."""
    scale = commands.add_parser(
        "scale", help="round latency and aggregator memory against cohort size; watchers",
        description="One round per cohort size (light synthetic sites over loopback gRPC, "
                    "the aggregator in its own process), then a round held with thousands of "
                    "enrolled watchers and their fan-out against a plain gRPC stream; writes "
                    "DIR/scale.json and DIR/scale.png.")
    scale.add_argument("--out", type=Path, required=True)
    scale.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)),
                       help="cohort sizes, comma-separated (default %(default)s)")
    scale.add_argument("--max-sites", type=int, default=None,
                       help="leave out sizes above this")
    scale.add_argument("--watchers", type=int, default=DEFAULT_WATCHERS,
                       help="enrolled watchers held during one round (0: none)")
    scale.add_argument("--watch-sites", type=int, default=None,
                       help="that round's cohort (default: the largest feasible size)")
    scale.add_argument("--download-watchers", type=int, default=DOWNLOAD_WATCHERS,
                       help="watchers downloading a version against a plain stream (0: skip)")
    scale.add_argument("--time-limit", type=float, default=1800.0,
                       help="seconds for all the rounds; sizes that would not fit are skipped")
    scale.add_argument("--max-calls", type=int, default=None,
                       help="the aggregator's limits.max_calls (default: max(64, sites))")
    scale.add_argument("--site-processes", type=int, default=None,
                       help="processes the sites run in (default: one per "
                            f"{SITES_PER_PROCESS} sites, at most {MAX_SITE_PROCESSES})")
    scale.add_argument("--quick", action="store_true",
                       help="sizes 3 and 5, 20 watchers, 5 downloading: a smoke run")
    scale.set_defaults(run=_bench_scale)


def _bench_scale(args: argparse.Namespace) -> int:
    if args.quick:
        run(args.out, (3, 5), 20, download_watchers=5, time_limit=args.time_limit, quick=True)
        return 0
    sizes = tuple(int(s) for s in args.sizes.split(",") if s.strip())
    run(args.out, sizes, args.watchers, args.watch_sites, args.download_watchers,
        args.time_limit, args.max_sites, args.max_calls, processes=args.site_processes)
    return 0
