"""`fleetmind bench serve`: what the site endpoint (`fleetmind client serve`) costs on top of
the model it serves, and what proxy mode costs on top of the upstream it forwards to.

Four arms on the toy model, each driven by C concurrent clients (C = 1, 8, 32) that send
greedy non-streaming chat completions, one closed-book question of the toy world each (a
different one per request, under its own user id, so each is a new session to capture):

- direct: the endpoint's own engine (`EmbeddedEngine`: the same decoding, the same lock)
  called in this process, no HTTP, no capture; the peer of
- endpoint: `client serve` embedded, capture on (the default), over HTTP;
- endpoint_no_capture: the same with capture off; the peer of `endpoint` for "capture
  never blocks a response", and the upstream proxy mode forwards to;
- proxy: `client serve --upstream` (capture on) in front of endpoint_no_capture; its peer
  is endpoint_no_capture called directly.

And, at every level of two clients or more, the proxy **paired** with its upstream: the C
clients run at once, every other one through the proxy and the rest straight to the
upstream, so both paths meet the same upstream queue at the same moments. The target is the
paired proxy p50 <= 1.05x the paired upstream p50 at 32 clients: on a shared machine the
same arm's p50 drifts by more than 5% from one block of requests to the next (docs/serving.md),
so only a comparison made at the same moments can resolve a 5% difference.

Each endpoint runs in a child process of its own (as a serving stack and the proxy in front
of it would), the clients in this process (httpx, asyncio). Each arm also records the CPU
milliseconds per request its endpoint processes spent: unlike latency, that does not depend
on what else runs on the machine, and on a machine with no core to spare the proxy's CPU is
what its added latency is made of. Per concurrency level the arms are measured `repeats`
times in rotating order and their latencies pooled, so a burst of load from elsewhere on the
machine falls on every arm alike. Writes DIR/serve.json and DIR/serve.png.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

CONCURRENCY = (1, 8, 32)
REQUESTS = 64  # per arm, concurrency level and repeat
REPEATS = 2
MAX_TOKENS = 16  # a toy-world answer is about ten tokens
ARMS = ("direct", "endpoint", "endpoint_no_capture", "proxy")
PROXY_TARGET = 1.05  # proxy p50 <= 1.05x the upstream's, at the highest concurrency

# ---- endpoints in child processes ------------------------------------------------------------


def _endpoint_child() -> None:
    """A child process: the endpoint of the ServeConfig fields in argv[1] on 127.0.0.1:0;
    prints {"url": ...}, answers each line on stdin with {"cpu_s": its CPU seconds so far}
    (every thread's, ended ones too, to the nanosecond), serves until its stdin closes."""
    from fleetmind.client.serve.runner import BackgroundServer
    from fleetmind.client.serve.settings import ServeConfig

    spec = json.loads(sys.argv[1])
    threads = spec.pop("threads")
    if "upstream" not in spec:  # a model here (a proxy starts faster without torch)
        import torch

        from fleetmind.sim.fleet import quiet

        quiet()  # the table is the output: no model-loading bars from the children
        torch.set_num_threads(threads)
    with BackgroundServer(ServeConfig(**spec)) as server:
        print(json.dumps({"url": server.url}), flush=True)
        for _ in sys.stdin:  # until the parent closes it; stopping drains the capture queue
            print(json.dumps({"cpu_s": time.process_time()}), flush=True)


class _Endpoint:
    def __init__(self, threads: int, **settings: Any) -> None:
        spec = {"listen": "127.0.0.1:0", "device": "cpu", "max_tokens": MAX_TOKENS,
                "threads": threads,
                **{k: str(v) if isinstance(v, Path) else v for k, v in settings.items()}}
        self.process = subprocess.Popen(
            [sys.executable, "-c",
             "from fleetmind.sim.bench.serve import _endpoint_child; _endpoint_child()",
             json.dumps(spec)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.url = ""

    def wait_started(self) -> None:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()  # the child's first line, or "" if it died
        if not line.startswith("{"):
            raise RuntimeError(f"an endpoint did not start (status {self.process.poll()})")
        self.url = json.loads(line)["url"]

    def cpu_seconds(self) -> float:
        """The child's CPU seconds so far, all its threads' (it answers each line)."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("cpu\n")
        self.process.stdin.flush()
        return float(json.loads(self.process.stdout.readline())["cpu_s"])

    def stop(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# ---- load ------------------------------------------------------------------------------------


def prompts(count: int) -> list[dict[str, Any]]:
    """`count` different request bodies: each a closed-book question of the toy world under
    its own user id."""
    from fleetmind.sim import world as W

    world = W.make_world(W.WorldSpec(seed=7, sites=4, facts_per_site=25))
    facts = [fact for _, fact in world.facts()]
    return [{"model": "fleetmind", "messages": W.closed_book_prompt(facts[i % len(facts)]),
             "temperature": 0, "max_tokens": MAX_TOKENS, "user": f"bench-user-{i:05d}"}
            for i in range(count)]


# The endpoint processes whose CPU an arm's requests spend (direct runs in this process).
SERVED_BY = {"direct": (), "endpoint": ("endpoint",),
             "endpoint_no_capture": ("endpoint_no_capture",),
             "proxy": ("proxy", "endpoint_no_capture")}


def stats(latencies: list[float], seconds: float, errors: int, cpu: dict[str, float]
          ) -> dict[str, Any]:
    """Latency quantiles, throughput, and the CPU milliseconds per request each endpoint
    process serving the arm spent: what the arm costs whatever else loads the machine."""
    if not latencies:
        raise RuntimeError(f"all {errors} requests of an arm failed")
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"requests": len(ordered), "errors": errors, "seconds": seconds,
            "rps": len(ordered) / seconds, "p50_s": statistics.median(ordered), "p99_s": p99,
            "mean_s": statistics.fmean(ordered),
            "cpu_ms_per_request": {name: 1e3 * used / (len(ordered) + errors)
                                   for name, used in cpu.items()}}


Call = Callable[[dict[str, Any]], Awaitable[None]]


async def _drive(calls: tuple[Call, ...], bodies: list[dict[str, Any]], concurrency: int
                 ) -> tuple[list[list[float]], float, list[int]]:
    """`concurrency` clients, client i calling `calls[i % len(calls)]`, each sending its
    next body once its last is answered, until every body is sent; (latencies per call,
    wall seconds, failed requests per call)."""
    pending = iter(bodies)
    latencies: list[list[float]] = [[] for _ in calls]
    errors = [0] * len(calls)

    async def client(which: int) -> None:
        for body in pending:
            started = time.perf_counter()
            try:
                await calls[which](body)
            except Exception:  # counted: a benchmark that hides failures measures nothing
                errors[which] += 1
                continue
            latencies[which].append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client(i % len(calls)) for i in range(concurrency)))
    return latencies, time.perf_counter() - started, errors


class _Direct:
    """The endpoint's engine in this process: what a request costs without the endpoint."""

    def __init__(self, model_dir: Path) -> None:
        from fleetmind.client.serve.engine import EmbeddedEngine
        from fleetmind.client.serve.metrics import ServeMetrics
        from fleetmind.client.serve.settings import ServeConfig
        from fleetmind.client.store import ChatFormat

        self.config = ServeConfig(model_dir=model_dir, device="cpu", max_tokens=MAX_TOKENS,
                                  capture=False)
        self.engine = EmbeddedEngine(self.config, ServeMetrics())
        self.fmt = ChatFormat(tools=self.config.tools)

    async def call(self, body: dict[str, Any]) -> None:
        from fleetmind.client.serve.protocol import ChatRequest

        chat = ChatRequest.parse(json.dumps(body).encode(), self.fmt)
        async with self.engine.serving(chat.model) as served:
            await self.engine.complete(chat, served)


async def _measure(direct: _Direct, endpoints: dict[str, _Endpoint], levels: tuple[int, ...],
                   requests: int, repeats: int, progress: Any) -> list[dict[str, Any]]:
    import httpx

    await direct.engine.start()
    bodies = prompts(requests * repeats * (len(ARMS) + 2) * len(levels))
    taken = 0
    limits = httpx.Limits(max_connections=2 * max(levels), max_keepalive_connections=2 * max(
        levels))
    async with httpx.AsyncClient(limits=limits, timeout=600) as http:
        async def post(url: str, body: dict[str, Any]) -> None:
            reply = await http.post(url + "/v1/chat/completions", json=body)
            reply.raise_for_status()
            if not reply.json()["choices"][0]["message"]["content"]:
                raise ValueError("an empty answer")

        calls: dict[str, Callable[[dict[str, Any]], Awaitable[None]]] = {
            "direct": direct.call,
            **{arm: functools.partial(post, e.url) for arm, e in endpoints.items()}}
        for call in calls.values():  # warm: the first request of each pays for lazy setup
            await call({**bodies[0], "user": "bench-warm-up"})
        task = progress.add_task("measuring", total=len(levels) * (repeats * len(ARMS) + 1))
        results = []
        for concurrency in levels:
            latencies: dict[str, list[float]] = {arm: [] for arm in ARMS}
            seconds, errors = dict.fromkeys(ARMS, 0.0), dict.fromkeys(ARMS, 0)
            cpu = {arm: dict.fromkeys(SERVED_BY[arm], 0.0) for arm in ARMS}
            for repeat in range(repeats):
                order = ARMS[repeat % len(ARMS):] + ARMS[:repeat % len(ARMS)]
                for arm in order:
                    progress.update(task, description=f"{concurrency} clients: {arm} "
                                                      f"(repeat {repeat + 1}/{repeats})")
                    before = {name: endpoints[name].cpu_seconds() for name in cpu[arm]}
                    (taken_latencies,), wall, (failed,) = await _drive(
                        (calls[arm],), bodies[taken:taken + requests], concurrency)
                    for name in cpu[arm]:
                        cpu[arm][name] += endpoints[name].cpu_seconds() - before[name]
                    taken += requests
                    latencies[arm] += taken_latencies
                    seconds[arm] += wall
                    errors[arm] += failed
                    progress.update(task, advance=1)
            arms = {arm: stats(latencies[arm], seconds[arm], errors[arm], cpu[arm])
                    for arm in ARMS}
            level: dict[str, Any] = {"concurrency": concurrency, "arms": arms,
                                     "ratios": ratios(arms), "paired": None}
            if concurrency >= 2:
                progress.update(task, description=f"{concurrency} clients: proxy and upstream "
                                                  "paired")
                level["paired"] = await _paired(calls["proxy"], calls["endpoint_no_capture"],
                                                bodies[taken:taken + 2 * requests * repeats],
                                                concurrency)
                taken += 2 * requests * repeats
                level["ratios"]["proxy_paired_p50_to_upstream"] = (
                    level["paired"]["proxy"]["p50_s"] / level["paired"]["upstream"]["p50_s"])
            progress.update(task, advance=1)
            results.append(level)
    return results


async def _paired(proxy: Call, upstream: Call, bodies: list[dict[str, Any]], concurrency: int
                  ) -> dict[str, Any]:
    """`concurrency` clients at once, every other one through the proxy and the rest straight
    to its upstream, over `bodies`: both paths meet the same upstream at the same moments."""
    (through_proxy, direct), wall, errors = await _drive((proxy, upstream), bodies, concurrency)
    return {"proxy": stats(through_proxy, wall, errors[0], {}),
            "upstream": stats(direct, wall, errors[1], {})}


def ratios(arms: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Each arm against its peer: latency and throughput ratios (fleetmind ÷ peer), and
    proxy mode's added p50 as a share of the upstream's."""
    endpoint, direct = arms["endpoint"], arms["direct"]
    upstream, proxy = arms["endpoint_no_capture"], arms["proxy"]
    return {
        "endpoint_p50_to_direct": endpoint["p50_s"] / direct["p50_s"],
        "endpoint_p99_to_direct": endpoint["p99_s"] / direct["p99_s"],
        "endpoint_rps_to_direct": endpoint["rps"] / direct["rps"],
        "capture_p50_on_to_off": endpoint["p50_s"] / upstream["p50_s"],
        "capture_p99_on_to_off": endpoint["p99_s"] / upstream["p99_s"],
        "proxy_p50_to_upstream": proxy["p50_s"] / upstream["p50_s"],
        "proxy_p99_to_upstream": proxy["p99_s"] / upstream["p99_s"],
        "proxy_added_p50_fraction": (proxy["p50_s"] - upstream["p50_s"]) / upstream["p50_s"],
        # Load-independent: CPU the proxy spends per request over what the upstream does.
        "proxy_cpu_to_upstream_cpu": proxy["cpu_ms_per_request"]["proxy"]
        / upstream["cpu_ms_per_request"]["endpoint_no_capture"],
        "capture_cpu_on_to_off": endpoint["cpu_ms_per_request"]["endpoint"]
        / upstream["cpu_ms_per_request"]["endpoint_no_capture"],
    }


def _target(top: dict[str, Any]) -> dict[str, Any]:
    """The issue's judgement: proxy p50 over the upstream's at the most clients, paired
    (the sequential arms' ratio only where the top level has one client)."""
    measure = "proxy_paired_p50_to_upstream" if top["paired"] else "proxy_p50_to_upstream"
    value = top["ratios"][measure]
    return {"measure": measure, "concurrency": top["concurrency"], "bound": PROXY_TARGET,
            "value": value, "met": value <= PROXY_TARGET}


def _stored_sessions(folder: Path) -> int:
    from fleetmind.client.store import SessionStore

    with SessionStore(folder) as store:
        return len(store)


def run(out: Path, quick: bool = False, concurrency: tuple[int, ...] | None = None,
        requests: int | None = None, repeats: int | None = None, threads: int = 1
        ) -> dict[str, Any]:
    """Measure every arm at every concurrency level; write out/serve.json and serve.png,
    print the table; return the dict."""
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from fleetmind.sim.basemodel import toy_model_path
    from fleetmind.sim.fleet import quiet

    quiet()
    levels = concurrency or ((1, 8) if quick else CONCURRENCY)
    requests = requests or (16 if quick else REQUESTS)
    repeats = repeats or (1 if quick else REPEATS)
    console = Console()
    torch.set_num_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="fleetmind-bench-serve-"))
    endpoints: dict[str, _Endpoint] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                  console=console) as progress:
        starting = progress.add_task("starting three endpoints and loading the toy model",
                                     total=None)
        try:
            model_dir = toy_model_path()
            # As many requests in flight as clients (more would be refused with 429): a
            # larger limit only makes the proxy's connection pool, and its upkeep, larger.
            limit = max(levels)
            for arm, settings in (("endpoint", {"data_dir": work / "endpoint"}),
                                  ("endpoint_no_capture", {"capture": False})):
                endpoints[arm] = _Endpoint(threads, model_dir=model_dir, max_concurrency=limit,
                                           **settings)
            direct = _Direct(model_dir)
            for endpoint in endpoints.values():
                endpoint.wait_started()
            endpoints["proxy"] = _Endpoint(threads, upstream=endpoints["endpoint_no_capture"].url,
                                           data_dir=work / "proxy", max_concurrency=limit)
            endpoints["proxy"].wait_started()
            progress.remove_task(starting)
            levels_measured = asyncio.run(_measure(direct, endpoints, levels, requests,
                                                   repeats, progress))
            for endpoint in endpoints.values():  # stopping drains their capture queues
                endpoint.stop()
            captured = {arm: _stored_sessions(work / arm) for arm in ("endpoint", "proxy")}
        finally:
            for endpoint in endpoints.values():
                endpoint.stop()
            shutil.rmtree(work, ignore_errors=True)
    top = levels_measured[-1]
    result = {
        "levels": levels_measured,
        # Every request an endpoint with capture on answered (and the warm-up) is a session.
        "captured_sessions": captured,
        "captured_expected": {"endpoint": 1 + sum(lv["arms"]["endpoint"]["requests"]
                                                  for lv in levels_measured),
                              "proxy": 1 + sum(lv["arms"]["proxy"]["requests"]
                                               + (lv["paired"]["proxy"]["requests"]
                                                  if lv["paired"] else 0)
                                               for lv in levels_measured)},
        "target": _target(top),
        "config": {"concurrency": list(levels), "requests": requests, "repeats": repeats,
                   "max_tokens": MAX_TOKENS, "threads": threads, "model": str(model_dir),
                   "quick": quick},
        "cpus": os.cpu_count(),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "serve.png")
    print_table(result, console)
    return result


def print_table(result: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    peers = {"endpoint": ("direct", "endpoint_p50_to_direct"),
             "endpoint_no_capture": ("endpoint", "capture_p50_on_to_off"),
             "proxy": ("endpoint_no_capture", "proxy_p50_to_upstream")}
    table = Table("clients", "arm", "req/s", "p50 ms", "p99 ms", "errors", "CPU ms/req",
                  "p50 ratio", "against",
                  title=f"bench serve: the toy model on {result['cpus']} CPUs "
                        f"({result['config']['requests']} requests x "
                        f"{result['config']['repeats']} per arm and level)")
    for level in result["levels"]:
        for arm, s in level["arms"].items():
            peer, key = peers.get(arm, ("", ""))
            ratio = f"{level['ratios'][key]:.3f}x" if key else "-"
            if arm == "endpoint_no_capture":  # the ratio there is capture on ÷ off
                ratio, peer = f"on/off {ratio}", "capture on vs off"
            used = " + ".join(f"{ms:.1f}" for ms in s["cpu_ms_per_request"].values())
            table.add_row(str(level["concurrency"]), arm, f"{s['rps']:.1f}",
                          f"{1e3 * s['p50_s']:.1f}", f"{1e3 * s['p99_s']:.1f}",
                          str(s["errors"]), used or "-", ratio, peer)
        for side, s in (level["paired"] or {}).items():
            ratio = (f"{level['ratios']['proxy_paired_p50_to_upstream']:.3f}x"
                     if side == "proxy" else "-")
            table.add_row(str(level["concurrency"]), f"paired {side}", f"{s['rps']:.1f}",
                          f"{1e3 * s['p50_s']:.1f}", f"{1e3 * s['p99_s']:.1f}",
                          str(s["errors"]), "-", ratio,
                          "paired upstream" if side == "proxy" else "")
    console.print(table)
    target = result["target"]
    top = result["levels"][-1]["ratios"]
    paired = "paired " if target["measure"] == "proxy_paired_p50_to_upstream" else ""
    console.print(f"{paired}proxy p50 ÷ upstream p50 at {target['concurrency']} clients: "
                  f"{target['value']:.3f} (target ≤ {target['bound']}: "
                  f"{'met' if target['met'] else 'NOT met'}); the proxy's CPU per request "
                  f"÷ the upstream's: {top['proxy_cpu_to_upstream_cpu']:.3f}; sessions "
                  f"captured {result['captured_sessions']} of {result['captured_expected']}")


def plot(result: dict[str, Any], path: Path) -> Path:
    """p50 latency and requests per second by concurrency, every arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = result["levels"]
    x = [level["concurrency"] for level in levels]
    figure, (latency, throughput) = plt.subplots(1, 2, figsize=(11, 4))
    for arm in ARMS:
        latency.plot(x, [1e3 * lv["arms"][arm]["p50_s"] for lv in levels], marker="o",
                     label=arm)
        throughput.plot(x, [lv["arms"][arm]["rps"] for lv in levels], marker="o", label=arm)
    paired = [lv for lv in levels if lv["paired"]]
    for side in ("proxy", "upstream"):
        latency.plot([lv["concurrency"] for lv in paired],
                     [1e3 * lv["paired"][side]["p50_s"] for lv in paired], marker="x",
                     linestyle="--", label=f"paired: {side}")
    for axis, label in ((latency, "p50 latency, ms"), (throughput, "requests per second")):
        axis.set(xscale="log", xlabel="concurrent clients", ylabel=label)
        axis.set_xticks(x, labels=[str(c) for c in x])
        axis.legend()
    figure.suptitle(f"fleetmind client serve on the toy model, {result['cpus']} CPUs")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
