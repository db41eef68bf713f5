import subprocess
import sys
from pathlib import Path

import pytest

from fleetmind.cli.main import build_parser, main


def every_command(parser, prefix=()):
    yield prefix
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield from every_command(sub, (*prefix, name))


COMMANDS = list(every_command(build_parser()))


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "fleetmind")
def test_help_everywhere(command, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main([*command, "--help"])
    assert stop.value.code == 0
    assert "usage: fleetmind" in capsys.readouterr().out


@pytest.mark.parametrize("argv, names", [
    (["bogus"], "bogus"),
    (["model"], "ACTION"),
    (["model", "world"], "--out"),
    (["model", "world", "--sites", "zero", "--out", "x"], "'zero'"),
    (["model", "world", "--sites", "0", "--out", "x"], "0 must be at least 1"),
    (["model", "build-toy", "--out", "x", "--steps", "-3"], "-3"),
])
def test_bad_arguments_exit_2_with_one_line(argv, names, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and names in err


def test_invalid_world_is_one_line_and_writes_nothing(tmp_path, capsys) -> None:
    out = tmp_path / "w"
    code = main(["model", "world", "--users-per-fact", "2", "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "users_per_fact=2" in err
    assert not out.exists()


def test_eval_on_a_missing_model_is_one_line(tmp_path, capsys) -> None:
    main(["model", "world", "--out", str(tmp_path / "w")])
    code = main(["model", "eval", "--model", str(tmp_path / "none"), "--world",
                 str(tmp_path / "w")])
    assert code == 2
    assert "no config.json" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["fleetmind.cli", "fleetmind.cli.main"])
def test_program_runs_as_a_module(module: str) -> None:
    result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert all(name in result.stdout for name in ("client", "server", "audit", "demo"))


def test_installed_program_runs() -> None:
    program = Path(sys.executable).parent / "fleetmind"
    result = subprocess.run([str(program), "model", "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and "build-toy" in result.stdout


def test_model_eval_prints_the_report_as_json(toy_model_dir, tmp_path, capsys) -> None:
    import json

    assert main(["model", "world", "--out", str(tmp_path / "w")]) == 0
    capsys.readouterr()
    assert main(["model", "eval", "--model", str(toy_model_dir), "--world",
                 str(tmp_path / "w"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) >= {"incontext_accuracy", "closed_book_accuracy", "chance_accuracy",
                           "incontext_by_facts", "parameters"}
    assert report["incontext_accuracy"] >= 0.85


def test_client_consolidate_runs_from_the_command_line(toy_model_dir, tmp_path, capsys) -> None:
    assert main(["model", "world", "--out", str(tmp_path / "w")]) == 0
    sessions = tmp_path / "w" / "sites" / "site-00" / "sessions.jsonl"
    assert main(["client", "ingest", str(sessions), "--store", str(tmp_path / "s.db")]) == 0
    code = main(["client", "consolidate", "--model", str(toy_model_dir), "--store",
                 str(tmp_path / "s.db"), "--out", str(tmp_path / "r1"), "--steps", "1",
                 "--guard", str(tmp_path / "w" / "guard.jsonl")])
    assert code == 0
    assert (tmp_path / "r1" / "update.safetensors").is_file()
    assert "consolidation" in capsys.readouterr().out
