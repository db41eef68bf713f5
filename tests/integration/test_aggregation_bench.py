"""The aggregation benchmark's pieces on tiny sizes: right keys, sane numbers, its CLI."""

import pytest

from fleetmind.cli.main import Parser
from fleetmind.sim.bench import aggregation
from fleetmind.sim.bench.cli import add_bench_commands


def test_exactness_ours_is_float_rounding_fedit_is_not() -> None:
    result = aggregation.bench_exactness(sites=8, rank=4, d_in=64, d_out=64)
    assert result["ours_rel_error"] < 1e-6
    assert result["fedit_rel_error"] > 0.1


def test_secagg_row_against_flower() -> None:
    row = aggregation.bench_secagg(cohort=8, dropout=0.3, parameters=256)
    for key in ("cohort", "dropout", "ours_seconds", "flower_seconds", "bytes_ratio_to_plain16"):
        assert key in row
    assert row["ours_seconds"] > 0 and row["flower_seconds"] > 0


def test_sum_row() -> None:
    row = aggregation.bench_sum(updates=4, parameters=4096, repeats=1)
    assert set(row) >= {"updates", "parameters", "gbps", "ratio_to_memcpy"}
    assert row["gbps"] > 0


def test_bench_command_parses() -> None:
    parser = Parser(prog="fleetmind")
    add_bench_commands(parser.add_subparsers(dest="command", required=True, parser_class=Parser))
    args = parser.parse_args(["bench", "aggregation", "--out", "x", "--quick"])
    assert args.quick and str(args.out) == "x"
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(["bench", "aggregation"])
    assert stop.value.code == 2
