"""The consolidation benchmark's measure (sim/bench/consolidate.py `measured`) and its table of
ratios against the peer."""

import mmap
from typing import Any

import pytest
import torch
from rich.console import Console

from fleetmind.sim.bench import consolidate


class Counted(torch.nn.Module):
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return input_ids.float()


def touched(megabytes: int) -> mmap.mmap:
    """Fresh resident pages: an anonymous map, since malloc may hand back memory that earlier
    tests left resident, which adds nothing to the RSS."""
    block = mmap.mmap(-1, megabytes * 2**20)
    block.write(b"\1" * len(block))
    return block


def test_measured_counts_what_a_method_distils_and_the_memory_it_adds() -> None:
    model = Counted()
    touched(192).close()  # a peak before the block, as loading a model may set, then freed
    with consolidate.measured(model) as cost:
        model(input_ids=torch.zeros((3, 5), dtype=torch.long))
        model(torch.zeros((2, 4), dtype=torch.long))
        cost["distilled_tokens"] += 7  # the method adds what entered its loss
        block = touched(64)
    block.close()
    assert cost["tokens"] == 3 * 5 + 2 * 4  # every forward pass's input positions
    # Both over the same wall time; each rate is rounded to 0.1, which on a slow machine
    # (a low rate) is more than rel=1e-3 of it.
    assert 0 < cost["distilled_tokens_per_s"] == pytest.approx(
        cost["tokens_per_s"] * 7 / 23, rel=1e-3, abs=0.05 * (1 + 7 / 23))
    assert cost["peak_above_loaded_mb"] == pytest.approx(
        cost["peak_rss_mb"] - cost["rss_loaded_mb"], abs=0.2)
    assert cost["peak_reset"]
    assert 60 <= cost["peak_above_loaded_mb"] < 150  # the block's 64 MB, not the earlier 192
    model(input_ids=torch.zeros((1, 9), dtype=torch.long))
    assert cost["tokens"] == 23  # the count stops with the block


def test_tensor_peak_is_the_most_that_tensors_made_in_the_block_held_at_once() -> None:
    before = torch.ones(2**20)  # 4 MB from before the block: not counted
    with consolidate.tensor_peak() as peak:
        first = torch.ones(2**20)  # 4 MB
        second = torch.ones(2**21)  # 8 MB more: 12 MB live
        del first, second
        third = torch.ones(2**20)  # 4 MB, after the peak
        del before  # freed inside the block, allocated before it
    assert 12 <= peak["peak_tensor_mb"] < 12.1
    assert third.numel() == 2**20


def test_tensor_peak_agrees_with_torch_profilers_allocation_record() -> None:
    """Training steps (views of the weights, in-place updates, backward, an optimiser's
    state made on its first step): the live-storage count gives the profiler's peak."""
    from torch.profiler import ProfilerActivity, profile

    from fleetmind.sim.bench.tensor_memory import LiveTensorBytes

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 64))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(32, 64)

    def steps() -> None:
        for _ in range(3):
            model(x).pow(2).sum().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    steps()  # the optimiser's state exists before either measure
    with LiveTensorBytes() as meter:
        steps()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        steps()
    live = most = 0
    for _, nbytes in sorted((event.start_ns(), event.nbytes())
                            for event in profiler.profiler.kineto_results.events()
                            if event.name() == "[memory]"):
        live += nbytes
        most = max(most, live)
    assert most > 100_000  # the activations and gradients of a step, at least
    # To within a few bytes: scalars made from Python numbers (no op makes them) escape it.
    assert abs(meter.peak - most) <= 64
    assert meter.live == 0  # everything the steps made was freed again


def test_a_methods_cost_is_each_measures_median_over_its_runs() -> None:
    runs = [{"seconds": 12.0, "distilled_tokens_per_s": 1000.0},
            {"seconds": 10.0, "distilled_tokens_per_s": 1400.0},
            {"seconds": 30.0, "distilled_tokens_per_s": 1200.0}]  # one slow run: outvoted
    assert consolidate.median_cost(runs) == {"seconds": 12.0, "distilled_tokens_per_s": 1200.0}


def test_cost_table_puts_the_targets_on_the_fair_measures() -> None:
    cost = {"distilled_tokens_per_s": 900.0, "peak_tensor_mb": 10.0, "peak_above_loaded_mb": 60.0,
            "tokens_per_s": 15000.0, "peak_rss_mb": 470.0, "seconds": 30.0}
    peer: dict[str, Any] = {"name": "trl.experimental.sdft.SDFTTrainer",
                            "distilled_tokens_per_s": 300.0, "peak_tensor_mb": 20.0,
                            "peak_above_loaded_mb": 120.0, "tokens_per_s": 25000.0,
                            "peak_rss_mb": 540.0, "seconds": 20.0}
    ratios = {key: round(cost[key] / peer[key], 2) for key, _, _ in consolidate.COST_MEASURES}
    console = Console(width=100, record=True)
    console.print(consolidate._cost_table(cost, peer, ratios, consolidate.COST_MEASURES))
    lines = console.export_text().splitlines()
    distilled = next(line for line in lines if "distilled tokens/s" in line)
    assert "3.00×" in distilled and "≥ 2×" in distilled
    tensors = next(line for line in lines if "tensor memory" in line)
    assert "0.50×" in tensors and "≤ 0.6×" in tensors
    above = next(line for line in lines if "above loaded" in line)
    assert "0.50×" in above and "≤" not in above  # kept, not judged
    forward = next(line for line in lines if "forward tokens/s" in line)
    assert "0.60×" in forward and "≥" not in forward  # kept, not judged
