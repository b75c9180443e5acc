"""The model is pure Python: nothing under server/kvm may reach grpc, protobuf or Ray."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import vmmu.cost_file
import vmmu.server.kvm

MODEL_DIR = Path(vmmu.server.kvm.__file__).parent
MODEL_FILES = sorted(MODEL_DIR.glob("*.py"))
FORBIDDEN = ("grpc", "google.protobuf", "ray", "vmmu.server.rpc", "vmmu.server.explore_ray",
             "vmmu.client", "vmmu.v1")


def imported_modules(path: Path) -> set[str]:
    """Absolute module names a file imports (relative imports stay inside the package)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level > 1:
                    names.add("." * node.level + (node.module or ""))
                continue
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            names.update(arg.value for arg in node.args[:1] if isinstance(arg, ast.Constant))
    return names


def forbidden(name: str) -> bool:
    return name.startswith("..") or any(name == f or name.startswith(f + ".")
                                        for f in FORBIDDEN)


def test_the_model_has_modules():
    assert {p.stem for p in MODEL_FILES} >= {"spte", "tdp_mmu", "vcpu", "vm", "mmu_lock"}


@pytest.mark.parametrize("path", MODEL_FILES, ids=lambda p: p.name)
def test_model_module_imports_no_rpc_layer(path):
    assert sorted(filter(forbidden, imported_modules(path))) == []


def test_the_cost_file_format_is_a_leaf_the_client_and_the_model_may_import():
    """The client may not import the server, nor the model the client: the format they
    both read is defined below both, and must stay there."""
    path = Path(vmmu.cost_file.__file__)
    assert sorted(name for name in imported_modules(path)
                  if name.startswith(("vmmu", "."))) == []


def test_the_checker_sees_forbidden_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import grpc\nfrom google.protobuf import message\n"
                      "from ..rpc import servicers\nimport os\nfrom . import spte\n")
    assert sorted(filter(forbidden, imported_modules(sample))) == [
        "..rpc", "google.protobuf", "google.protobuf.message", "grpc"]


def test_importing_the_model_and_its_process_pool_loads_no_grpc_protobuf_or_ray():
    probe = ("import sys, vmmu.server.kvm, vmmu.server.explore_pool\n"
             "print(sorted(m for m in sys.modules if m in ('grpc', 'ray')"
             " or m.startswith(('grpc.', 'ray.', 'google.protobuf'))))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def runtime_model_imports(path: Path) -> set[str]:
    """The model's modules a file imports when it runs: its relative imports, leaving out
    those under `if TYPE_CHECKING:` (a module below `vm` names `Vm` only in annotations)."""
    names = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for stmt in child.orelse:
                    visit(stmt)
                continue
            if isinstance(child, ast.ImportFrom) and child.level == 1:
                names.update([child.module] if child.module else
                             [alias.name for alias in child.names])
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return names & {p.stem for p in MODEL_FILES}


def import_cycle(graph: dict[str, set[str]]) -> list[str]:
    """A cycle of the graph as a path that ends where it starts, or [] if it has none."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_the_models_modules_import_each_other_without_a_cycle():
    """docs/design.md groups the model's modules on the promise that imports go one way."""
    graph = {p.stem: runtime_model_imports(p) - {p.stem} for p in MODEL_FILES
             if p.stem != "__init__"}
    assert graph["vm"] >= {"tdp_mmu", "mmu", "vcpu"} and "vm" not in graph["mmu"]
    assert import_cycle(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == \
        ["a", "b", "c", "a"]
    assert import_cycle({"a": {"b"}, "b": set()}) == []
