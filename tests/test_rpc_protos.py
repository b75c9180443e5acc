"""The wire contract as files: generated code up to date, buf STANDARD naming, comments."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from vmmu.v1 import (dirty_log_pb2, gpc_pb2, host_memory_pb2, memslot_pb2, notifier_pb2,
                     trace_pb2, vcpu_pb2, vm_pb2)

ROOT = Path(__file__).resolve().parent.parent
PROTO_FILES = sorted((ROOT / "protos" / "vmmu" / "v1").glob("*.proto"))
MODULES = [vm_pb2, host_memory_pb2, memslot_pb2, vcpu_pb2, notifier_pb2, trace_pb2, gpc_pb2,
           dirty_log_pb2]


def test_generated_code_is_up_to_date():
    check = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def _upper_snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper()


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.DESCRIPTOR.name)
def test_buf_standard_names(module):
    file = module.DESCRIPTOR
    assert file.package == "vmmu.v1"
    for enum in file.enum_types_by_name.values():
        prefix = _upper_snake(enum.name) + "_"
        assert enum.values_by_number[0].name == prefix + "UNSPECIFIED"
        assert all(v.name.startswith(prefix) for v in enum.values)
    for service in file.services_by_name.values():
        assert service.name.endswith("Service")
        for method in service.methods:
            assert method.input_type.name == method.name + "Request"
            assert method.output_type.name == method.name + "Response"


_DECLARATION = re.compile(
    r"(service|rpc|message|enum|oneof) \w+"          # named blocks and RPCs
    r"|(optional |repeated )?[\w.<>, ]+ \w+ = \d+;"  # fields
    r"|[A-Z][A-Z0-9_]* = \d+;")                     # enum values


@pytest.mark.parametrize("path", PROTO_FILES, ids=lambda p: p.name)
def test_every_declaration_has_a_comment(path):
    lines = [line.strip() for line in path.read_text().splitlines()]
    missing = [f"{path.name}:{n + 1}: {line}" for n, line in enumerate(lines)
               if _DECLARATION.match(line) and not lines[n - 1].startswith("//")]
    assert missing == []
