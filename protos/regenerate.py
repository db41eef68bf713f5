"""Regenerate the committed Python stubs from `fleetmind/v1/*.proto`, or check they match.

    python -m fleetmind.protos.regenerate          # rewrite the stubs
    python -m fleetmind.protos.regenerate --check  # exit 1 and list what differs

protoc is run with `-I protos`, so the descriptors keep the proto paths
(`fleetmind/v1/fleet.proto`) that reflection and other languages see. The `_pb2_grpc`
modules it writes import `from fleetmind.v1 import ...`, which does not resolve: the stubs
live inside the `fleetmind.protos` package. One rewrite of that line, and nothing else,
makes them import as `fleetmind.protos.fleetmind.v1`. Needs grpcio-tools (the dev extra).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent  # the `protos` folder, `-I` for protoc
PROTO_PACKAGE = "fleetmind/v1"
STUB_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
_GENERATED_IMPORT = "from fleetmind.v1 import "
_PACKAGED_IMPORT = "from fleetmind.protos.fleetmind.v1 import "


def proto_files(root: Path = PROTO_ROOT) -> list[Path]:
    return sorted((root / PROTO_PACKAGE).glob("*.proto"))


def generate(out_dir: Path, root: Path = PROTO_ROOT) -> dict[str, bytes]:
    """Runs protoc on every proto under `root` into `out_dir`; returns stub name -> bytes,
    imports already rewritten for the package."""
    protos = proto_files(root)
    if not protos:
        raise FileNotFoundError(f"no .proto files under {root / PROTO_PACKAGE}")
    command = [sys.executable, "-m", "grpc_tools.protoc", f"-I{root}",
               f"--python_out={out_dir}", f"--pyi_out={out_dir}",
               f"--grpc_python_out={out_dir}",
               *(str(path.relative_to(root)) for path in protos)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"protoc failed ({result.returncode}): {result.stderr.strip()} "
                           "(is grpcio-tools installed? pip install -e '.[dev]')")
    stubs = {}
    for path in sorted((out_dir / PROTO_PACKAGE).iterdir()):
        if path.name.endswith(STUB_SUFFIXES):
            text = path.read_text().replace(_GENERATED_IMPORT, _PACKAGED_IMPORT)
            stubs[path.name] = text.encode()
    return stubs


def committed_stubs(root: Path = PROTO_ROOT) -> dict[str, bytes]:
    folder = root / PROTO_PACKAGE
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())
            if path.name.endswith(STUB_SUFFIXES)}


def differences(root: Path = PROTO_ROOT) -> list[str]:
    """What differs between the committed stubs and a fresh generation: [] when in step."""
    with tempfile.TemporaryDirectory(prefix="fleetmind-protos-") as tmp:
        fresh = generate(Path(tmp), root)
    committed = committed_stubs(root)
    problems = [f"{name}: missing, run python -m fleetmind.protos.regenerate"
                for name in sorted(set(fresh) - set(committed))]
    problems += [f"{name}: no .proto generates it any more; delete it"
                 for name in sorted(set(committed) - set(fresh))]
    problems += [f"{name}: differs from its .proto, run python -m fleetmind.protos.regenerate"
                 for name in sorted(set(fresh) & set(committed))
                 if fresh[name] != committed[name]]
    return problems


def write(root: Path = PROTO_ROOT) -> list[str]:
    """Regenerates the stubs in place (each file replaced atomically); returns the names
    written and removes stubs whose .proto is gone."""
    folder = root / PROTO_PACKAGE
    with tempfile.TemporaryDirectory(prefix="fleetmind-protos-") as tmp:
        fresh = generate(Path(tmp), root)
    for name in set(committed_stubs(root)) - set(fresh):
        (folder / name).unlink()
    for name, data in fresh.items():
        partial = folder / f".{name}.tmp"
        partial.write_bytes(data)
        os.replace(partial, folder / name)
    return sorted(fresh)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fleetmind.protos.regenerate",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 if the stubs differ from the protos")
    args = parser.parse_args(argv)
    if args.check:
        problems = differences()
        for problem in problems:
            print(problem, file=sys.stderr)
        return 1 if problems else 0
    for name in write():
        print(f"wrote {PROTO_PACKAGE}/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
