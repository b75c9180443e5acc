"""The error contract of the wire: one errno -> status table, errno names in the details,
and malformed protobuf input refused before the model is called."""

from __future__ import annotations

import errno

import grpc
import pytest

from vmmu.client import Client, Internal
from vmmu.server.kvm import Vm
from vmmu.server.kvm.errors import KvmError, NoSuchObject, VmBugged
from vmmu.server.rpc.errors import status_of
from vmmu.v1 import (host_memory_pb2, host_memory_pb2_grpc, vcpu_pb2, vcpu_pb2_grpc, vm_pb2,
                     vm_pb2_grpc)

C = grpc.StatusCode


@pytest.mark.parametrize("code, expected", [
    (errno.EINVAL, C.INVALID_ARGUMENT), (errno.EFAULT, C.INVALID_ARGUMENT),
    (errno.EEXIST, C.ALREADY_EXISTS), (errno.ENOENT, C.NOT_FOUND),
    (errno.ENOMEM, C.RESOURCE_EXHAUSTED), (errno.ENOSPC, C.RESOURCE_EXHAUSTED),
    (errno.E2BIG, C.RESOURCE_EXHAUSTED), (errno.EBUSY, C.FAILED_PRECONDITION),
    (errno.ENXIO, C.FAILED_PRECONDITION), (errno.EPERM, C.PERMISSION_DENIED),
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


def test_create_vm_without_config_is_invalid(channel):
    stub = vm_pb2_grpc.VmServiceStub(channel)
    code, details = _status(stub.CreateVm, vm_pb2.CreateVmRequest())
    assert code is C.INVALID_ARGUMENT
    assert details == "EINVAL: CreateVmRequest.config is required"
    assert stub.ListVms(vm_pb2.ListVmsRequest()).vms == []


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

    if stream:
        code, details = _status(lambda r: list(stub.Run(iter([r]))),
                                vcpu_pb2.RunRequest(vm_id=vm_id, vcpu_id=0))
    else:
        code, details = _status(stub.RunBatch, vcpu_pb2.RunBatchRequest(vm_id=vm_id, vcpu_id=0))
    assert code is C.INVALID_ARGUMENT
    assert details.startswith("EINVAL: ") and "needs a batch or an mmio_completion" in details
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
    assert excinfo.value.errno_name is None
