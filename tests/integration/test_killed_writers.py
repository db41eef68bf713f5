"""A real kill -9 in the middle of a write, in a child process: the runtime's atomic write
leaves the old file, and the session store's ingest loses nothing it acknowledged."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support.sessions import chat, write_jsonl

from fleetmind.client.store import SessionStore
from fleetmind.runtime import durable


def test_a_killed_writer_leaves_the_old_file(tmp_path: Path) -> None:
    # A real kill -9 after the temporary file is written and before the rename.
    target = tmp_path / "state.json"
    durable.atomic_write(target, b"old")
    code = ("import os, sys\n"
            "from fleetmind.runtime import durable\n"
            "os.replace = lambda *a: os.kill(os.getpid(), 9)\n"
            f"durable.atomic_write({str(target)!r}, b'new')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert result.returncode == -9
    assert target.read_bytes() == b"old"


INGEST_AND_ACKNOWLEDGE = """
import sys, time
from fleetmind.client.store import SessionStore

def acknowledge(session_id):
    print(session_id, flush=True)
    time.sleep(0.001)  # keeps the ingest running long enough to be killed in the middle

SessionStore(sys.argv[1]).ingest_file(sys.argv[2], on_stored=acknowledge, batch=int(sys.argv[3]))
print("finished", flush=True)
"""


@pytest.mark.parametrize("batch", [1, 16])
def test_kill_9_during_ingest_loses_nothing_acknowledged(tmp_path: Path, batch: int) -> None:
    total = 3000
    path = write_jsonl(tmp_path / "big.jsonl", [chat(n) for n in range(total)])
    database = tmp_path / "sessions.db"
    child = subprocess.Popen([sys.executable, "-c", INGEST_AND_ACKNOWLEDGE, str(database),
                              str(path), str(batch)], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    acknowledged = []
    for line in child.stdout:
        acknowledged.append(line.strip())
        if len(acknowledged) == 200:
            child.send_signal(signal.SIGKILL)
            break
    acknowledged += [line.strip() for line in child.stdout]  # what was printed before death
    assert child.wait(timeout=30) == -signal.SIGKILL
    assert "finished" not in acknowledged and len(acknowledged) < total

    with SessionStore(database) as store:
        assert store._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = {session.id for session in store}
        assert set(acknowledged) <= stored
        assert len(stored) < total
        # and the store carries on: a second ingest completes the file
        report = store.ingest_file(path)
        assert report.stored + report.duplicates == total
        assert len(store) == total
