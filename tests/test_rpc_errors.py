"""The error contract of the wire: one errno -> status table, errno names in the details,
and malformed protobuf input refused before the model is called."""

from __future__ import annotations

import errno
import logging
import pathlib
import re

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from vmmu.client import AsyncClient, Client, Internal, NotFound
from vmmu.server.kvm import Vm
from vmmu.server.kvm.errors import KvmError, NoSuchObject, VmBugged
from vmmu.server.rpc.errors import STATUS_BY_ERRNO, status_of
from vmmu.v1 import (host_memory_pb2, host_memory_pb2_grpc, vcpu_pb2, vcpu_pb2_grpc, vm_pb2,
                     vm_pb2_grpc)

C = grpc.StatusCode


@pytest.mark.parametrize("code, expected", [
    (errno.EINVAL, C.INVALID_ARGUMENT), (errno.EFAULT, C.INVALID_ARGUMENT),
    (errno.EEXIST, C.ALREADY_EXISTS), (errno.ENOENT, C.NOT_FOUND),
    (errno.ENOMEM, C.RESOURCE_EXHAUSTED), (errno.ENOSPC, C.RESOURCE_EXHAUSTED),
    (errno.E2BIG, C.RESOURCE_EXHAUSTED), (errno.EBUSY, C.FAILED_PRECONDITION),
    (errno.ENXIO, C.FAILED_PRECONDITION), (errno.EOPNOTSUPP, C.FAILED_PRECONDITION),
    (errno.EPERM, C.PERMISSION_DENIED),
    (errno.EINTR, C.ABORTED), (errno.EIO, C.INTERNAL), (errno.EDOM, C.UNKNOWN),
])
def test_status_table(code, expected):
    status, details = status_of(KvmError(code, "why"))
    assert status is expected
    assert details == f"{errno.errorcode[code]}: why"


def test_no_such_object_and_vm_bugged():
    assert status_of(NoSuchObject("no VM 7")) == (C.NOT_FOUND, "ENOENT: no VM 7")
    assert status_of(VmBugged("freed table reached")) == \
        (C.INTERNAL, "VmBugged: freed table reached")


@pytest.fixture
def channel(server):
    with grpc.insecure_channel(server.address) as channel:
        yield channel


def _status(call, request):
    with pytest.raises(grpc.RpcError) as excinfo:
        call(request)
    return excinfo.value.code(), excinfo.value.details()


def _create_vm(channel) -> int:
    config = vm_pb2.VmConfig(max_vcpus=1, tdp_levels=4)
    return vm_pb2_grpc.VmServiceStub(channel).CreateVm(vm_pb2.CreateVmRequest(config=config)).vm.id


def test_create_vm_with_an_empty_request_takes_the_defaults(channel):
    stub = vm_pb2_grpc.VmServiceStub(channel)
    vm = stub.CreateVm(vm_pb2.CreateVmRequest()).vm
    assert (vm.config.max_vcpus, vm.config.tdp_levels, vm.config.ad_bits, vm.name) == \
        (8, 4, True, "")
    assert [v.id for v in stub.ListVms(vm_pb2.ListVmsRequest()).vms] == [vm.id]


@pytest.mark.parametrize("backing, name", [
    (host_memory_pb2.BACKING_UNSPECIFIED, "BACKING_UNSPECIFIED"), (99, "99")])
def test_region_needs_a_known_backing(channel, backing, name):
    vm_id = _create_vm(channel)
    stub = host_memory_pb2_grpc.HostMemoryServiceStub(channel)

    code, details = _status(stub.CreateRegion, host_memory_pb2.CreateRegionRequest(
        vm_id=vm_id, size=1 << 20, backing=backing))
    assert code is C.INVALID_ARGUMENT
    assert details == f"EINVAL: backing {name} is not a valid backing"
    assert stub.ListRegions(host_memory_pb2.ListRegionsRequest(vm_id=vm_id)).regions == []


@pytest.mark.parametrize("stream", [False, True], ids=["RunBatch", "Run"])
def test_run_step_needs_a_batch_or_a_completion(channel, stream):
    vm_id = _create_vm(channel)
    stub = vcpu_pb2_grpc.VcpuServiceStub(channel)
    stub.CreateVcpu(vcpu_pb2.CreateVcpuRequest(vm_id=vm_id, vcpu_id=0))

    if stream:                                  # refused in its response; the stream goes on
        (response,) = stub.Run(iter([vcpu_pb2.RunRequest(vm_id=vm_id, vcpu_id=0)]))
        assert (response.error.code, response.error.reason) == \
            (C.INVALID_ARGUMENT.value[0], "EINVAL")
        code, details = C.INVALID_ARGUMENT, response.error.message
    else:
        code, details = _status(stub.RunBatch, vcpu_pb2.RunBatchRequest(vm_id=vm_id, vcpu_id=0))
    assert code is C.INVALID_ARGUMENT
    assert details.startswith("EINVAL: ") and \
        "needs a batch, an mmio_completion or a resume" in details
    stats = stub.GetVcpuStats(vcpu_pb2.GetVcpuStatsRequest(vm_id=vm_id, vcpu_id=0)).stats
    assert stats["accesses"] == stats["exits"] == 0


def test_broken_invariant_reaches_the_client_as_internal(server, monkeypatch):
    def bugged(vm: Vm) -> dict[str, int]:
        raise VmBugged(f"VM {vm.id}: SPTE points to a freed table")

    with Client(server.address) as client:
        vm = client.create_vm()
        monkeypatch.setattr(Vm, "stats", bugged)
        with pytest.raises(Internal) as excinfo:
            vm.stats()
    assert str(excinfo.value) == f"VmBugged: VM {vm.id}: SPTE points to a freed table"
    assert excinfo.value.errno == errno.EIO


def test_madvise_populate_write_over_the_wire(channel):
    vm_id = _create_vm(channel)
    stub = host_memory_pb2_grpc.HostMemoryServiceStub(channel)
    region = stub.CreateRegion(host_memory_pb2.CreateRegionRequest(
        vm_id=vm_id, size=4 << 20, backing=host_memory_pb2.BACKING_THP)).region
    stub.Mprotect(host_memory_pb2.MprotectRequest(vm_id=vm_id, hva=region.hva + (3 << 20),
                                                  size=4096, protection=host_memory_pb2.PROTECTION_READ))

    def madvise(hva, size, advice=host_memory_pb2.ADVICE_POPULATE_WRITE):
        return host_memory_pb2.MadviseRequest(vm_id=vm_id, hva=hva, size=size, advice=advice)

    def populated():
        regions = stub.ListRegions(host_memory_pb2.ListRegionsRequest(vm_id=vm_id)).regions
        return [r.populated_4k_pages for r in regions]

    assert stub.Madvise(madvise(region.hva + 4096, 4096)).pages_populated == 512   # a THP
    assert stub.Madvise(madvise(region.hva, 2 << 20)).pages_populated == 0
    assert populated() == [512]
    data = stub.ReadHva(host_memory_pb2.ReadHvaRequest(vm_id=vm_id, hva=region.hva,
                                                       length=2 << 20)).data
    assert data == bytes(2 << 20)

    for request, code, details in [
            (madvise(region.hva + 1, 4096), C.INVALID_ARGUMENT, "EINVAL: [0x"),
            (madvise(region.hva, 0), C.INVALID_ARGUMENT, "EINVAL: [0x"),
            (madvise(region.hva + (2 << 20), 2 << 20), C.INVALID_ARGUMENT,   # read-only page
             f"EINVAL: [{region.hva + (2 << 20):#x}, {region.hva + (4 << 20):#x}) is not all"),
            (madvise(region.hva + (3 << 20) + 4096, 1 << 20), C.RESOURCE_EXHAUSTED,  # runs off
             f"ENOMEM: hva {region.hva + (4 << 20):#x} is not mapped"),
            (madvise(0x1000, 4096), C.RESOURCE_EXHAUSTED, "ENOMEM: hva 0x1000 is not mapped")]:
        got_code, got_details = _status(stub.Madvise, request)
        assert got_code is code and got_details.startswith(details), got_details
    assert populated() == [512]                     # the rejected requests changed nothing

    dropped = stub.Madvise(madvise(region.hva, 2 << 20, host_memory_pb2.ADVICE_DONTNEED))
    assert dropped.pages_populated == 0 and populated() == [0]


def _error_info(exc: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(exc)
    assert status is not None, "the status carries no google.rpc.Status"
    (detail,) = status.details
    info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(info)
    return info


def test_every_error_carries_an_error_info_naming_the_errno_and_the_object(channel):
    vm_id = _create_vm(channel)
    stub = vcpu_pb2_grpc.VcpuServiceStub(channel)
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.GetVcpu(vcpu_pb2.GetVcpuRequest(vm_id=vm_id, vcpu_id=5))
    assert excinfo.value.code() is C.NOT_FOUND
    info = _error_info(excinfo.value)
    assert (info.reason, info.domain) == ("ENOENT", "vmmu.dev")
    assert dict(info.metadata) == {"vm_id": str(vm_id), "vcpu_id": "5",
                                   "method": "/vmmu.v1.VcpuService/GetVcpu"}


_CORRUPT = b"\xff\xff\xff"                  # no protobuf parses this wire format


@pytest.mark.parametrize("method, kind, data", [
    ("/vmmu.v1.VmService/CreateVm", "unary_unary", _CORRUPT),
    ("/vmmu.v1.VmService/CreateVm", "unary_unary", b"\x0a\x03\x22\x01\xff"),  # name not UTF-8
    ("/vmmu.v1.TraceService/Trace", "unary_stream", _CORRUPT),
    ("/vmmu.v1.VcpuService/Run", "stream_stream", _CORRUPT)],
    ids=["unary", "unary-utf8", "server-stream", "bidi-stream"])
def test_undecodable_requests_are_invalid_arguments(channel, method, kind, data):
    call = getattr(channel, kind)(method)
    with pytest.raises(grpc.RpcError) as excinfo:
        if kind == "unary_unary":
            call(data)
        elif kind == "unary_stream":
            list(call(data))
        else:
            list(call(iter([data])))
    assert excinfo.value.code() is C.INVALID_ARGUMENT
    assert excinfo.value.details().startswith("EINVAL: undecodable request: ")
    assert _error_info(excinfo.value).reason == "EINVAL"
    assert vm_pb2_grpc.VmServiceStub(channel).ListVms(vm_pb2.ListVmsRequest()).vms == []


def test_a_bug_of_ours_is_internal_with_no_python_text_and_is_logged(server, monkeypatch,
                                                                     caplog):
    def broken(vm: Vm) -> dict[str, int]:
        raise AttributeError("'NoneType' object has no attribute 'secret'")

    with Client(server.address) as client:
        vm = client.create_vm()
        monkeypatch.setattr(Vm, "stats", broken)
        with caplog.at_level(logging.INFO, logger="vmmu.rpc"), \
                pytest.raises(Internal) as excinfo:
            vm.stats()
    assert "secret" not in str(excinfo.value) and "NoneType" not in str(excinfo.value)
    assert re.fullmatch(r"internal error #\d+, logged on the server", excinfo.value.reason)
    assert excinfo.value.errno == errno.EIO
    (record,) = [r for r in caplog.records if r.name == "vmmu.rpc"]
    assert "secret" in record.exc_text                       # the traceback stays here


def test_every_error_is_logged_as_one_structured_line(channel, caplog):
    stub = vm_pb2_grpc.VmServiceStub(channel)
    with caplog.at_level(logging.INFO, logger="vmmu.rpc"):
        _status(stub.GetVm, vm_pb2.GetVmRequest(vm_id=99))
    (record,) = [r for r in caplog.records if r.name == "vmmu.rpc"]
    line = record.getMessage()
    assert "\n" not in line
    assert re.match(r"rpc error method=/vmmu\.v1\.VmService/GetVm code=NOT_FOUND "
                    r"errno=ENOENT peer=ipv4:127\.0\.0\.1:\d+ reason=", line), line


def test_every_errno_the_model_raises_has_a_status():
    """The table is complete: no model error can fall through to UNKNOWN."""
    root = pathlib.Path(__file__).parent.parent / "server"
    raised = {name for path in root.rglob("*.py")
              for name in re.findall(r"errno\.(E[A-Z0-9]+)", path.read_text())}
    assert raised and {name for name in raised
                       if getattr(errno, name) not in STATUS_BY_ERRNO} == set()


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
async def test_both_clients_expose_the_errno_and_metadata(server, sync):
    if sync:
        with Client(server.address) as client, pytest.raises(NotFound) as excinfo:
            client.vm(41).info()
    else:
        async with AsyncClient(server.address) as client:
            with pytest.raises(NotFound) as excinfo:
                await client.vm(41).info()
    assert excinfo.value.errno == errno.ENOENT
    assert excinfo.value.metadata["vm_id"] == "41"


@pytest.mark.parametrize("tdp_levels, gpa, code", [
    (4, 1 << 50, C.INVALID_ARGUMENT), (4, 1 << 48, C.INVALID_ARGUMENT),
    (4, (1 << 48) - 8, C.OK), (5, 1 << 50, C.OK)])
def test_a_gpa_beyond_the_guest_address_width_is_invalid(channel, tdp_levels, gpa, code):
    """A guest cannot make an access beyond its MAXPHYADDR (48 bits under a 4-level
    EPT): such a batch is refused, where one within the width exits to MMIO."""
    config = vm_pb2.VmConfig(max_vcpus=1, tdp_levels=tdp_levels)
    vm_id = vm_pb2_grpc.VmServiceStub(channel).CreateVm(
        vm_pb2.CreateVmRequest(config=config)).vm.id
    stub = vcpu_pb2_grpc.VcpuServiceStub(channel)
    stub.CreateVcpu(vcpu_pb2.CreateVcpuRequest(vm_id=vm_id, vcpu_id=0))
    batch = vcpu_pb2.AccessBatch(gpas=gpa.to_bytes(8, "little"), ops=bytes([0x0d]))
    request = vcpu_pb2.RunBatchRequest(vm_id=vm_id, vcpu_id=0, batch=batch)
    if code is C.OK:
        assert stub.RunBatch(request).result.exit.reason == vcpu_pb2.EXIT_REASON_MMIO
        return
    got, details = _status(stub.RunBatch, request)
    assert got is code and "beyond the guest physical address width (48 bits)" in details
    stats = stub.GetVcpuStats(vcpu_pb2.GetVcpuStatsRequest(vm_id=vm_id, vcpu_id=0)).stats
    assert stats["exits"] == 0
