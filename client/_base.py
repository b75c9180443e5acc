"""What `Client` and `AsyncClient` share: every operation as a `Call`, with no I/O.

A `Call` names the stub method, carries the request and knows how to parse the response
into the client's dataclasses. The two clients differ only in how they invoke it (a
blocking or an awaited stub call) and both translate a failed call with
`errors.error_from_rpc`, once, in their `_invoke`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc

from vmmu.client.batch import Batch
from vmmu.client.types import (Backing, Exit, ExitReason, HostRegion, Memslot, RunResult, Spte,
                               VcpuInfo, VmConfig, VmInfo)
from vmmu.v1 import (host_memory_pb2, host_memory_pb2_grpc, memslot_pb2, memslot_pb2_grpc,
                     vcpu_pb2, vcpu_pb2_grpc, vm_pb2, vm_pb2_grpc)

__all__ = ["Call", "Stubs", "CHANNEL_OPTIONS"]

T = TypeVar("T")

# The server accepts requests of up to 32 MiB (a batch of 2**20 accesses with data is
# 17 MiB); gRPC's default of 4 MiB would cut batches and read_data short.
MAX_MESSAGE_BYTES = 32 << 20
CHANNEL_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]

_BACKING_TO_WIRE = {b: host_memory_pb2.Backing.Value(f"BACKING_{b.name}") for b in Backing}
_BACKING_FROM_WIRE = {wire: b for b, wire in _BACKING_TO_WIRE.items()}
_EXIT_REASON_FROM_WIRE = {vcpu_pb2.ExitReason.Value(f"EXIT_REASON_{r.name}"): r
                          for r in ExitReason}
_SPTE_KIND_FROM_WIRE = {vm_pb2.SpteKind.Value(name): name.removeprefix("SPTE_KIND_")
                        .lower().replace("_", "-") for name in vm_pb2.SpteKind.keys()}


class Stubs:
    """The generated stubs of every vmmu.v1 service over one channel (sync or aio)."""

    def __init__(self, channel: grpc.Channel | grpc.aio.Channel) -> None:
        self.vm = vm_pb2_grpc.VmServiceStub(channel)
        self.host_memory = host_memory_pb2_grpc.HostMemoryServiceStub(channel)
        self.memslot = memslot_pb2_grpc.MemslotServiceStub(channel)
        self.vcpu = vcpu_pb2_grpc.VcpuServiceStub(channel)


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One unary RPC: `stubs.<service>.<method>(request)`, its response parsed by `parse`."""

    service: str
    method: str
    request: Any
    parse: Callable[[Any], T]

    def stub_method(self, stubs: Stubs) -> Callable[[Any], Any]:
        return getattr(getattr(stubs, self.service), self.method)


def _none(response: Any) -> None:
    return None


# -- proto -> dataclass ----------------------------------------------------------------

def vm_info(m: vm_pb2.VmInfo) -> VmInfo:
    c = m.config
    return VmInfo(id=m.id, name=m.name,
                  config=VmConfig(max_vcpus=c.max_vcpus, tdp_levels=c.tdp_levels,
                                  ad_bits=c.ad_bits, name=c.name),
                  nr_vcpus=m.nr_vcpus, nr_memslots=m.nr_memslots,
                  nr_host_regions=m.nr_host_regions, dead=m.dead)


def spte(m: vm_pb2.Spte) -> Spte:
    return Spte(level=m.level, gfn=m.gfn, index=m.index, spte=m.spte,
                kind=_SPTE_KIND_FROM_WIRE[m.kind], pfn=m.pfn, readable=m.readable,
                writable=m.writable, executable=m.executable, large=m.large,
                accessed=m.accessed, dirty=m.dirty, host_writable=m.host_writable,
                mmu_writable=m.mmu_writable)


def host_region(m: host_memory_pb2.HostRegion) -> HostRegion:
    return HostRegion(hva=m.hva, size=m.size, backing=_BACKING_FROM_WIRE[m.backing],
                      writable=not m.read_only, populated_4k_pages=m.populated_4k_pages)


def memslot(m: memslot_pb2.Memslot) -> Memslot:
    return Memslot(as_id=m.as_id, id=m.id, flags=m.flags, guest_phys_addr=m.guest_phys_addr,
                   memory_size=m.memory_size, userspace_addr=m.userspace_addr)


def vcpu_info(m: vcpu_pb2.VcpuInfo) -> VcpuInfo:
    return VcpuInfo(id=m.id, running=m.running, mmio_pending=m.mmio_pending)


def run_result(m: vcpu_pb2.RunResult) -> RunResult:
    e = m.exit
    return RunResult(
        completed=m.completed,
        exit=Exit(reason=_EXIT_REASON_FROM_WIRE[e.reason], gpa=e.gpa, length=e.length,
                  is_write=e.is_write, data=e.data, errno=e.errno, message=e.message),
        read_data=m.read_data)


# -- VMs -------------------------------------------------------------------------------

def create_vm(max_vcpus: int, tdp_levels: int, ad_bits: bool, name: str) -> Call[VmInfo]:
    config = vm_pb2.VmConfig(max_vcpus=max_vcpus, tdp_levels=tdp_levels, ad_bits=ad_bits,
                             name=name)
    return Call("vm", "CreateVm", vm_pb2.CreateVmRequest(config=config),
                lambda r: vm_info(r.vm))


def destroy_vm(vm_id: int) -> Call[None]:
    return Call("vm", "DestroyVm", vm_pb2.DestroyVmRequest(vm_id=vm_id), _none)


def list_vms() -> Call[list[VmInfo]]:
    return Call("vm", "ListVms", vm_pb2.ListVmsRequest(), lambda r: [vm_info(v) for v in r.vms])


def get_vm(vm_id: int) -> Call[VmInfo]:
    return Call("vm", "GetVm", vm_pb2.GetVmRequest(vm_id=vm_id), lambda r: vm_info(r.vm))


def vm_stats(vm_id: int) -> Call[dict[str, int]]:
    return Call("vm", "GetVmStats", vm_pb2.GetVmStatsRequest(vm_id=vm_id),
                lambda r: dict(r.stats))


def walk(vm_id: int, gpa: int, as_id: int) -> Call[list[Spte]]:
    return Call("vm", "WalkEpt", vm_pb2.WalkEptRequest(vm_id=vm_id, gpa=gpa, as_id=as_id),
                lambda r: [spte(s) for s in r.sptes])


# -- host memory -----------------------------------------------------------------------

def mmap(vm_id: int, size: int, backing: Backing, writable: bool, hva: int | None
         ) -> Call[HostRegion]:
    request = host_memory_pb2.CreateRegionRequest(
        vm_id=vm_id, size=size, backing=_BACKING_TO_WIRE[backing], read_only=not writable,
        hva=hva)
    return Call("host_memory", "CreateRegion", request, lambda r: host_region(r.region))


def munmap(vm_id: int, hva: int, size: int) -> Call[None]:
    return Call("host_memory", "DestroyRegion",
                host_memory_pb2.DestroyRegionRequest(vm_id=vm_id, hva=hva, size=size), _none)


def host_regions(vm_id: int) -> Call[list[HostRegion]]:
    return Call("host_memory", "ListRegions", host_memory_pb2.ListRegionsRequest(vm_id=vm_id),
                lambda r: [host_region(m) for m in r.regions])


def read_hva(vm_id: int, hva: int, length: int) -> Call[bytes]:
    return Call("host_memory", "ReadHva",
                host_memory_pb2.ReadHvaRequest(vm_id=vm_id, hva=hva, length=length),
                lambda r: r.data)


def write_hva(vm_id: int, hva: int, data: bytes) -> Call[None]:
    return Call("host_memory", "WriteHva",
                host_memory_pb2.WriteHvaRequest(vm_id=vm_id, hva=hva, data=data), _none)


# -- memslots --------------------------------------------------------------------------

def set_user_memory_region(vm_id: int, slot: int, flags: int, guest_phys_addr: int,
                           memory_size: int, userspace_addr: int) -> Call[None]:
    request = memslot_pb2.SetUserMemoryRegionRequest(
        vm_id=vm_id, slot=slot, flags=flags, guest_phys_addr=guest_phys_addr,
        memory_size=memory_size, userspace_addr=userspace_addr)
    return Call("memslot", "SetUserMemoryRegion", request, _none)


def memslots(vm_id: int) -> Call[list[Memslot]]:
    return Call("memslot", "ListMemslots", memslot_pb2.ListMemslotsRequest(vm_id=vm_id),
                lambda r: [memslot(m) for m in r.memslots])


# -- vCPUs -----------------------------------------------------------------------------

def create_vcpu(vm_id: int, vcpu_id: int) -> Call[VcpuInfo]:
    return Call("vcpu", "CreateVcpu",
                vcpu_pb2.CreateVcpuRequest(vm_id=vm_id, vcpu_id=vcpu_id),
                lambda r: vcpu_info(r.vcpu))


def get_vcpu(vm_id: int, vcpu_id: int) -> Call[VcpuInfo]:
    return Call("vcpu", "GetVcpu", vcpu_pb2.GetVcpuRequest(vm_id=vm_id, vcpu_id=vcpu_id),
                lambda r: vcpu_info(r.vcpu))


def vcpu_stats(vm_id: int, vcpu_id: int) -> Call[dict[str, int]]:
    return Call("vcpu", "GetVcpuStats",
                vcpu_pb2.GetVcpuStatsRequest(vm_id=vm_id, vcpu_id=vcpu_id),
                lambda r: dict(r.stats))


def _access_batch(batch: Batch) -> vcpu_pb2.AccessBatch:
    return vcpu_pb2.AccessBatch(gpas=batch.gpas, ops=batch.ops, write_data=batch.write_data)


def run_batch(vm_id: int, vcpu_id: int, batch: Batch) -> Call[RunResult]:
    request = vcpu_pb2.RunBatchRequest(vm_id=vm_id, vcpu_id=vcpu_id,
                                       batch=_access_batch(batch))
    return Call("vcpu", "RunBatch", request, lambda r: run_result(r.result))


def complete_mmio(vm_id: int, vcpu_id: int, data: bytes) -> Call[RunResult]:
    request = vcpu_pb2.RunBatchRequest(vm_id=vm_id, vcpu_id=vcpu_id,
                                       mmio_completion=vcpu_pb2.MmioCompletion(data=data))
    return Call("vcpu", "RunBatch", request, lambda r: run_result(r.result))


def run_request(vm_id: int, vcpu_id: int, batch: Batch) -> vcpu_pb2.RunRequest:
    """A step of the Run stream that starts `batch`."""
    return vcpu_pb2.RunRequest(vm_id=vm_id, vcpu_id=vcpu_id, batch=_access_batch(batch))


def mmio_request(vm_id: int, vcpu_id: int, data: bytes) -> vcpu_pb2.RunRequest:
    """A step of the Run stream that completes the pending MMIO access."""
    return vcpu_pb2.RunRequest(vm_id=vm_id, vcpu_id=vcpu_id,
                               mmio_completion=vcpu_pb2.MmioCompletion(data=data))
