"""A simulated fleet (demo, bench continual) killed with SIGTERM takes its site processes
with it, as Ctrl-C always did: they are separate processes that would otherwise outlive it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = """
import json, sys, time
from pathlib import Path
from fleetmind.sim.basemodel import toy_model_path
from fleetmind.sim.demo_config import DemoConfig
from fleetmind.sim.fleet import Fleet

out = Path(sys.argv[1])
guard = out / "guard.jsonl"
guard.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\\n")
fleet = Fleet(DemoConfig(sites=3, secure_aggregation=False, endpoints=False,
                         out=out / "demo").fleet(), toy_model_path(), guard)
fleet.start()
try:
    print(" ".join(str(p.pid) for p in fleet.processes), flush=True)
    time.sleep(600)
finally:
    fleet.stop()
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_stops_the_fleet_and_its_site_processes(tmp_path: Path) -> None:
    process = subprocess.Popen([sys.executable, "-c", SCRIPT, str(tmp_path)],
                               stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        sites = [int(pid) for pid in process.stdout.readline().split()]  # type: ignore[union-attr]
        assert len(sites) == 3 and all(alive(pid) for pid in sites)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in sites) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not any(alive(pid) for pid in sites)
    finally:
        process.kill()
        process.wait()
