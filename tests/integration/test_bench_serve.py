"""`fleetmind bench serve`, tiny: three endpoints in child processes and the engine in this
one, two concurrency levels of a few requests; serve.json's structure, every ratio computed
from the measured values beside it, every captured request stored, and the report's rows."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from support.bench_results import bench_folder

from fleetmind.cli.main import main
from fleetmind.sim.bench import report, serve


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bench-serve")
    return out, serve.run(out, concurrency=(1, 2), requests=3, repeats=1)


def test_serve_json_holds_every_arm_and_ratios_of_measured_values(measured) -> None:
    out, result = measured
    assert json.loads((out / "serve.json").read_text()) == result
    assert (out / "serve.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert result["config"]["concurrency"] == [1, 2] and result["config"]["requests"] == 3
    assert [level["concurrency"] for level in result["levels"]] == [1, 2]
    for level in result["levels"]:
        arms = level["arms"]
        assert set(arms) == set(serve.ARMS)
        for arm, s in arms.items():
            assert s["requests"] == 3 and s["errors"] == 0, arm
            assert s["rps"] == pytest.approx(s["requests"] / s["seconds"]), arm
            assert 0 < s["p50_s"] <= s["p99_s"], arm
            assert set(s["cpu_ms_per_request"]) == set(serve.SERVED_BY[arm]), arm
            assert all(ms > 0 for ms in s["cpu_ms_per_request"].values()), arm
        assert {k: v for k, v in level["ratios"].items()
                if k != "proxy_paired_p50_to_upstream"} == pytest.approx(serve.ratios(arms))
    one, two = result["levels"]
    # One client cannot be split between the proxy and its upstream; two are, one each,
    # over 2 x requests x repeats bodies between them.
    assert one["paired"] is None and "proxy_paired_p50_to_upstream" not in one["ratios"]
    paired = two["paired"]
    assert paired["proxy"]["requests"] + paired["upstream"]["requests"] == 6
    assert paired["proxy"]["requests"] >= 1 and paired["upstream"]["requests"] >= 1
    assert paired["proxy"]["errors"] == paired["upstream"]["errors"] == 0
    assert two["ratios"]["proxy_paired_p50_to_upstream"] == pytest.approx(
        paired["proxy"]["p50_s"] / paired["upstream"]["p50_s"])
    target = result["target"]
    assert target["concurrency"] == 2 and target["bound"] == 1.05
    assert target["measure"] == "proxy_paired_p50_to_upstream"
    assert target["value"] == two["ratios"]["proxy_paired_p50_to_upstream"]
    assert target["met"] is (target["value"] <= 1.05)
    # Every answered request (and each endpoint's warm-up) became a session: 1 + 3 + 3 at
    # the endpoint, and the paired requests through the proxy too.
    assert result["captured_sessions"] == result["captured_expected"] == {
        "endpoint": 7, "proxy": 7 + paired["proxy"]["requests"]}


def test_the_report_turns_serve_json_into_rows(measured, tmp_path: Path) -> None:
    _, result = measured
    folder = bench_folder(tmp_path, serve=result)
    built = report.build(folder)
    assert built["sources"]["serve"] == "serve.json"
    rows = [row for row in built["rows"] if "endpoint" in row["measure"]
            or "proxy" in row["measure"]]
    # Three a level, the paired proxy at 2 clients; at the top level the proxy's CPU, and
    # capture on against off.
    assert len(rows) == 3 * 2 + 1 + 1 + 2
    for row in rows:
        assert row["ratio"] == pytest.approx(row["fleetmind"] / row["peer_value"])
    judged = [row for row in rows if row["target"]]
    (proxy,) = judged  # only the top level's paired proxy row carries the target
    assert "2 clients" in proxy["measure"] and "paired" in proxy["measure"]
    assert proxy["target"] == "≤ 1.05×"
    assert proxy["ratio"] == pytest.approx(result["target"]["value"])
    assert proxy["met"] is result["target"]["met"]
    assert "| proxy mode p50 latency, ms (2 clients) |" in report.markdown(built)
    # Without serve.json the report is the other benchmarks' alone.
    (folder / "serve.json").unlink()
    assert not [row for row in report.build(folder)["rows"] if "proxy" in row["measure"]]


def test_a_folder_of_serve_json_alone_is_reported(measured, tmp_path: Path, capsys) -> None:
    _, result = measured
    (tmp_path / "serve.json").write_text(json.dumps(result))
    assert main(["bench", "report", "--out", str(tmp_path)]) == 0
    written = json.loads((tmp_path / "report.json").read_text())
    assert written["sources"] == {"serve": "serve.json"}
    assert written["rows"] == report.build(tmp_path)["rows"] and written["cpus"] == result["cpus"]
    assert len(written["rows"]) == 3 * 2 + 1 + 1 + 2
    assert "| proxy mode p50 latency, ms (2 clients) |" in capsys.readouterr().out
    assert not (tmp_path / "wire.png").exists()


def test_serve_is_a_bench_action() -> None:
    from fleetmind.sim.bench.cli import add_bench_commands

    parser = argparse.ArgumentParser()
    add_bench_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "serve", "--out", "x", "--requests", "5"])
    assert args.action == "serve" and args.requests == 5 and args.out == Path("x")


def test_ratios_set_each_arm_against_its_peer() -> None:
    def arm(p50: float, p99: float, rps: float, **cpu: float) -> dict:
        return {"p50_s": p50, "p99_s": p99, "rps": rps, "cpu_ms_per_request": cpu}

    arms = {"direct": arm(1.0, 2.0, 10.0, direct=1.0),
            "endpoint": arm(2.0, 5.0, 5.0, endpoint=6.0),
            "endpoint_no_capture": arm(1.6, 4.0, 6.0, endpoint_no_capture=4.0),
            "proxy": arm(2.0, 8.0, 5.0, proxy=1.0)}
    assert serve.ratios(arms) == pytest.approx({
        "endpoint_p50_to_direct": 2.0, "endpoint_p99_to_direct": 2.5,
        "endpoint_rps_to_direct": 0.5, "capture_p50_on_to_off": 1.25,
        "capture_p99_on_to_off": 1.25, "proxy_p50_to_upstream": 1.25,
        "proxy_p99_to_upstream": 2.0, "proxy_added_p50_fraction": 0.25,
        "proxy_cpu_to_upstream_cpu": 0.25, "capture_cpu_on_to_off": 1.5})
