"""The wheel, installed the way pip, Docker and systemd install it (not editable)."""

import os
import signal
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Stands in for an environment without torch: the aggregator's image has none.
REFUSE_TORCH = (
    "import sys\n"
    "class _Refuse:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] in ('torch', 'transformers', 'peft'):\n"
    "            raise ImportError('not installed: ' + name)\n"
    "sys.meta_path.insert(0, _Refuse())\n")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(out), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (built,) = out.glob("fleetmind-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel installed and torch refused.

    Its dependencies come from this environment's site-packages (a path, so this
    environment's editable-install hook is not loaded): no download at test time.
    """
    venv = tmp_path_factory.mktemp("installed") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True).stdout.strip())
    (site / "_refuse_torch.py").write_text(REFUSE_TORCH)
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "zz_deps.pth").write_text("import _refuse_torch\n" + "\n".join(sorted(deps)) + "\n")
    result = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return venv


def source_packages() -> set[str]:
    """Every folder with an __init__.py under the top-level folders fleetmind/ links."""
    packages = set()
    for link in (ROOT / "fleetmind").iterdir():
        if link.is_dir():
            for init in link.rglob("__init__.py"):
                packages.add(init.parent.relative_to(ROOT / "fleetmind").as_posix())
    return packages


def test_wheel_holds_every_package_under_the_fleetmind_namespace(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    code = [n for n in names if ".dist-info/" not in n]
    assert code and all(n.startswith("fleetmind/") for n in code), \
        sorted({n.split("/")[0] for n in code})
    assert "aggregation/secagg" in source_packages()
    missing = [p for p in sorted(source_packages()) if f"fleetmind/{p}/__init__.py" not in names]
    assert missing == []
    assert "fleetmind/sim/toy_model/model.safetensors" in names
    assert "fleetmind/sim/toy_model/tokenizer.json" in names
    assert any(n.endswith(".proto") for n in names)


def test_the_installed_aggregator_starts_and_its_ledger_audits_without_torch(
        installed: Path, tmp_path: Path) -> None:
    program = installed / "bin" / "fleetmind"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    data = tmp_path / "data"
    key = subprocess.run([str(program), "server", "key", "--data", str(data), "--out",
                          str(tmp_path / "aggregator.pub")],
                         capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert key.returncode == 0, key.stderr[-2000:]
    server = subprocess.Popen(
        [str(program), "server", "run", "--insecure", "--listen", "127.0.0.1:0",
         "--data", str(data), "--metrics-listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        line = server.stdout.readline()
        assert "metrics on http://127.0.0.1:" in line, line + server.stderr.read()
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0, server.stderr.read()[-2000:]
    finally:
        if server.poll() is None:
            server.kill()
    audit = subprocess.run(
        [str(program), "audit", "ledger", "--file", str(data / "ledger.sqlite"),
         "--aggregator-key", str(tmp_path / "aggregator.pub")],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert audit.returncode == 0, audit.stdout[-2000:] + audit.stderr[-2000:]
    # The program ran from the installed wheel, not from this checkout.
    where = subprocess.run(
        [str(installed / "bin" / "python"), "-c",
         "import fleetmind.aggregation.secagg as m; print(m.__file__)"],
        capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert "site-packages" in where.stdout and str(ROOT) not in where.stdout, where
