"""The folders are the architecture: these tests keep each side inside its walls."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# folder -> module prefixes its code may never import, anywhere (lazy imports included)
FORBIDDEN = {
    "aggregation": ("torch", "transformers", "peft", "grpc", "fleetmind.client",
                    "fleetmind.server", "fleetmind.sim", "fleetmind.protos"),
    "server": ("torch", "transformers", "peft", "fleetmind.client", "fleetmind.sim"),
    "client": ("fleetmind.server", "fleetmind.sim"),
    # The auditor reads both sides' records with their own code, but never the simulation
    # (torch, transformers and peft load only inside `audit canaries`: test_audit.py runs
    # the other commands with them absent).
    "audit": ("fleetmind.sim",),
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_folder_never_imports_the_forbidden(folder: str) -> None:
    offences = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for module in imported_modules(path):
            if any(module == bad or module.startswith(bad + ".") for bad in FORBIDDEN[folder]):
                offences.append(f"{path.relative_to(ROOT)} imports {module}")
    assert offences == []


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    # Run outside the checkout, so only what is installed can be imported.
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=ROOT.parent)


def test_server_and_aggregation_load_neither_torch_nor_transformers() -> None:
    result = run_python(
        "import sys, fleetmind.server, fleetmind.aggregation, fleetmind.protos\n"
        "import fleetmind.sim.cli\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'transformers', 'peft')))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_aggregator_side_imports_with_torch_absent() -> None:
    # A finder that refuses torch and transformers stands in for an install without them.
    result = run_python(
        "import sys\n"
        "class Refuse:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers', 'peft'):\n"
        "            raise ImportError('not installed: ' + name)\n"
        "sys.meta_path.insert(0, Refuse())\n"
        "import fleetmind.server, fleetmind.aggregation\n"
        "from fleetmind.sim.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit as stop:\n"
        "    assert stop.code == 0\n")
    assert result.returncode == 0, result.stderr


def test_client_does_not_load_the_server() -> None:
    result = run_python(
        "import sys, fleetmind.client, fleetmind.client.model\n"
        "print([m for m in sys.modules if m.startswith('fleetmind.server')])")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_aggregation_loads_neither_side_nor_grpc() -> None:
    result = run_python(
        "import sys, fleetmind.aggregation\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'grpc' or "
        "m.startswith(('fleetmind.client', 'fleetmind.server'))))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_no_generic_top_level_module_is_installed() -> None:
    result = run_python(
        "import importlib.util\n"
        "print([n for n in ('server', 'client', 'aggregation', 'protos', 'sim') "
        "if importlib.util.find_spec(n) is not None])")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
