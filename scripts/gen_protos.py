"""Generate the Python code of the wire contract from protos/vmmu/v1/*.proto.

    python scripts/gen_protos.py            regenerate the committed code in place
    python scripts/gen_protos.py --check    regenerate into a temporary directory; exit 1
                                            if the committed code differs (CI runs this)

protoc runs with `-I protos`, so the generated modules import each other as
`from vmmu.v1 import x_pb2`, and writes `*_pb2.py`, `*_pb2.pyi` and `*_pb2_grpc.py` next to
the .proto files. The output embeds the protobuf and grpcio versions of the grpcio-tools
that made it, and those are the oldest runtimes it accepts: regenerate and check with the
same grpcio-tools version.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["generate", "check", "main"]

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE_DIR = Path("vmmu") / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
GENERATED_VERSION = re.compile(r"^GRPC_GENERATED_VERSION = '([^']+)'$", re.MULTILINE)


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))


def generated_files(out_root: Path) -> dict[str, Path]:
    """The generated files under `out_root`, keyed by their name."""
    directory = out_root / PACKAGE_DIR
    return {p.name: p for p in sorted(directory.iterdir())
            if p.is_file() and p.name.endswith(GENERATED_SUFFIXES)}


def generate(out_root: Path) -> None:
    """Run protoc on every proto file, writing the code under `out_root`/vmmu/v1."""
    (out_root / PACKAGE_DIR).mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(str(p.relative_to(PROTO_ROOT)) for p in proto_files()),
    ]
    subprocess.run(command, check=True, cwd=PROTO_ROOT)


def check() -> list[str]:
    """Regenerate into a temporary directory; return the differences from the committed code."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = generated_files(Path(tmp))
        committed = generated_files(PROTO_ROOT)
        problems = [f"{name}: missing" for name in fresh.keys() - committed.keys()]
        problems += [f"{name}: stale, no .proto generates it"
                     for name in committed.keys() - fresh.keys()]
        problems += [f"{name}: out of date" for name in fresh.keys() & committed.keys()
                     if not filecmp.cmp(fresh[name], committed[name], shallow=False)]
        problems = sorted(f"protos/{PACKAGE_DIR}/{problem}" for problem in problems)
        made_with, making_with = _tools_version(committed), _tools_version(fresh)
        if problems and made_with != making_with:
            problems.append(f"(the committed code was made by grpcio-tools {made_with}, "
                            f"this is {making_with}: the difference may be the tools')")
    return problems


def _tools_version(files: dict[str, Path]) -> str | None:
    """The grpcio-tools version that generated `files`, as their _pb2_grpc modules say."""
    for name, path in files.items():
        if name.endswith("_pb2_grpc.py"):
            match = GENERATED_VERSION.search(path.read_text())
            if match:
                return match.group(1)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="fail if the committed generated code is not up to date")
    args = parser.parse_args(argv)
    if not args.check:
        generate(PROTO_ROOT)
        return 0
    problems = check()
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print("regenerate with: python scripts/gen_protos.py", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
