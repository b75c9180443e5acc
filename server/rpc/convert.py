"""Conversions between the wire messages of vmmu.v1 and the model's values.

Requests are checked here for what only protobuf can get wrong (a missing message, an
UNSPECIFIED or unknown enum value, an empty oneof) and rejected with EINVAL before any
model call, so a malformed request changes nothing. Everything else is the model's to
validate, with KVM's errors. Enum tables are built by name at import: an enum value the
wire cannot carry fails at startup, not on the first request that meets it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmmu.server.kvm import AccessBatch, Backing, ExitReason, VmConfig
from vmmu.server.kvm.errors import einval
from vmmu.v1 import host_memory_pb2, memslot_pb2, vcpu_pb2, vm_pb2

if TYPE_CHECKING:
    from vmmu.server.kvm import (HostRegionInfo, MemslotInfo, RunResult, SpteInfo, VcpuInfo,
                                 VmInfo)

__all__ = [
    "vm_config", "vm_info", "spte",
    "backing", "host_region",
    "memslot",
    "vcpu_info", "run_step", "run_result",
]

_BACKING_TO_WIRE = {b: host_memory_pb2.Backing.Value(f"BACKING_{b.name}") for b in Backing}
_BACKING_FROM_WIRE = {wire: b for b, wire in _BACKING_TO_WIRE.items()}
_EXIT_REASON_TO_WIRE = {r: vcpu_pb2.ExitReason.Value(f"EXIT_REASON_{r.name}")
                        for r in ExitReason}
_SPTE_KINDS = ("non-present", "frozen", "mmio", "table", "leaf")
_SPTE_KIND_TO_WIRE = {k: vm_pb2.SpteKind.Value("SPTE_KIND_" + k.upper().replace("-", "_"))
                      for k in _SPTE_KINDS}


# -- VMs -------------------------------------------------------------------------------

def vm_config(request: vm_pb2.CreateVmRequest) -> VmConfig:
    if not request.HasField("config"):
        raise einval("CreateVmRequest.config is required")
    c = request.config
    return VmConfig(max_vcpus=c.max_vcpus, tdp_levels=c.tdp_levels, ad_bits=c.ad_bits,
                    name=c.name)


def _vm_config_to_wire(config: VmConfig) -> vm_pb2.VmConfig:
    return vm_pb2.VmConfig(max_vcpus=config.max_vcpus, tdp_levels=config.tdp_levels,
                           ad_bits=config.ad_bits, name=config.name)


def vm_info(info: VmInfo) -> vm_pb2.VmInfo:
    return vm_pb2.VmInfo(id=info.id, name=info.name, config=_vm_config_to_wire(info.config),
                         nr_vcpus=info.nr_vcpus, nr_memslots=info.nr_memslots,
                         nr_host_regions=info.nr_host_regions, dead=info.dead)


def spte(info: SpteInfo) -> vm_pb2.Spte:
    return vm_pb2.Spte(
        level=info.level, gfn=info.gfn, index=info.index, spte=info.spte,
        kind=_SPTE_KIND_TO_WIRE[info.kind], pfn=info.pfn,
        readable=info.readable, writable=info.writable, executable=info.executable,
        large=info.large, accessed=info.accessed, dirty=info.dirty,
        host_writable=info.host_writable, mmu_writable=info.mmu_writable)


# -- host memory -----------------------------------------------------------------------

def backing(value: int) -> Backing:
    if value not in _BACKING_FROM_WIRE:
        name = host_memory_pb2.Backing.Name(value) if value in host_memory_pb2.Backing.values() \
            else str(value)
        raise einval(f"backing {name} is not a valid backing")
    return _BACKING_FROM_WIRE[value]


def host_region(info: HostRegionInfo) -> host_memory_pb2.HostRegion:
    return host_memory_pb2.HostRegion(
        hva=info.hva, size=info.size, backing=_BACKING_TO_WIRE[info.backing],
        read_only=not info.writable, populated_4k_pages=info.populated_4k_pages)


# -- memslots --------------------------------------------------------------------------

def memslot(info: MemslotInfo) -> memslot_pb2.Memslot:
    return memslot_pb2.Memslot(
        as_id=info.as_id, id=info.id, flags=info.flags, guest_phys_addr=info.guest_phys_addr,
        memory_size=info.memory_size, userspace_addr=info.userspace_addr)


# -- vCPUs -----------------------------------------------------------------------------

def vcpu_info(info: VcpuInfo) -> vcpu_pb2.VcpuInfo:
    return vcpu_pb2.VcpuInfo(id=info.id, running=info.running, mmio_pending=info.mmio_pending)


def run_step(request: vcpu_pb2.RunRequest | vcpu_pb2.RunBatchRequest
             ) -> dict[str, AccessBatch | bytes]:
    """The keyword arguments of `Vcpu.run` for one step: a batch or an MMIO completion."""
    step = request.WhichOneof("step")
    if step == "batch":
        b = request.batch
        return {"batch": AccessBatch.from_wire(b.gpas, b.ops, b.write_data)}
    if step == "mmio_completion":
        return {"mmio_data": request.mmio_completion.data}
    raise einval(f"{type(request).__name__} needs a batch or an mmio_completion")


def run_result(result: RunResult) -> vcpu_pb2.RunResult:
    e = result.exit
    return vcpu_pb2.RunResult(
        completed=result.completed,
        exit=vcpu_pb2.Exit(reason=_EXIT_REASON_TO_WIRE[e.reason], gpa=e.gpa,
                           length=e.length, is_write=e.is_write, data=e.data,
                           errno=e.errno, message=e.message),
        read_data=result.read_data)
