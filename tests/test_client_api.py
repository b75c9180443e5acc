"""The client's own surface: twin clients, no server imports, batch encoding, errors."""

from __future__ import annotations

import errno
import inspect
import subprocess
import sys

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from vmmu.client import (AlreadyExists, AsyncClient, AsyncInvalidationHold, AsyncRunStream,
                         AsyncTraceStream, AsyncVcpu, AsyncVm, Batch, BatchBuilder, Client,
                         InvalidArgument, InvalidationHold, RunStream, TraceStream, Vcpu, Vm,
                         VmmuError)
from vmmu.client.errors import error_from_status

TWINS = [(Client, AsyncClient), (Vm, AsyncVm), (Vcpu, AsyncVcpu), (RunStream, AsyncRunStream),
         (InvalidationHold, AsyncInvalidationHold), (TraceStream, AsyncTraceStream)]


def _public_methods(cls: type) -> dict[str, inspect.Signature]:
    return {name: inspect.signature(member) for name, member in vars(cls).items()
            if callable(member) and not name.startswith("_")}


def _unasync(signature: inspect.Signature) -> str:
    return str(signature).replace("Async", "")


@pytest.mark.parametrize("sync_cls, async_cls", TWINS, ids=lambda c: c.__name__)
def test_sync_and_async_clients_have_the_same_methods(sync_cls, async_cls):
    sync_methods, async_methods = _public_methods(sync_cls), _public_methods(async_cls)
    assert sorted(sync_methods) == sorted(async_methods)
    for name, signature in sync_methods.items():
        assert _unasync(signature) == _unasync(async_methods[name]), name


def test_async_methods_that_make_rpcs_are_coroutines():
    plain = {"vm", "vcpu", "stream", "cancel"}
    for _, async_cls in TWINS:
        for name in _public_methods(async_cls):
            assert inspect.iscoroutinefunction(getattr(async_cls, name)) == (name not in plain), \
                f"{async_cls.__name__}.{name}"


def test_client_does_not_import_the_server():
    code = ("import sys, vmmu.client; "
            "print(sorted(m for m in sys.modules if m.startswith('vmmu.server')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out == "[]\n"


def test_batch_layout_matches_the_proto_example():
    batch = BatchBuilder().write(0x1000, data=b"ABCDEFGH").read(0x1000, 8, with_data=True).build()
    assert batch == Batch(gpas=bytes.fromhex("0010000000000000" * 2), ops=b"\x1e\x1d",
                          write_data=b"ABCDEFGH")
    assert len(batch) == 2


def test_batch_ops_without_data_and_sizes():
    batch = BatchBuilder().read(0x2000, 1).write(0x3002, 2).fetch(0x4004, 4).build()
    assert batch.ops == bytes([0b00_01, 0b01_10, 0b10_11])
    assert batch.write_data == b""
    assert batch.gpas == b"".join(g.to_bytes(8, "little") for g in (0x2000, 0x3002, 0x4004))


@pytest.mark.parametrize("build", [
    lambda b: b.read(0x1000, 3),
    lambda b: b.write(0x1000, 4, data=b"12345678"),
    lambda b: b.write(0x1000, data=b"123"),
])
def test_batch_builder_refuses_what_cannot_be_encoded(build):
    with pytest.raises(ValueError):
        build(BatchBuilder())


def test_errors_carry_the_errno_and_the_error_info():
    details = "EINVAL: guest_phys_addr 0x1001 is not page aligned"
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(
        reason="EINVAL", domain="vmmu.dev",
        metadata={"vm_id": "3", "method": "/vmmu.v1.MemslotService/X"}))
    status = status_pb2.Status(code=3, message=details, details=[info])
    error = error_from_status(grpc.StatusCode.INVALID_ARGUMENT, details,
                              [("grpc-status-details-bin", status.SerializeToString())])
    assert type(error) is InvalidArgument
    assert (error.code, error.errno, error.errno_name, error.reason) == \
        (grpc.StatusCode.INVALID_ARGUMENT, errno.EINVAL, "EINVAL",
         "guest_phys_addr 0x1001 is not page aligned")
    assert error.metadata == {"vm_id": "3", "method": "/vmmu.v1.MemslotService/X"}
    assert type(error_from_status(grpc.StatusCode.ALREADY_EXISTS, "EEXIST: x")) is AlreadyExists

    foreign = error_from_status(grpc.StatusCode.DEADLINE_EXCEEDED, None)
    assert type(foreign) is VmmuError
    assert (foreign.errno, foreign.metadata) == (None, {})
    assert (foreign.errno_name, foreign.reason) == (None, "DEADLINE_EXCEEDED")
