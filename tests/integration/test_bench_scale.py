"""`fleetmind bench scale --quick`-sized run: cohorts of 3 and 5 light sites against an
aggregator in its own process, a few enrolled watchers and downloaders; scale.json has every
key, the plot is drawn, and the ratios are computed. No timing is asserted."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from fleetmind.sim.bench import report, scale


def test_tiny_scale_run_writes_json_plot_and_ratios(tmp_path: Path) -> None:
    result = scale.run(tmp_path, sizes=(3, 5), watchers=6, download_watchers=3,
                       time_limit=240, quick=True)
    assert json.loads((tmp_path / "scale.json").read_text()) == result
    assert (tmp_path / "scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["largest_feasible_cohort"] == 5 and result["sizes"] == [3, 5]
    for row, sites in zip(result["rounds"], (3, 5), strict=True):
        assert row["sites"] == sites and row["feasible"] and row["completed"] == sites
        for key in ("round_seconds", "server_rss_mb", "server_peak_rss_mb",
                    "site_max_seconds"):
            assert row[key] > 0, key
        assert row["server_peak_rss_mb"] >= row["server_idle_rss_mb"] > 0
        assert {"join", "advertise_keys", "share_keys", "masked_input_collection",
                "unmasking", "publish", "deliver"} <= set(row["phases"])
    assert math.isfinite(result["growth_exponent"])
    (local,) = result["local_exponents"]
    assert (local["from"], local["to"]) == (3, 5) and math.isfinite(local["exponent"])
    assert result["ratio_to_100"] == {}  # no 100-site round in this run

    watch = result["watchers"]
    assert watch["feasible"] and watch["sites"] == 5 and watch["enrolled"] >= 6
    assert watch["received"] == watch["attached"] == watch["plain_received"] == 6
    assert watch["announcement_bytes"] > 0
    # Measured, not judged: the aggregator stamps round_ended after the announcement may
    # already have reached the watchers, so on a loaded machine the fan-out can read <= 0.
    assert math.isfinite(watch["fanout_seconds"]) and math.isfinite(watch["plain_fanout_seconds"])
    assert watch["ratio_to_plain"] == watch["plain_fanout_seconds"] / watch["fanout_seconds"]
    broadcast = result["broadcast"]
    assert broadcast["watchers"] == 3 and broadcast["ratio_to_plain"] > 0
    rows = report.scale_rows(result)
    assert [r.measure for r in rows][-1].startswith("announce")
    assert [r.fleetmind for r in rows[:2]] == [row["round_seconds"] for row in result["rounds"]]
    assert all(r.target is None for r in rows)  # judged at 1,000 sites only
    assert report.build(tmp_path)["sources"] == {"scale": "scale.json"}  # reported alone


def test_growth_fit_and_ratio_to_the_100_site_round() -> None:
    rows = [{"sites": n, "feasible": True, "round_seconds": 0.01 * n ** 1.5}
            for n in (10, 100, 1000)]
    fit = scale.growth([*rows, {"sites": 2000, "feasible": False}])
    assert math.isclose(fit["growth_exponent"], 1.5)
    assert [round(e["exponent"], 6) for e in fit["local_exponents"]] == [1.5, 1.5]
    assert math.isclose(fit["ratio_to_100"]["1000"], 10 ** 1.5)
    assert fit["ratio_to_100"]["100"] == 1.0
    assert not scale._fits(rows, 100_000, left=60)
    judged = report.scale_rows({"rounds": [{**r, "server_peak_rss_mb": 1.0} for r in rows],
                                "watchers": {}, **fit})
    assert [r.met for r in judged] == [None, None, False]  # 31.6x the 100-site round
    assert judged[2].peer_value == rows[1]["round_seconds"]


def test_scale_is_a_bench_action() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="action")
    scale.add_scale_command(sub)
    args = parser.parse_args(["scale", "--out", "x", "--sizes", "10,50", "--max-sites", "40",
                              "--watchers", "7", "--time-limit", "60"])
    assert args.out == Path("x") and args.sizes == "10,50" and args.max_sites == 40
    assert args.watchers == 7 and args.time_limit == 60 and args.run is scale._bench_scale
