"""`fleetmind bench report`: one table of the headline comparisons, read from the JSON each
benchmark wrote in DIR (aggregation.json, consolidate.json, wire.json, and serve.json,
batched.json or scale.json when `bench serve`, `bench batched` or `bench scale` ran
there), so a folder's report can be rebuilt without measuring anything.
Writes DIR/report.json, DIR/report.md and DIR/wire.png (the one benchmark that draws no plot
itself; when wire.json is there).

Each row is one measure: fleetmind's value, the peer measured beside it in the same run, the
ratio, and the target where the benchmark's issue named one. A ratio is fleetmind ÷ peer,
except a speed-up (peer's seconds ÷ fleetmind's). Targets, as the benchmarks' own tables
state them: plain sum >= 0.5x memcpy; SecAgg+ not slower than Flower and <= 1.73x the bytes
of plain 16-bit values; recovery >= 0.90 and forgetting <= 2 points; >= 2x the TRL peer's
tokens distilled per second at <= 0.6x its peak tensor memory; proxy mode's p50 <= 1.05x its
upstream's at the most concurrent clients; batched distillation's deltas equal one unit at a
time's within 1e-4 of their size.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BENCHMARKS = ("aggregation", "consolidate", "wire")
# In the report when its JSON is in the folder (`bench all` runs none of them); a folder
# holding only these reports them alone, as `bench serve --out DIR` then `bench report`.
OPTIONAL = ("serve", "batched", "scale")


class MissingBenchmarkError(FileNotFoundError):
    """A benchmark's JSON is not in the folder; the message names the command that makes it."""


@dataclass(frozen=True)
class Target:
    """`subject` ("fleetmind" or "ratio") must be `op` (">=" or "<=") `bound`."""

    subject: str
    op: str
    bound: float

    def __post_init__(self) -> None:
        if self.subject not in ("fleetmind", "ratio") or self.op not in (">=", "<="):
            raise ValueError(f"target {self.subject} {self.op} {self.bound}: the subject is "
                             "'fleetmind' or 'ratio', the op '>=' or '<='")

    def met(self, fleetmind: float | None, ratio: float | None) -> bool | None:
        value = fleetmind if self.subject == "fleetmind" else ratio
        if value is None:
            return None  # not measured: neither met nor missed
        return value >= self.bound if self.op == ">=" else value <= self.bound

    def __str__(self) -> str:
        op = {">=": "≥", "<=": "≤"}[self.op]
        return f"{op} {self.bound:g}×" if self.subject == "ratio" else f"{op} {self.bound:g}"


@dataclass(frozen=True)
class Row:
    measure: str  # with its unit
    fleetmind: float | None  # None: not measured (the note says why)
    peer: str
    peer_value: float | None
    ratio: float | None
    speedup: bool = False  # ratio is peer ÷ fleetmind rather than fleetmind ÷ peer
    target: Target | None = None
    note: str = ""

    @property
    def met(self) -> bool | None:
        return self.target.met(self.fleetmind, self.ratio) if self.target else None


def load(folder: Path) -> dict[str, dict[str, Any]]:
    """Every benchmark's JSON in `folder`, by name; MissingBenchmarkError names what to run."""
    found = {}
    alone = not any((folder / f"{name}.json").is_file() for name in BENCHMARKS) and any(
        (folder / f"{name}.json").is_file() for name in OPTIONAL)
    for name in () if alone else BENCHMARKS:
        path = folder / f"{name}.json"
        if not path.is_file():
            raise MissingBenchmarkError(
                f"{path} not found: run `fleetmind bench {name} --out {folder}` "
                f"(or `fleetmind bench all --out {folder}` for every benchmark)")
        found[name] = json.loads(path.read_text())
    for name in OPTIONAL:
        path = folder / f"{name}.json"
        if path.is_file():
            found[name] = json.loads(path.read_text())
    return found


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    return ours / theirs if ours is not None and theirs else None


def aggregation_rows(result: dict[str, Any]) -> list[Row]:
    # The sum's target is a floor, so the worst size decides it; the others are in the JSON.
    worst = min(result["sum"], key=lambda r: r["ratio_to_memcpy"])
    rows = [Row(f"plain sum, GB/s (worst of {len(result['sum'])} sizes: {worst['updates']} "
                f"updates of {worst['parameters']:,} parameters)",
                worst["gbps"], "memcpy (np.copyto)", worst["memcpy_gbps"],
                worst["ratio_to_memcpy"], target=Target("ratio", ">=", 0.5))]
    for r in result["secagg"]:
        rows.append(Row(f"SecAgg+ round, s ({r['cohort']} sites, {r['dropout']:.0%} dropout, "
                        f"{r['parameters']:,} parameters)",
                        r["ours_seconds"], "Flower 1.42 SecAgg+ primitives", r["flower_seconds"],
                        _ratio(r["flower_seconds"], r["ours_seconds"]), speedup=True,
                        target=Target("ratio", ">=", 1.0)))
    # Bytes grow with dropouts (more shares revealed): the largest cohort at the highest
    # dropout is the worst case the 1.73x target has to hold for.
    r = max(result["secagg"], key=lambda r: (r["cohort"], r["dropout"]))
    plain16 = 2 * r["parameters"]
    ours_bytes = r["bytes_ratio_to_plain16"] * plain16
    where = f"{r['cohort']} sites, {r['dropout']:.0%} dropout"
    rows.append(Row(f"SecAgg+ bytes sent per site ({where})", ours_bytes,
                    "plain 16-bit values", plain16, r["bytes_ratio_to_plain16"],
                    target=Target("ratio", "<=", 1.73)))
    flower_bytes = r["flower_bytes_ratio_to_plain16"] * plain16
    rows.append(Row(f"SecAgg+ bytes sent per site ({where})", ours_bytes,
                    "Flower 1.42 SecAgg+ primitives", flower_bytes,
                    _ratio(ours_bytes, flower_bytes)))
    exact = result["exactness"]
    rows.append(Row(f"merge error, relative Frobenius ({exact['sites']} sites, rank "
                    f"{exact['rank']})", exact["ours_rel_error"], "FedIT (A, B averaged apart)",
                    exact["fedit_rel_error"], _ratio(exact["ours_rel_error"],
                                                     exact["fedit_rel_error"])))
    return rows


def consolidate_rows(result: dict[str, Any]) -> list[Row]:
    peer = result["peer"]
    # consolidate.run records a missing trl as peer["status"] and measures no peer: the
    # rows stay, saying so, and only fleetmind's own targets are judged.
    measured = "status" not in peer
    name = (f"TRL {peer['version']} SDFTTrainer" if measured
            else f"TRL SDFTTrainer: {peer['status']}")
    ours = result["ours"]

    def row(measure: str, ours_value: float, key: str, target: Target | None = None) -> Row:
        theirs = peer[key] if measured else None
        return Row(measure, ours_value, name, theirs, _ratio(ours_value, theirs),
                   target=target, note="" if measured else "peer not measured")

    # The cost targets are judged on the fair measures (consolidate.measured and
    # tensor_peak say why): tokens distilled per second, and peak tensor memory; the RSS above
    # the loaded model, every forward pass's tokens and the whole peak RSS stay beside them,
    # unjudged.
    return [row("consolidation recovery (closed-book ÷ teacher)", result["recovery"],
                "recovery", Target("fleetmind", ">=", 0.9)),
            row("consolidation forgetting, points of in-context accuracy",
                result["forgetting_points"], "forgetting_points", Target("fleetmind", "<=", 2)),
            row("consolidation throughput, tokens distilled/s",
                ours["distilled_tokens_per_s"], "distilled_tokens_per_s",
                Target("ratio", ">=", 2)),
            row("consolidation peak tensor memory, MB", ours["peak_tensor_mb"], "peak_tensor_mb",
                Target("ratio", "<=", 0.6)),
            row("consolidation peak memory above the loaded model, RSS MB",
                ours["peak_above_loaded_mb"], "peak_above_loaded_mb"),
            row("consolidation forward passes' input tokens/s", ours["tokens_per_s"],
                "tokens_per_s"),
            row("consolidation peak memory, RSS MB", ours["peak_rss_mb"], "peak_rss_mb")]


def wire_rows(result: dict[str, Any]) -> list[Row]:
    rows = []
    for r in result["rounds"]:
        # A round has no peer run beside it: the row is fleetmind's latency alone.
        if r["feasible"]:
            rows.append(Row(f"one round over loopback gRPC, s ({r['sites']} sites)",
                            r["round_seconds"], "", None, None))
        else:
            rows.append(Row(f"one round over loopback gRPC, s ({r['sites']} sites)", None, "",
                            None, None, note=f"infeasible: {r['errors'][0]}"))
    b = result["broadcast"]
    measure = (f"broadcast, MB/s ({b['watchers']} watchers, "
               f"{b['version_bytes'] / 1e6:.1f} MB version")
    rows.append(Row(f"{measure}; the peer keeps it in memory)", b["mb_per_s"],
                    "plain gRPC stream, same bytes", b["plain_mb_per_s"], b["ratio_to_plain"]))
    if "ratio_to_plain_written" in b:  # wire.json from 2026-12-07 on
        rows.append(Row(f"{measure}; the peer writes it as a site does)", b["mb_per_s"],
                        "plain gRPC stream, same bytes, written", b["plain_written_mb_per_s"],
                        b["ratio_to_plain_written"],
                        target=Target("ratio", ">=", b["target"]["bound"])))
    return rows


def serve_rows(result: dict[str, Any]) -> list[Row]:
    """Per concurrency level: the endpoint against its engine called in-process (p50 and
    requests/s), proxy mode against its upstream called directly (p50), and where the level
    has one, the same paired (both at once); the target judges `result["target"]["measure"]`
    at the most clients. At the most clients, the proxy's CPU per request against the
    upstream's, and capture on against off."""
    rows = []
    engine = "the engine called in-process"
    upstream = "its upstream called directly (a fleetmind endpoint)"
    top = result["levels"][-1]["concurrency"]
    judged = result["target"]["measure"]
    bound = Target("ratio", "<=", result["target"]["bound"])
    for level in result["levels"]:
        def judged_here(measure: str, level: dict[str, Any] = level) -> Target | None:
            return bound if level["concurrency"] == top and judged == measure else None

        arms = level["arms"]
        clients = f"{level['concurrency']} client{'s' if level['concurrency'] > 1 else ''}"
        ms = {arm: 1e3 * s["p50_s"] for arm, s in arms.items()}
        rows += [Row(f"endpoint p50 latency, ms ({clients}, capture on)", ms["endpoint"],
                     engine, ms["direct"], _ratio(ms["endpoint"], ms["direct"])),
                 Row(f"endpoint requests/s ({clients})", arms["endpoint"]["rps"], engine,
                     arms["direct"]["rps"], _ratio(arms["endpoint"]["rps"],
                                                   arms["direct"]["rps"])),
                 Row(f"proxy mode p50 latency, ms ({clients})", ms["proxy"], upstream,
                     ms["endpoint_no_capture"], _ratio(ms["proxy"], ms["endpoint_no_capture"]),
                     target=judged_here("proxy_p50_to_upstream"))]
        if level.get("paired"):
            pair = {side: 1e3 * s["p50_s"] for side, s in level["paired"].items()}
            rows.append(Row(f"proxy mode p50 latency paired, ms ({clients}: half through the "
                            "proxy, half direct, at once)", pair["proxy"],
                            "its upstream called directly at the same moments",
                            pair["upstream"], _ratio(pair["proxy"], pair["upstream"]),
                            target=judged_here("proxy_paired_p50_to_upstream")))
    arms = result["levels"][-1]["arms"]
    proxy_cpu = arms["proxy"]["cpu_ms_per_request"]["proxy"]
    upstream_cpu = arms["endpoint_no_capture"]["cpu_ms_per_request"]["endpoint_no_capture"]
    rows.append(Row(f"proxy mode CPU per request, ms ({top} clients)", proxy_cpu,
                    "the upstream's CPU per request", upstream_cpu,
                    _ratio(proxy_cpu, upstream_cpu)))
    for quantile in ("p50", "p99"):
        on, off = (1e3 * arms[arm][f"{quantile}_s"] for arm in ("endpoint", "endpoint_no_capture"))
        rows.append(Row(f"endpoint {quantile} latency with capture on, ms ({top} clients)", on,
                        "capture off", off, _ratio(on, off)))
    return rows


def batched_rows(result: dict[str, Any]) -> list[Row]:
    """Per arm of more than one unit a pass: its seconds per unit against one unit at a time
    (a speed-up), and how far its deltas are from one at a time's (judged: equal within
    float rounding)."""
    config, arms = result["config"], result["arms"]
    alone = arms[0]["seconds_per_unit"]
    rows = []
    for arm in arms[1:]:
        rows += [Row(f"distillation seconds per unit ({arm['units_per_pass']} units a pass, "
                     f"{config['sessions']} units, {config['steps']} steps, rank "
                     f"{config['rank']})", arm["seconds_per_unit"], "one unit at a time",
                     alone, _ratio(alone, arm["seconds_per_unit"]), speedup=True),
                 Row(f"largest difference of a unit's delta from one at a time's, relative "
                     f"({arm['units_per_pass']} units a pass)", arm["max_relative_difference"],
                     "", None, None, target=Target("fleetmind", "<=", 1e-4))]
    return rows


def scale_rows(result: dict[str, Any]) -> list[Row]:
    """Each cohort's round against the 100-site round (judged at 1,000 sites: the round
    should grow near linearly), and the fan-out to the watchers against a plain stream."""
    rounds = {r["sites"]: r for r in result["rounds"] if r.get("feasible")}
    rows = []
    for sites, r in sorted(rounds.items()):
        ratio = result["ratio_to_100"].get(str(sites))
        rows.append(Row(f"one round, s ({sites} sites; × the 100-site round)",
                        r["round_seconds"], "the 100-site round" if ratio else "",
                        rounds[100]["round_seconds"] if ratio else None, ratio,
                        target=Target("ratio", "<=", 10.0) if sites == 1000 else None,
                        note=f"aggregator peak RSS {r['server_peak_rss_mb']:.0f} MB"))
    watch = result["watchers"]
    if watch.get("ratio_to_plain") is not None:
        rows.append(Row(f"announce a version to {watch['watchers']} watchers, s",
                        watch["fanout_seconds"], "plain gRPC stream, same bytes",
                        watch["plain_fanout_seconds"], watch["ratio_to_plain"], speedup=True))
    return rows


ROWS: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
    "aggregation": aggregation_rows, "consolidate": consolidate_rows, "wire": wire_rows,
    "serve": serve_rows, "batched": batched_rows, "scale": scale_rows}


def build(folder: Path) -> dict[str, Any]:
    """The report of the benchmark JSON in `folder`, as report.json holds it."""
    results = load(folder)
    rows = [row for name, result in results.items() for row in ROWS[name](result)]
    return {
        "sources": {name: f"{name}.json" for name in results},
        "quick": {name: bool(r.get("quick", r.get("config", {}).get("quick")))
                  for name, r in results.items()},
        "cpus": next(iter(results.values())).get("cpus"),
        "plots": sorted(p.name for p in folder.glob("*.png")),
        "rows": [{**asdict(row), "target": str(row.target) if row.target else None,
                  "met": row.met} for row in rows],
    }


def _number(value: float | None) -> str:
    """Three significant digits (1.00, 0.368, 13.8), whole numbers from 100 up (thousands
    separated), tiny values in scientific form."""
    if value is None:
        return "—"
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.1e}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:#.3g}"


def markdown(report: dict[str, Any]) -> str:
    """report.md: the table, then what the ratios mean and which plots sit beside it."""
    lines = ["| measure | fleetmind | peer | peer value | ratio | target | met |",
             "|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        ratio = "—" if row["ratio"] is None else (
            f"{_number(row['ratio'])}× speed-up" if row["speedup"] else f"{_number(row['ratio'])}×")
        met = {True: "yes", False: "**no**", None: "—" if not row["target"] else "n/a"}
        ours = _number(row["fleetmind"]) if row["fleetmind"] is not None else row["note"]
        peer_value = (_number(row["peer_value"]) if row["peer_value"] is not None
                      else (row["note"] or "—") if row["peer"] else "—")
        lines.append(f"| {row['measure']} | {ours} | {row['peer'] or '—'} | {peer_value} | "
                     f"{ratio} | {row['target'] or '—'} | {met[row['met']]} |")
    quick = [name for name, q in report["quick"].items() if q]
    lines += ["", "Ratio: fleetmind ÷ peer, except speed-ups (peer's seconds ÷ fleetmind's). "
              f"Measured on {report['cpus']} CPUs, every peer in the same run as fleetmind."]
    if quick:
        lines.append(f"Quick (smoke-size) runs: {', '.join(quick)}; not for quoting.")
    if report["plots"]:
        lines.append(f"Plots beside this file: {', '.join(report['plots'])}.")
    return "\n".join(lines) + "\n"


def plot_wire(result: dict[str, Any], path: Path) -> Path:
    """Round time by cohort, and broadcast MB/s beside the plain stream's. The wire
    benchmark draws no plot of its own; this one needs only its JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r for r in result["rounds"] if r["feasible"]]
    b = result["broadcast"]
    figure, (latency, throughput) = plt.subplots(1, 2, figsize=(10, 3.8))
    latency.plot([r["sites"] for r in rounds], [r["round_seconds"] for r in rounds], "o-")
    latency.set_xlabel("sites in the round")
    latency.set_ylabel("round seconds (loopback gRPC)")
    bars = {"fleetmind\ndownload_latest": b["mb_per_s"], "plain gRPC\nstream": b["plain_mb_per_s"]}
    if "plain_written_mb_per_s" in b:
        bars["plain gRPC stream,\nwritten"] = b["plain_written_mb_per_s"]
    throughput.bar(list(bars), list(bars.values()),
                   color=["tab:blue", "tab:grey", "tab:olive"][:len(bars)])
    throughput.set_ylabel(f"MB/s, {b['watchers']} watchers at once")
    figure.suptitle(f"the wire, in one process on {result['cpus']} CPUs")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write(folder: Path) -> tuple[Path, Path]:
    """Build the report from `folder`'s JSON; write report.json, report.md and wire.png
    (when wire.json is there) there."""
    results = load(folder)
    if "wire" in results:
        plot_wire(results["wire"], folder / "wire.png")
    report = build(folder)
    json_path, md_path = folder / "report.json", folder / "report.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(markdown(report))
    return json_path, md_path
