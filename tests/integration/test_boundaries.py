"""The folders are the architecture: these tests keep each side inside its walls."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from support.no_torch import REFUSE_TORCH

ROOT = Path(__file__).resolve().parents[2]

HEAVY = ("torch", "transformers", "peft")
# folder -> module prefixes its code may never import, anywhere (lazy imports included).
# Every folder has its walls; `sim` (the simulator, the toy world, the benchmarks) may
# import anything, and `cli` may import every side but holds no command of its own
# (test_cli_holds_no_command_each_side_registers_its_own).
FORBIDDEN = {
    # Pure: the merge, DP, quantisation and secure aggregation know no transport, no I/O
    # floor and neither side.
    "aggregation": (*HEAVY, "grpc", "fleetmind.client", "fleetmind.server", "fleetmind.sim",
                    "fleetmind.protos", "fleetmind.runtime", "fleetmind.audit",
                    "fleetmind.flower", "fleetmind.cli"),
    # The shared floor both sides stand on imports neither.
    "runtime": (*HEAVY, "fleetmind.client", "fleetmind.server", "fleetmind.sim",
                "fleetmind.audit", "fleetmind.flower", "fleetmind.cli"),
    # The wire format: messages and their mapping, no side and no model code.
    "protos": (*HEAVY, "fleetmind.client", "fleetmind.server", "fleetmind.sim",
               "fleetmind.audit", "fleetmind.flower", "fleetmind.cli"),
    "server": (*HEAVY, "fleetmind.client", "fleetmind.sim", "fleetmind.flower",
               "fleetmind.cli"),
    "client": ("fleetmind.server", "fleetmind.sim", "fleetmind.flower", "fleetmind.cli"),
    # The auditor reads both sides' records with code neither side owns (record schemas and
    # chain checks next to the chain, aggregation/records.py; file names and the version
    # folder check on the shared floor, runtime/layout.py), and never the simulation
    # (torch, transformers and peft load only inside `audit canaries`: test_audit.py runs
    # the other commands with them absent).
    "audit": ("fleetmind.client", "fleetmind.server", "fleetmind.sim", "fleetmind.flower",
              "fleetmind.cli"),
    # The Flower app takes its model and evaluation from the run config: the toy world is
    # the simulator's (sim/flower_run.py).
    "flower": ("fleetmind.sim", "fleetmind.server", "fleetmind.cli"),
    "cli": (),
    "sim": (),
}
# (file, module) imports allowed past a wall, each with its reason. `audit canaries` loads
# the base model as every site does, through client/model.py, the one place fleetmind loads
# a model (no shared layer may import torch); it imports nothing else of the client, and
# only inside canaries.measure.
ALLOWED = {("audit/canaries.py", "fleetmind.client.model")}


def test_every_folder_has_walls() -> None:
    folders = {link.name for link in (ROOT / "fleetmind").iterdir() if link.is_symlink()}
    assert folders == set(FORBIDDEN)


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def offences(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    found = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for module in imported_modules(path):
            if (str(path.relative_to(ROOT)), module) in ALLOWED:
                continue
            if any(module == bad or module.startswith(bad + ".") for bad in forbidden):
                found.append(f"{path.relative_to(ROOT)} imports {module}")
    return found


def test_every_exception_to_the_walls_is_still_needed() -> None:
    for file, module in ALLOWED:
        assert module in imported_modules(ROOT / file), f"{file} no longer imports {module}"


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_folder_never_imports_the_forbidden(folder: str) -> None:
    assert offences(folder, FORBIDDEN[folder]) == []


def test_audit_depends_on_neither_side() -> None:
    sides = ("fleetmind.client", "fleetmind.server")
    assert offences("audit", sides) == []
    # Every audit module loads, and with it neither side (canaries.measure's model loading
    # is the one exception, and it runs only when a canary is measured).
    result = run_python(
        "import importlib, pkgutil, sys, fleetmind.audit\n"
        "for module in pkgutil.iter_modules(fleetmind.audit.__path__):\n"
        "    importlib.import_module('fleetmind.audit.' + module.name)\n"
        f"print(sorted(m for m in sys.modules if m.startswith({sides!r})))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_cli_holds_no_command_each_side_registers_its_own() -> None:
    import argparse

    from fleetmind.cli.main import COMMAND_GROUPS, Parser, build_parser, command_group

    # No argument or command is defined in cli/: it only asks the sides.
    for path in sorted((ROOT / "cli").rglob("*.py")):
        calls = {node.func.attr for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}
        assert not calls & {"add_parser", "add_argument", "set_defaults"}, path
    registered: dict[str, set[str]] = {}
    for entry in COMMAND_GROUPS:
        side = entry.split(":")[0].split(".")[1]
        assert entry.startswith(f"fleetmind.{side}.") and side in {"client", "server", "audit",
                                                                     "sim"}, entry
        commands = Parser(prog="fleetmind").add_subparsers(parser_class=Parser)
        command_group(entry)(commands)
        assert commands.choices, f"{entry} registers no command"
        assert not set(commands.choices) & set().union(*registered.values()), entry
        registered.setdefault(side, set()).update(commands.choices)
    assert {"client"} <= registered["client"] and {"server"} <= registered["server"]
    assert registered["audit"] == {"audit"}
    # The simulator registers only its own commands.
    assert registered["sim"] == {"model", "bench", "demo"}
    program = next(action for action in build_parser()._actions
                   if isinstance(action, argparse._SubParsersAction))
    assert set(program.choices) == set().union(*registered.values())


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    # Run outside the checkout, so only what is installed can be imported.
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=ROOT.parent)


# Each script prints what was loaded that must not be: nothing.
LOADS_NOTHING_FORBIDDEN = {
    "server-and-aggregation-load-neither-torch-nor-transformers":
        "import sys, fleetmind.server, fleetmind.aggregation, fleetmind.protos\n"
        "import fleetmind.runtime, fleetmind.cli.main\n"
        "fleetmind.cli.main.build_parser()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'transformers', 'peft')))",
    "runtime-loads-no-side-and-no-torch":
        "import importlib, pkgutil, sys, fleetmind.runtime\n"
        "for module in pkgutil.iter_modules(fleetmind.runtime.__path__):\n"
        "    importlib.import_module('fleetmind.runtime.' + module.name)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'transformers', 'peft') or m.startswith(('fleetmind.client', "
        "'fleetmind.server', 'fleetmind.sim'))))",
    "client-does-not-load-the-server":
        "import sys, fleetmind.client, fleetmind.client.model\n"
        "print([m for m in sys.modules if m.startswith('fleetmind.server')])",
    "aggregation-loads-neither-side-nor-grpc":
        "import sys, fleetmind.aggregation\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'grpc' or "
        "m.startswith(('fleetmind.client', 'fleetmind.server'))))",
    "no-generic-top-level-module-is-installed":
        "import importlib.util\n"
        "print([n for n in ('server', 'client', 'aggregation', 'protos', 'sim') "
        "if importlib.util.find_spec(n) is not None])",
}


@pytest.mark.parametrize("script", LOADS_NOTHING_FORBIDDEN.values(),
                         ids=LOADS_NOTHING_FORBIDDEN.keys())
def test_nothing_past_the_walls_is_loaded(script: str) -> None:
    result = run_python(script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_aggregator_side_imports_with_torch_absent() -> None:
    # REFUSE_TORCH stands in for an install without torch, transformers and peft.
    result = run_python(
        REFUSE_TORCH +
        "import fleetmind.server, fleetmind.aggregation\n"
        "from fleetmind.cli.main import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit as stop:\n"
        "    assert stop.code == 0\n")
    assert result.returncode == 0, result.stderr


# ---- the tests' own layout ---------------------------------------------------------------

TESTS = ROOT / "tests"
# A unit test runs in this process and starts nothing: processes, sockets, servers and
# benchmarks are for tests/integration/.
UNIT_FORBIDDEN = ("subprocess", "multiprocessing", "socket", "http", "urllib.request",
                  "flwr", "fleetmind.server.service", "fleetmind.client.serve.runner",
                  "fleetmind.runtime.metrics_endpoint", "fleetmind.flower",
                  "fleetmind.sim.demo", "support.secagg_rounds", "support.plain_rounds")


def test_unit_tests_start_no_process_and_no_server() -> None:
    assert offences("tests/unit", UNIT_FORBIDDEN) == []
    shared = sorted(path.name for path in (TESTS / "unit").glob("test_*.py")) + sorted(
        path.name for path in (TESTS / "integration").glob("test_*.py"))
    assert len(shared) == len(set(shared)), "one test module name in both folders"


def test_tests_share_code_through_support_only() -> None:
    # No test module imports another, and support imports none: what two tests need is in
    # tests/support/.
    found = []
    for folder in ("unit", "integration", "support"):
        for path in sorted((TESTS / folder).rglob("*.py")):
            for module in imported_modules(path):
                if module.split(".")[0].startswith("test_") or module == "conftest":
                    found.append(f"{path.relative_to(ROOT)} imports {module}")
    assert found == []


# ---- import checks in a fresh interpreter -------------------------------------------------


def test_runtime_loads_neither_side_nor_torch_nor_grpc() -> None:
    code = ("import sys\n"
            "from fleetmind.runtime import addresses, config, durable, keys, "
            "metrics_endpoint, signed_log, tls\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'transformers', 'peft', 'grpc') or "
            "m.startswith(('fleetmind.client', 'fleetmind.server', 'fleetmind.sim'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, cwd=ROOT.parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_client_commands_load_neither_torch_nor_the_server() -> None:
    code = ("import sys, fleetmind.client.cli, fleetmind.client.store, fleetmind.client.scrub\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'transformers', 'peft') or m.startswith('fleetmind.server')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_stubs_import_from_the_installed_package() -> None:
    # Outside the checkout, so only the installed package can resolve the imports.
    code = ("import fleetmind.protos.fleetmind.v1.fleet_pb2_grpc as f, "
            "fleetmind.protos.fleetmind.v1.models_pb2_grpc as m, "
            "fleetmind.protos.fleetmind.v1.audit_pb2_grpc as a\n"
            "print(f.FleetStub.__name__, m.ModelsStub.__name__, a.AuditStub.__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT.parent, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["FleetStub", "ModelsStub", "AuditStub"]
