"""`fleetmind client ingest`, through the program's own `main`."""

import json
from pathlib import Path

import pytest

from fleetmind.cli import main as cli
from fleetmind.client.store import SessionStore


def session(number: int) -> str:
    return json.dumps({"id": f"s{number}", "messages": [
        {"role": "user", "content": f"the pet of name{number} is value ."},
        {"role": "assistant", "content": "noted ."}]})


def test_ingest_prints_a_table_and_line_numbered_problems(tmp_path: Path, capsys) -> None:
    first = tmp_path / "a.jsonl"
    first.write_text("\n".join([session(1), "{broken", session(2)]) + "\n")
    second = tmp_path / "b.jsonl"
    second.write_text("\n".join([session(2), session(3)]) + "\n")
    store = tmp_path / "site"
    store.mkdir()

    code = cli.main(["client", "ingest", str(first), str(second), "--store", str(store)])

    out = capsys.readouterr().out
    assert code == 1  # a line was skipped
    assert "stored" in out and "duplicates" in out and "skipped" in out
    assert "all files" in out
    assert f"{first}:2: not valid JSON" in out
    assert "3 sessions in the store" in out
    with SessionStore(store) as opened:
        assert [s.id for s in opened] == ["s1", "s2", "s3"]


def test_a_clean_ingest_into_a_new_folder_exits_0_and_reruns_store_nothing(tmp_path: Path,
                                                                          capsys) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text(session(1) + "\n")
    argv = ["client", "ingest", str(path), "--store", str(tmp_path / "site") + "/"]
    assert cli.main(argv) == 0
    assert cli.main(argv) == 0
    assert "1 session in the store" in capsys.readouterr().out
    assert (tmp_path / "site" / "sessions.db").is_file()


def test_a_missing_file_is_one_line_and_stores_nothing(tmp_path: Path, capsys) -> None:
    good = tmp_path / "a.jsonl"
    good.write_text(session(1) + "\n")
    database = tmp_path / "s.db"
    code = cli.main(["client", "ingest", str(good), str(tmp_path / "absent.jsonl"),
                     "--store", str(database)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "absent.jsonl" in err
    assert not database.exists()


def test_a_store_that_is_not_one_is_one_line(tmp_path: Path, capsys) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text(session(1) + "\n")
    code = cli.main(["client", "ingest", str(path), "--store", str(path)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a session store" in err


@pytest.mark.parametrize("argv, names", [
    (["client"], "ACTION"),
    (["client", "ingest", "--store", "x"], "FILE"),
    (["client", "ingest", "a.jsonl"], "--store"),
])
def test_bad_arguments_exit_2_with_one_line(argv: list[str], names: str, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and names in err


@pytest.mark.parametrize("command", [["client"], ["client", "ingest"]])
def test_help(command: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        cli.main([*command, "--help"])
    assert stop.value.code == 0
    assert "usage: fleetmind client" in capsys.readouterr().out


def test_consolidate_passes_device_dtype_targets_rank_and_alpha(tmp_path: Path, monkeypatch,
                                                                capsys) -> None:
    from fleetmind.client import consolidate

    seen: dict = {}

    def fake(model, store, out, cfg, **settings):
        seen.update(settings, cfg=cfg)
        raise ValueError("stopped here")

    monkeypatch.setattr(consolidate, "consolidate_store", fake)
    argv = ["client", "consolidate", "--model", str(tmp_path), "--store", str(tmp_path),
            "--out", str(tmp_path / "out"), "--device", "cpu", "--dtype", "bf16",
            "--targets", "gate_proj, up_proj", "--rank", "4", "--alpha", "8"]
    assert cli.main(argv) == 2 and "stopped here" in capsys.readouterr().err
    assert (seen["cfg"].device, seen["cfg"].dtype) == ("cpu", "bfloat16")
    assert (seen["targets"], seen["rank"], seen["alpha"]) == (["gate_proj", "up_proj"], 4, 8.0)
    assert cli.main([*argv[:8], "--targets", "peft"]) == 2 and seen["targets"] == "peft"
    capsys.readouterr()
    assert cli.main([*argv[:8], "--dtype", "float8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "float8" in err
