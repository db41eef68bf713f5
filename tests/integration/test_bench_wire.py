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
    for key in ("seconds", "mb_per_s", "plain_seconds", "plain_mb_per_s", "ratio_to_plain",
                "plain_written_seconds", "plain_written_mb_per_s", "ratio_to_plain_written"):
        assert broadcast[key] > 0, key
    assert broadcast["ratio_to_plain_written"] == (broadcast["plain_written_seconds"]
                                                   / broadcast["seconds"])
    target = broadcast["target"]
    assert target["measure"] == "ratio_to_plain_written" and target["bound"] == 0.5
    assert target["met"] is (broadcast["ratio_to_plain_written"] >= 0.5)


def test_the_written_plain_peer_writes_the_version_files(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 40
    files = [("a.bin", 1000), ("b.json", len(payload) - 1000)]
    seconds = wire._plain_stream_seconds(payload, 3, files, tmp_path)
    assert seconds > 0
    for i in range(3):
        folder = tmp_path / f"plain-{i:03d}"
        assert (folder / "a.bin").read_bytes() == payload[:1000]
        assert (folder / "b.json").read_bytes() == payload[1000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"plain-{i:03d}" for i in range(3)]


def test_wire_is_a_bench_action() -> None:
    import argparse

    from fleetmind.sim.bench.cli import add_bench_commands

    parser = argparse.ArgumentParser()
    add_bench_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "wire", "--out", "x", "--quick"])
    assert args.action == "wire" and args.quick and args.out == Path("x")
