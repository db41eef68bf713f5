"""`fleetmind bench batched`: arms side by side with one unit at a time, in one run."""

import json

from fleetmind.sim.bench import batched


def test_the_batched_bench_compares_every_arm_with_one_unit_at_a_time(tmp_path) -> None:
    result = batched.run(tmp_path, sessions=3, steps=1, arms=[2], repeats=1)
    written = json.loads((tmp_path / "batched.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert (tmp_path / "batched.png").stat().st_size > 0
    assert written["config"]["units_per_pass"] == [1, 2]  # the peer always runs
    one, two = written["arms"]
    assert (one["units_per_pass"], two["units_per_pass"]) == (1, 2)
    assert one["max_relative_difference"] == 0.0
    assert two["max_relative_difference"] < 1e-4  # batching changes the cost, not the deltas
    assert two["speedup_vs_one_at_a_time"] == round(one["seconds"] / two["seconds"], 2)
    assert two["seconds_per_unit"] == round(two["seconds"] / 3, 3)
    assert all(arm["peak_rss_mb"] > 0 for arm in written["arms"])


def test_a_world_too_small_is_refused_before_any_arm_runs(tmp_path) -> None:
    import pytest

    with pytest.raises(ValueError, match="lexicon holds at most"):
        batched.run(tmp_path, sessions=100000, steps=1, arms=[2], repeats=1)
    assert not (tmp_path / "batched.json").exists()
