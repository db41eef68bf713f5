"""`fleetmind bench wire --quick`: 10 sites in one loopback round and 10 watchers downloading
a published version; wire.json has every key, with positive numbers."""

from __future__ import annotations

import json
from pathlib import Path

from fleetmind.sim.bench import wire


def test_quick_wire_bench_writes_positive_numbers(tmp_path: Path) -> None:
    result = wire.run(tmp_path, quick=True)
    assert json.loads((tmp_path / "wire.json").read_text()) == result
    assert result["quick"] is True
    assert result["largest_feasible_cohort"] == 10
    (row,) = result["rounds"]
    assert row["sites"] == 10 and row["feasible"] and row["completed"] == 10
    assert row["version"] == 1
    for key in ("round_seconds", "site_mean_seconds", "site_p50_seconds", "site_max_seconds"):
        assert row[key] > 0, key
    broadcast = result["broadcast"]
    assert broadcast["watchers"] == 10
    assert broadcast["version_bytes"] >= broadcast["b_bytes"] > 2**20
    for key in ("seconds", "mb_per_s", "plain_seconds", "plain_mb_per_s", "ratio_to_plain"):
        assert broadcast[key] > 0, key


def test_wire_is_a_bench_action() -> None:
    import argparse

    from fleetmind.sim.bench.cli import add_bench_commands

    parser = argparse.ArgumentParser()
    add_bench_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "wire", "--out", "x", "--quick"])
    assert args.action == "wire" and args.quick and args.out == Path("x")
