"""Conversions between the wire messages of vmmu.v1 and the model's values.

Requests are checked here for what only protobuf can get wrong (a missing message, an
UNSPECIFIED or unknown enum value, an empty oneof) and rejected with EINVAL before any
model call, so a malformed request changes nothing. Everything else is the model's to
validate, with KVM's errors. Enum tables are built by name at import: an enum value the
wire cannot carry fails at startup, not on the first request that meets it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from google.protobuf import duration_pb2

from vmmu.server.kvm import (PROT_NONE, PROT_READ, PROT_WRITE, AccessBatch, Backing,
                             ExitReason, VmConfig)
from vmmu.server.kvm.errors import einval
from vmmu.server.kvm.held import HoldState
from vmmu.server.kvm.trace import DEFAULT_CAPACITY
from vmmu.server.kvm.vm import CLOCKS, POLICIES
from vmmu.v1 import host_memory_pb2, memslot_pb2, notifier_pb2, trace_pb2, vcpu_pb2, vm_pb2

if TYPE_CHECKING:
    from vmmu.server.kvm import (HostRegionInfo, MemslotInfo, RunResult, SpteInfo, VcpuInfo,
                                 Vm, VmInfo)
    from vmmu.server.kvm.held import HeldInvalidationInfo
    from vmmu.server.kvm.trace import TraceEvent

__all__ = [
    "vm_config", "vm_info", "spte", "clock",
    "backing", "host_region", "madvise", "protection",
    "memslot",
    "vcpu_info", "run_step", "run_result", "run_response",
    "lease_s", "held_invalidation",
    "trace_subscription", "trace_event",
]

_BACKING_TO_WIRE = {b: host_memory_pb2.Backing.Value(f"BACKING_{b.name}") for b in Backing}
_BACKING_FROM_WIRE = {wire: b for b, wire in _BACKING_TO_WIRE.items()}
_EXIT_REASON_TO_WIRE = {r: vcpu_pb2.ExitReason.Value(f"EXIT_REASON_{r.name}")
                        for r in ExitReason}
_SPTE_KINDS = ("non-present", "frozen", "mmio", "table", "leaf")
_SPTE_KIND_TO_WIRE = {k: vm_pb2.SpteKind.Value("SPTE_KIND_" + k.upper().replace("-", "_"))
                      for k in _SPTE_KINDS}
_PROTECTION_FROM_WIRE = {host_memory_pb2.PROTECTION_NONE: PROT_NONE,
                         host_memory_pb2.PROTECTION_READ: PROT_READ,
                         host_memory_pb2.PROTECTION_READ_WRITE: PROT_READ | PROT_WRITE}
_MADVISE_FROM_WIRE = {host_memory_pb2.ADVICE_DONTNEED: "madvise_dontneed",
                      host_memory_pb2.ADVICE_POPULATE_WRITE: "madvise_populate_write"}
_HOLD_STATE_TO_WIRE = {s: notifier_pb2.HoldState.Value(f"HOLD_STATE_{s.name}")
                       for s in HoldState}


class _Choice:
    """A VmConfig field whose values are names (a clock, a policy) and a wire enum
    `<PREFIX>_<NAME>` for each, with UNSPECIFIED (0) for VmConfig's default."""

    def __init__(self, field: str, enum, names: tuple[str, ...]) -> None:
        self.field, self.enum = field, enum
        prefix = enum.DESCRIPTOR.values_by_number[0].name.removesuffix("UNSPECIFIED")
        self.to_wire = {name: enum.Value(prefix + name.upper()) for name in names}
        self.from_wire = {wire: name for name, wire in self.to_wire.items()}

    def from_config(self, c: vm_pb2.VmConfig) -> dict[str, str]:
        """The keyword argument of VmConfig for this field; none when unspecified."""
        value = getattr(c, self.field)
        if value == 0:
            return {}
        if value not in self.from_wire:
            raise einval(f"{self.field} {value} is not one of "
                         f"{', '.join(self.enum.Name(v) for v in self.from_wire)}")
        return {self.field: self.from_wire[value]}


_CHOICES = [_Choice("clock", vm_pb2.Clock, CLOCKS),
            _Choice("fault_lock", vm_pb2.FaultLock, POLICIES["fault_lock"]),
            _Choice("table_free", vm_pb2.TableFree, POLICIES["table_free"]),
            _Choice("aging_lock", vm_pb2.AgingLock, POLICIES["aging_lock"])]


# -- VMs -------------------------------------------------------------------------------

def vm_config(request: vm_pb2.CreateVmRequest) -> VmConfig:
    """The VM's config; VmConfig's defaults for an absent `config` and absent fields, and
    for zero `max_vcpus` and `tdp_levels` (proto3 cannot tell them from absent)."""
    c = request.config
    defaults = VmConfig()
    # An absent `sanitizers` leaves VmConfig's default: the server's VMMU_SANITIZERS.
    sanitizers = {"sanitizers": c.sanitizers} if c.HasField("sanitizers") else {}
    gpc_policy = {"gpc_policy": c.gpc_policy} if c.HasField("gpc_policy") else {}
    eager_page_split = {"eager_page_split": c.eager_page_split} \
        if c.HasField("eager_page_split") else {}
    fast_page_fault = {"fast_page_fault": c.fast_page_fault} \
        if c.HasField("fast_page_fault") else {}
    zap_leafs_only = {"zap_leafs_only": c.zap_leafs_only} \
        if c.HasField("zap_leafs_only") else {}
    choices = {k: v for choice in _CHOICES for k, v in choice.from_config(c).items()}
    mmu = {"mmu": c.mmu} if c.HasField("mmu") else {}
    return VmConfig(max_vcpus=c.max_vcpus or defaults.max_vcpus,
                    tdp_levels=c.tdp_levels or defaults.tdp_levels,
                    ad_bits=c.ad_bits if c.HasField("ad_bits") else defaults.ad_bits,
                    name=c.name,
                    schedule_seed=c.schedule_seed if c.HasField("schedule_seed") else None,
                    debug=frozenset(c.debug_knobs), **sanitizers, **gpc_policy,
                    **eager_page_split, **fast_page_fault, **mmu,
                    manual_dirty_log_protect=c.manual_dirty_log_protect,
                    dirty_ring_size=c.dirty_ring_size,
                    dirty_ring_with_bitmap=c.dirty_ring_with_bitmap,
                    costs=dict(c.costs), **zap_leafs_only, **choices,
                    nx_huge_pages=c.nx_huge_pages,
                    nx_huge_pages_recovery_ratio=c.nx_huge_pages_recovery_ratio,
                    nx_huge_pages_recovery_period_ms=c.nx_huge_pages_recovery_period_ms)


def _vm_config_to_wire(config: VmConfig) -> vm_pb2.VmConfig:
    return vm_pb2.VmConfig(max_vcpus=config.max_vcpus, tdp_levels=config.tdp_levels,
                           ad_bits=config.ad_bits, name=config.name,
                           schedule_seed=config.schedule_seed, sanitizers=config.sanitizers,
                           debug_knobs=sorted(config.debug), gpc_policy=config.gpc_policy,
                           eager_page_split=config.eager_page_split,
                           manual_dirty_log_protect=config.manual_dirty_log_protect,
                           dirty_ring_size=config.dirty_ring_size,
                           dirty_ring_with_bitmap=config.dirty_ring_with_bitmap,
                           fast_page_fault=config.fast_page_fault,
                           costs=dict(config.costs), zap_leafs_only=config.zap_leafs_only,
                           mmu=config.mmu, nx_huge_pages=config.nx_huge_pages,
                           nx_huge_pages_recovery_ratio=config.nx_huge_pages_recovery_ratio,
                           nx_huge_pages_recovery_period_ms=(
                               config.nx_huge_pages_recovery_period_ms),
                           **{choice.field: choice.to_wire[getattr(config, choice.field)]
                              for choice in _CHOICES})


def vm_info(info: VmInfo) -> vm_pb2.VmInfo:
    return vm_pb2.VmInfo(id=info.id, name=info.name, config=_vm_config_to_wire(info.config),
                         nr_vcpus=info.nr_vcpus, nr_memslots=info.nr_memslots,
                         nr_host_regions=info.nr_host_regions, dead=info.dead)


def clock(vm: Vm) -> vm_pb2.GetClockResponse:
    """A VM's virtual now and cost table (EOPNOTSUPP for a VM in wall time)."""
    now_ns = vm.virtual_now()
    return vm_pb2.GetClockResponse(now_ns=now_ns, costs=vm.virtual_clock().costs.as_dict())


def spte(info: SpteInfo) -> vm_pb2.Spte:
    return vm_pb2.Spte(
        level=info.level, gfn=info.gfn, index=info.index, spte=info.spte,
        kind=_SPTE_KIND_TO_WIRE[info.kind], pfn=info.pfn,
        readable=info.readable, writable=info.writable, executable=info.executable,
        large=info.large, accessed=info.accessed, dirty=info.dirty,
        host_writable=info.host_writable, mmu_writable=info.mmu_writable,
        zero_page=info.zero_page)


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
        read_only=not info.writable, populated_4k_pages=info.populated_4k_pages,
        zero_pages=info.zero_pages)


def madvise(vm: Vm, advice: int) -> Callable[[int, int], Awaitable[int | None]]:
    """The call of `vm` that applies the madvise `advice` to (hva, size); it returns the
    pages populated (MADV_POPULATE_WRITE) or None."""
    if advice not in _MADVISE_FROM_WIRE:
        name = host_memory_pb2.Advice.Name(advice) if advice in host_memory_pb2.Advice.values() \
            else str(advice)
        raise einval(f"advice {name} is not a valid advice")
    return getattr(vm, _MADVISE_FROM_WIRE[advice])


def protection(request: host_memory_pb2.MprotectRequest) -> int:
    """mprotect's prot bits for the request's protection."""
    if request.protection not in _PROTECTION_FROM_WIRE:
        values = host_memory_pb2.Protection.values()
        name = host_memory_pb2.Protection.Name(request.protection) \
            if request.protection in values else str(request.protection)
        raise einval(f"protection {name} is not a valid protection")
    return _PROTECTION_FROM_WIRE[request.protection]


# -- memslots --------------------------------------------------------------------------

def memslot(info: MemslotInfo) -> memslot_pb2.Memslot:
    return memslot_pb2.Memslot(
        as_id=info.as_id, id=info.id, flags=info.flags, guest_phys_addr=info.guest_phys_addr,
        memory_size=info.memory_size, userspace_addr=info.userspace_addr,
        guest_memfd=info.guest_memfd, guest_memfd_offset=info.guest_memfd_offset)


# -- vCPUs -----------------------------------------------------------------------------

def vcpu_info(info: VcpuInfo) -> vcpu_pb2.VcpuInfo:
    return vcpu_pb2.VcpuInfo(id=info.id, running=info.running, mmio_pending=info.mmio_pending)


def run_step(request: vcpu_pb2.RunRequest | vcpu_pb2.RunBatchRequest, gpa_bits: int
             ) -> dict[str, AccessBatch | bytes | int | None]:
    """The keyword arguments of `Vcpu.run` for one step: a batch, an MMIO completion or
    none (a resume), and the virtual time to start it at. A batch's gpas must lie within
    the VM's guest physical address width, `gpa_bits`."""
    start_ns = request.start_ns if request.HasField("start_ns") else None
    step = request.WhichOneof("step")
    if step == "batch":
        b = request.batch
        return {"batch": AccessBatch.from_wire(b.gpas, b.ops, b.write_data, 1 << gpa_bits),
                "start_ns": start_ns}
    if step == "mmio_completion":
        return {"mmio_data": request.mmio_completion.data, "start_ns": start_ns}
    if step == "resume":
        return {"start_ns": start_ns}
    raise einval(f"{type(request).__name__} needs a batch, an mmio_completion or a resume")


def run_response(outcome: RunResult | vcpu_pb2.StepError) -> vcpu_pb2.RunResponse:
    if isinstance(outcome, vcpu_pb2.StepError):
        return vcpu_pb2.RunResponse(error=outcome)
    return vcpu_pb2.RunResponse(result=run_result(outcome))


def run_result(result: RunResult) -> vcpu_pb2.RunResult:
    e = result.exit
    return vcpu_pb2.RunResult(
        completed=result.completed,
        exit=vcpu_pb2.Exit(reason=_EXIT_REASON_TO_WIRE[e.reason], gpa=e.gpa,
                           length=e.length, is_write=e.is_write, data=e.data,
                           errno=e.errno, message=e.message, suberror=e.suberror,
                           flags=e.flags),
        read_data=result.read_data, start_ns=result.start_ns, end_ns=result.end_ns)


# -- held MMU-notifier invalidations ---------------------------------------------------

def lease_s(request: notifier_pb2.BeginInvalidationRequest) -> float:
    if not request.HasField("lease"):
        raise einval("BeginInvalidationRequest.lease is required")
    return request.lease.ToNanoseconds() / 1e9


def held_invalidation(info: HeldInvalidationInfo) -> notifier_pb2.HeldInvalidation:
    lease = None
    if info.lease_s is not None:
        lease = duration_pb2.Duration()
        lease.FromNanoseconds(round(info.lease_s * 1e9))
    return notifier_pb2.HeldInvalidation(id=info.id, start=info.start, end=info.end,
                                         state=_HOLD_STATE_TO_WIRE[info.state], lease=lease)


# -- tracing ---------------------------------------------------------------------------

def trace_subscription(request: trace_pb2.TraceRequest) -> dict[str, Any]:
    """The keyword arguments of `Kvm.trace`."""
    capacity = request.capacity if request.HasField("capacity") else DEFAULT_CAPACITY
    return {"vm_ids": list(request.vm_ids), "events": list(request.events),
            "capacity": capacity}


def trace_event(event: TraceEvent, dropped_before: int) -> trace_pb2.TraceEvent:
    return trace_pb2.TraceEvent(
        seq=event.seq, time_ns=event.time_ns, vm_id=event.vm_id, event=event.event,
        fields={name: _trace_value(value) for name, value in event.fields.items()},
        dropped_before=dropped_before, virtual_ns=event.virtual_ns)


def _trace_value(value: int | str | bool) -> trace_pb2.TraceValue:
    if isinstance(value, bool):
        return trace_pb2.TraceValue(bool_value=value)
    if isinstance(value, str):
        return trace_pb2.TraceValue(string_value=value)
    if value < 0:
        return trace_pb2.TraceValue(int_value=value)
    return trace_pb2.TraceValue(uint_value=value)
