import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_everything_under_the_fleetmind_namespace(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("fleetmind-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    code = [n for n in names if ".dist-info/" not in n]
    assert code and all(n.startswith("fleetmind/") for n in code), \
        sorted({n.split("/")[0] for n in code})
    for package in ("aggregation", "client", "server", "protos", "sim", "sim/bench",
                    "protos/fleetmind/v1"):
        assert f"fleetmind/{package}/__init__.py" in names
    assert "fleetmind/sim/toy_model/model.safetensors" in names
    assert "fleetmind/sim/toy_model/tokenizer.json" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "fleetmind = fleetmind.sim.cli:main" in zipfile.ZipFile(wheel).read(
        entry_points).decode()
