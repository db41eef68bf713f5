"""`bench consolidate --model DIR` on a device and in a dtype (sim/bench/consolidate.py
`run_cost`, sim/bench/peer_sdft.py `precision_args`), and `--memory-only`: checked on the CPU,
each method's training faked but in the last test, so no GPU is needed."""

import importlib.util
import json

import pytest
import torch

from fleetmind.cli.main import main
from fleetmind.client.distill_config import DistillConfig
from fleetmind.sim.bench import consolidate, peer_sdft

PEER_INSTALLED = importlib.util.find_spec("trl") is not None
METHODS = ["ours", "peer"] if PEER_INSTALLED else ["ours"]


@pytest.mark.parametrize(("device", "dtype", "expected"), [
    ("cpu", "fp32", {"use_cpu": True, "bf16": False, "fp16": False}),
    ("cuda", "bf16", {"use_cpu": False, "bf16": True, "fp16": False}),
    ("cuda", "fp16", {"use_cpu": False, "bf16": False, "fp16": True}),
])
def test_the_peer_trains_where_ours_does_in_its_precision(device, dtype, expected) -> None:
    cfg = DistillConfig(device=device, dtype=dtype)
    assert peer_sdft.precision_args(cfg) == expected


@pytest.mark.skipif(not PEER_INSTALLED, reason="the peer, TRL, is the `bench` extra")
def test_the_peers_config_takes_those_flags_over_trls_bf16_default(tmp_path) -> None:
    """On the CPU, where TrainingArguments accepts bf16 (it refuses it on a missing GPU)."""
    fp32 = peer_sdft.sdft_config(DistillConfig(top_k=0), tmp_path)
    assert fp32.use_cpu and not fp32.bf16 and not fp32.fp16  # TRL's own default is bf16
    bf16 = peer_sdft.sdft_config(DistillConfig(top_k=0, dtype="bf16"), tmp_path)
    assert bf16.use_cpu and bf16.bf16 and not bf16.fp16


class FakeTraining:
    """`peer_sdft.train_in_subprocess` without training: records each call and returns the
    measures that `measured` takes, the memory run's on the device it was asked for, ours at
    half the peer's."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, str, str, bool]] = []

    def __call__(self, method, model_dir, sessions, cfg, workdir, threads=1, tensors=False):
        self.calls.append((method, cfg.steps, cfg.device, cfg.dtype, tensors))
        cost = {key: 1.0 for key, _, _ in consolidate.COST_MEASURES if key != "peak_tensor_mb"}
        if tensors:
            memory = "peak_cuda_mb" if cfg.device == "cuda" else "peak_tensor_mb"
            cost[memory] = {"ours": 300.0, "peer": 600.0}[method]
        return {}, cost


@pytest.fixture
def fake_training(monkeypatch) -> FakeTraining:
    fake = FakeTraining()
    monkeypatch.setattr(peer_sdft, "train_in_subprocess", fake)
    return fake


@pytest.fixture
def gpu_seen(monkeypatch) -> None:
    """torch says a bf16-capable GPU is there (nothing here touches it: training is faked)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)


def test_cuda_without_a_gpu_is_refused_before_anything_runs(toy_model_dir, tmp_path, capsys,
                                                           monkeypatch, fake_training) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "bench"
    assert main(["bench", "consolidate", "--model", str(toy_model_dir), "--out", str(out),
                 "--device", "cuda", "--dtype", "bf16"]) == 2
    error = capsys.readouterr().err
    assert "--device cuda" in error and "torch.cuda.is_available() is false" in error
    assert "--device cpu" in error  # what to do instead
    assert fake_training.calls == [] and not out.exists()


@pytest.mark.parametrize(("flags", "message"), [
    (["--dtype", "int8"], "--dtype int8: use fp32, bf16 or fp16"),
    (["--device", "tpu"], "--device tpu: use cpu or cuda"),
    (["--memory-only", "--runs", "2"], "--runs does not apply with --memory-only"),
])
def test_unknown_placements_and_conflicting_flags_are_refused(toy_model_dir, tmp_path, capsys,
                                                              fake_training, flags,
                                                              message) -> None:
    out = tmp_path / "bench"
    assert main(["bench", "consolidate", "--model", str(toy_model_dir), "--out", str(out),
                 *flags]) == 2
    assert message in capsys.readouterr().err
    assert fake_training.calls == [] and not out.exists()


def test_the_toy_benchmark_refuses_what_only_a_model_folder_takes(tmp_path, capsys,
                                                                 fake_training) -> None:
    out = tmp_path / "bench"
    assert main(["bench", "consolidate", "--out", str(out), "--memory-only"]) == 2
    assert "need --model DIR" in capsys.readouterr().err
    assert fake_training.calls == [] and not out.exists()


def test_on_a_gpu_the_memory_measure_is_cudas_and_the_model_runs_in_the_dtype(
        toy_model_dir, tmp_path, capsys, gpu_seen, fake_training) -> None:
    out = tmp_path / "bench"
    assert main(["bench", "consolidate", "--model", str(toy_model_dir), "--out", str(out),
                 "--steps", "12", "--runs", "2", "--device", "cuda", "--dtype", "bf16"]) == 0
    report = json.loads((out / consolidate.MODEL_REPORT).read_text())
    # Two timed runs each, then the memory run, every one on the GPU in bfloat16.
    assert fake_training.calls == [(m, 12, "cuda", "bfloat16", False) for _ in range(2)
                                   for m in METHODS] + [
        (m, consolidate.TENSOR_PEAK_STEPS, "cuda", "bfloat16", True) for m in METHODS]
    assert report["config"]["distill"]["device"] == "cuda"
    assert report["ours"]["peak_cuda_mb"] == 300.0 and "peak_tensor_mb" not in report["ours"]
    assert "peak_cuda_mb" in report["measures"] and "peak_tensor_mb" not in report["measures"]
    assert "distilled_tokens_per_s" in report["measures"]
    if PEER_INSTALLED:
        assert set(report["ratios"]) == set(report["measures"])
        assert report["ratios"]["peak_cuda_mb"] == 0.5
    assert "peak CUDA memory allocated" in capsys.readouterr().out


def test_memory_only_takes_the_memory_run_alone(toy_model_dir, tmp_path, capsys, gpu_seen,
                                                fake_training) -> None:
    out = tmp_path / "bench"
    assert main(["bench", "consolidate", "--model", str(toy_model_dir), "--out", str(out),
                 "--steps", "4", "--device", "cuda", "--dtype", "fp16", "--memory-only"]) == 0
    report = json.loads((out / consolidate.MODEL_REPORT).read_text())
    assert fake_training.calls == [(m, 4, "cuda", "float16", True) for m in METHODS]
    assert report["measures"] == ["peak_cuda_mb"] and report["config"]["memory_only"]
    assert report["config"]["cost_runs"] == 0
    assert "distilled_tokens_per_s" not in report["ours"]
    if PEER_INSTALLED:
        assert report["ratios"] == {"peak_cuda_mb": 0.5}
    printed = capsys.readouterr().out
    assert "peak CUDA memory allocated" in printed and "distilled tokens/s" not in printed


@pytest.mark.skipif(not PEER_INSTALLED, reason="the peer, TRL, is the `bench` extra")
def test_memory_only_on_the_toy_model_measures_each_methods_tensors_on_the_cpu(
        toy_model_dir, tmp_path) -> None:
    """For real: one step a half, one process per method, on the CPU (no rate is timed)."""
    out = tmp_path / "bench"
    assert main(["bench", "consolidate", "--model", str(toy_model_dir), "--out", str(out),
                 "--steps", "1", "--memory-only"]) == 0
    report = json.loads((out / consolidate.MODEL_REPORT).read_text())
    assert report["measures"] == ["peak_tensor_mb"] and report["config"]["cost_runs"] == 0
    for method in ("ours", "peer"):
        cost = report[method]
        assert cost["peak_tensor_mb"] > 0, method
        assert "peak_cuda_mb" not in cost and "distilled_tokens_per_s" not in cost, method
    assert set(report["ratios"]) == {"peak_tensor_mb"}
    assert report["config"]["seconds_per_run"] == {"ours": [], "peer": []}
