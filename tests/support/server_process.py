"""`fleetmind server run` as its own process (tests that kill it): its JSON config, its
start, and its end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def write_server_config(path: Path, data: Path, modules: Iterable[Any], deadline_s: float,
                        phase_deadline_s: float) -> Path:
    """A plaintext aggregator's config (three sites, exactly) on the toy adapter of
    `modules` (TargetModule), written to `path`."""
    path.write_text(json.dumps({
        "data_dir": str(data), "insecure": True,
        "cohort": {"min_size": 3, "target_size": 3, "deadline_s": deadline_s,
                   "phase_deadline_s": phase_deadline_s},
        "privacy": {"clip_norm": 1.0, "noise_multiplier": 1.0, "epsilon_budget": 10.0,
                    "fixed_point_clip": 1.0},
        "adapter": {"base_model_id": "toy", "base_model_sha256": "cd" * 32,
                    "frozen_a_seed": 7, "rank": 2,
                    "modules": [{"name": m.name, "in_features": m.in_features,
                                 "out_features": m.out_features} for m in modules]}}))
    return path


def start_server(config: Path, stderr: Any = subprocess.PIPE) -> tuple[subprocess.Popen, str]:
    """`fleetmind server run --config CONFIG` on 127.0.0.1:0; the process and the address
    its first line names (stderr: a pipe, or an open file to log to)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "fleetmind.cli.main", "server", "run", "--config", str(config),
         "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=stderr, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    line = process.stdout.readline() if process.stdout else ""
    if " on " not in line:
        process.kill()
        process.wait(10)
        said = process.stderr.read() if stderr is subprocess.PIPE and process.stderr else ""
        raise AssertionError(f"no aggregator: {line!r} {said!r}")
    return process, line.split(" on ")[1].split(" ")[0]


def end(process: subprocess.Popen, *closing: Any) -> None:
    """Kills `process` if it still runs and reaps it; then closes each of `closing`."""
    if process.poll() is None:
        process.kill()
        process.wait(10)
    for opened in closing:
        opened.close()
