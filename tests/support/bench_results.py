"""Benchmark results as each benchmark's own `run` writes them (sim/bench/aggregation.py,
consolidate.py, wire.py), hand-written: the input of `fleetmind bench report` in tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def sum_row(updates: int, parameters: int, gbps: float, memcpy_gbps: float) -> dict[str, Any]:
    return {"updates": updates, "parameters": parameters, "gbps": gbps,
            "memcpy_gbps": memcpy_gbps, "ratio_to_memcpy": gbps / memcpy_gbps}


def secagg_row(cohort: int, dropout: float, ours: float, flower: float, bytes_ratio: float,
               flower_bytes_ratio: float) -> dict[str, Any]:
    return {"cohort": cohort, "dropout": dropout, "parameters": 65536, "neighbours": 10,
            "threshold": 6, "ours_seconds": ours, "flower_seconds": flower,
            "ours_site_seconds": ours / 2, "ours_server_seconds": ours / 2,
            "flower_site_seconds": flower / 2, "flower_server_seconds": flower / 2,
            "bytes_ratio_to_plain16": bytes_ratio,
            "flower_bytes_ratio_to_plain16": flower_bytes_ratio}


AGGREGATION = {
    "sum": [sum_row(10, 2**20, 6.0, 10.0), sum_row(100, 2**20, 4.0, 10.0),
            sum_row(10, 2**23, 9.0, 9.0)],
    "secagg": [secagg_row(16, 0.0, 0.01, 0.5, 1.5, 4.0),
               secagg_row(16, 0.3, 0.02, 2.0, 1.6, 4.1),
               secagg_row(64, 0.3, 0.2, 50.0, 1.8, 4.5)],
    "exactness": {"sites": 8, "rank": 16, "ours_rel_error": 2.5e-8, "fedit_rel_error": 0.42},
    "quick": False,
    "cpus": 2,
}


COST = {"tokens": 600000, "distilled_tokens": 20000, "rss_before_mb": 440.0,
        "rss_loaded_mb": 440.0, "seconds": 30.0, "cpu_seconds": 30.0, "steps": 180,
        "threads": 1}


CONSOLIDATE = {
    "recovery": 0.95, "forgetting_points": 2.5, "teacher_accuracy": 1.0,
    "closed_book_before": 0.0, "closed_book_after": 0.95,
    "baselines": {"sft_transcript": {"recovery": 1.0, "closed_book": 1.0,
                                     "forgetting_points": 3.9},
                  "offpolicy": {"recovery": 1.0, "closed_book": 1.0, "forgetting_points": 3.1}},
    "ablations": {name: {"recovery": 1.0, "closed_book": 1.0, "forgetting_points": 1.4,
                         "seconds": 18.0} for name in ("no_dreams", "no_replay", "no_guard")},
    "ours": {**COST, "tokens_per_s": 30000.0, "distilled_tokens_per_s": 900.0,
             "peak_rss_mb": 500.0, "peak_above_loaded_mb": 60.0, "peak_tensor_mb": 12.0},
    "peer": {"name": "trl.experimental.sdft.SDFTTrainer", "version": "1.16.0",
             "recovery": 0.9, "forgetting_points": 4.0, "closed_book": 0.9,
             **COST, "tokens_per_s": 10000.0, "distilled_tokens_per_s": 300.0,
             "peak_rss_mb": 600.0, "peak_above_loaded_mb": 120.0, "peak_tensor_mb": 20.0},
    "ratios": {"distilled_tokens_per_s": 3.0, "peak_above_loaded_mb": 0.5, "peak_tensor_mb": 0.6,
               "tokens_per_s": 3.0, "peak_rss_mb": 0.83, "seconds": 1.0},
    "config": {"distill": {"steps": 90}, "quick": False, "model": "sim/toy_model",
               "facts": 6, "sessions": 14},
}


WIRE = {
    "rounds": [
        {"sites": 10, "completed": 10, "feasible": True, "round_seconds": 0.2,
         "site_mean_seconds": 0.18, "site_p50_seconds": 0.18, "site_max_seconds": 0.19,
         "version": 1},
        {"sites": 50, "completed": 31, "feasible": False, "wall_seconds": 270.0,
         "errors": ["DEADLINE_EXCEEDED"]},
        {"sites": 200, "feasible": False, "errors": ["skipped: 50 sites failed"]},
    ],
    "broadcast": {"watchers": 100, "version_bytes": 8398838, "b_bytes": 8388608,
                  "files": ["adapter_config.json", "adapter_model.safetensors",
                            "manifest.json", "manifest.sig"],
                  "seconds": 8.0, "mb_per_s": 105.0, "plain_seconds": 1.0,
                  "plain_mb_per_s": 840.0, "ratio_to_plain": 0.125, "plain": "gRPC stream",
                  "plain_written_seconds": 4.4, "plain_written_mb_per_s": 191.0,
                  "ratio_to_plain_written": 0.55, "plain_written": "gRPC stream, written",
                  "target": {"measure": "ratio_to_plain_written", "bound": 0.5, "met": True}},
    "quick": False, "cpus": 2, "largest_feasible_cohort": 10, "round_deadline_s": 240.0,
}


def bench_folder(folder: Path, **replaced: dict[str, Any]) -> Path:
    results = {"aggregation": AGGREGATION, "consolidate": CONSOLIDATE, "wire": WIRE}
    for name, result in {**results, **replaced}.items():
        (folder / f"{name}.json").write_text(json.dumps(result))
    return folder
