"""examples/node/vm.js drives a VM end to end from Node (@grpc/grpc-js, protos/ loaded at
run time), against a real server, with and without a token. Its packages are installed
with npm into a temporary folder; without node and npm the test is skipped."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from vmmu.server.rpc.auth import Tokens

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "node"


@pytest.fixture(scope="module")
def node_modules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are needed to run examples/node")
    folder = tmp_path_factory.mktemp("node")
    dependencies = json.loads((EXAMPLE / "package.json").read_text())["dependencies"]
    installed = subprocess.run(
        ["npm", "install", "--prefix", str(folder), "--no-audit", "--no-fund",
         "--no-save", *(f"{name}@{version}" for name, version in dependencies.items())],
        capture_output=True, text=True, timeout=600)
    if installed.returncode != 0:
        pytest.skip(f"npm could not install {sorted(dependencies)}: "
                    f"{installed.stderr.strip()[-300:]}")
    return folder / "node_modules"


def run_example(node_modules: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["node", str(EXAMPLE / "vm.js"), *args], capture_output=True,
                          text=True, timeout=120,
                          env={**os.environ, "NODE_PATH": str(node_modules)})


def test_the_node_example_runs_a_vm_end_to_end(node_modules, server):
    done = run_example(node_modules, server.address)
    assert done.returncode == 0, done.stderr
    assert 'run: EXIT_REASON_DONE, 2 accesses, read "from js!"' in done.stdout
    assert done.stdout.rstrip().endswith("ok")
    assert server.serving.kvm.vms() == []                  # it destroyed its VM


def test_the_node_example_sends_its_token(node_modules, serve):
    running = serve(tokens=Tokens.parse("node-secret node\n"))
    refused = run_example(node_modules, running.address)
    done = run_example(node_modules, running.address, "--token", "node-secret")
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
    assert done.returncode == 0, done.stderr
