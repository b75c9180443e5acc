"""What `Client` and `AsyncClient` share: every operation as a `Call`, with no I/O.

A `Call` names the stub method, carries the request and knows how to parse the response
into the client's dataclasses. The two clients differ only in how they invoke it (a
blocking or an awaited stub call) and both translate a failed call with
`errors.error_from_rpc`, once, in their `_invoke`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf import duration_pb2

from vmmu.client.batch import Batch
from vmmu.client.errors import step_error
from vmmu.client.types import (Backing, ClientTls, Exit, ExitReason, Exploration,
                               HeldInvalidation, HoldState, HostRegion, Invalidations, Memslot,
                               Protection, RunResult, SeedOutcome, Spte, TraceEvent, VcpuInfo,
                               VmConfig, VmInfo)
from vmmu.v1 import (dirty_log_pb2_grpc, explore_pb2, explore_pb2_grpc, gpc_pb2_grpc,
                     guest_memfd_pb2_grpc, host_memory_pb2, host_memory_pb2_grpc, memslot_pb2,
                     memslot_pb2_grpc, notifier_pb2, notifier_pb2_grpc, trace_pb2,
                     trace_pb2_grpc, vcpu_pb2, vcpu_pb2_grpc, vm_pb2, vm_pb2_grpc)

__all__ = ["Call", "Stubs", "CHANNEL_OPTIONS", "channel_credentials"]

T = TypeVar("T")

# The server accepts requests of up to 32 MiB (a batch of 2**20 accesses with data is
# 17 MiB); gRPC's default of 4 MiB would cut batches and read_data short.
MAX_MESSAGE_BYTES = 32 << 20
CHANNEL_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]



def channel_credentials(token: str | None, tls: ClientTls | None
                        ) -> grpc.ChannelCredentials | None:
    """The credentials of a channel with `token` on every call and `tls`, or None for a
    plaintext channel without a token. gRPC sends call credentials only over a channel it
    deems secure: without TLS the token goes over local credentials, which a loopback
    address satisfies (the only plaintext address a server listens on unless told
    `--insecure`)."""
    if tls is not None:
        transport = grpc.ssl_channel_credentials(root_certificates=tls.root_certificates,
                                                 private_key=tls.private_key,
                                                 certificate_chain=tls.certificate_chain)
    elif token is not None:
        transport = grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)
    else:
        return None
    if token is None:
        return transport
    return grpc.composite_channel_credentials(transport,
                                              grpc.access_token_call_credentials(token))


_BACKING_TO_WIRE = {b: host_memory_pb2.Backing.Value(f"BACKING_{b.name}") for b in Backing}
_BACKING_FROM_WIRE = {wire: b for b, wire in _BACKING_TO_WIRE.items()}
_EXIT_REASON_FROM_WIRE = {vcpu_pb2.ExitReason.Value(f"EXIT_REASON_{r.name}"): r
                          for r in ExitReason}
_PROTECTION_TO_WIRE = {p: host_memory_pb2.Protection.Value(f"PROTECTION_{p.name}")
                       for p in Protection}
_SPTE_KIND_FROM_WIRE = {vm_pb2.SpteKind.Value(name): name.removeprefix("SPTE_KIND_")
                        .lower().replace("_", "-") for name in vm_pb2.SpteKind.keys()}
_HOLD_STATE_FROM_WIRE = {notifier_pb2.HoldState.Value(f"HOLD_STATE_{s.name}"): s
                         for s in HoldState}


class _Choice:
    """A VmConfig field whose values are names ("virtual", "write_section"), carried as
    the wire enum value `<PREFIX>_<NAME>`."""

    def __init__(self, field: str, enum: Any) -> None:
        self.field = field
        prefix = enum.DESCRIPTOR.values_by_number[0].name.removesuffix("UNSPECIFIED")
        self.from_wire = {v.number: v.name.removeprefix(prefix).lower()
                          for v in enum.DESCRIPTOR.values if v.number}
        self._to_wire = {name: number for number, name in self.from_wire.items()}

    def to_wire(self, name: str) -> int:
        if name not in self._to_wire:
            raise ValueError(f"{self.field} {name!r} is not one of {', '.join(self._to_wire)}")
        return self._to_wire[name]


_CHOICES = [_Choice("clock", vm_pb2.Clock), _Choice("fault_lock", vm_pb2.FaultLock),
            _Choice("table_free", vm_pb2.TableFree), _Choice("aging_lock", vm_pb2.AgingLock)]


class Stubs:
    """The generated stubs of every vmmu.v1 service over one channel (sync or aio)."""

    def __init__(self, channel: grpc.Channel | grpc.aio.Channel) -> None:
        self.vm = vm_pb2_grpc.VmServiceStub(channel)
        self.host_memory = host_memory_pb2_grpc.HostMemoryServiceStub(channel)
        self.memslot = memslot_pb2_grpc.MemslotServiceStub(channel)
        self.vcpu = vcpu_pb2_grpc.VcpuServiceStub(channel)
        self.notifier = notifier_pb2_grpc.NotifierServiceStub(channel)
        self.trace = trace_pb2_grpc.TraceServiceStub(channel)
        self.gpc = gpc_pb2_grpc.GpcServiceStub(channel)
        self.dirty_log = dirty_log_pb2_grpc.DirtyLogServiceStub(channel)
        self.guest_memfd = guest_memfd_pb2_grpc.GuestMemfdServiceStub(channel)
        self.explore = explore_pb2_grpc.ExploreServiceStub(channel)


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
                                  ad_bits=c.ad_bits, name=c.name,
                                  schedule_seed=c.schedule_seed if c.HasField("schedule_seed")
                                  else None,
                                  sanitizers=c.sanitizers, debug=frozenset(c.debug_knobs),
                                  gpc_policy=c.gpc_policy,
                                  eager_page_split=c.eager_page_split,
                                  manual_dirty_log_protect=c.manual_dirty_log_protect,
                                  dirty_ring_size=c.dirty_ring_size,
                                  dirty_ring_with_bitmap=c.dirty_ring_with_bitmap,
                                  fast_page_fault=c.fast_page_fault, mmu=c.mmu,
                                  costs=tuple(sorted(c.costs.items())),
                                  zap_leafs_only=c.zap_leafs_only,
                                  nx_huge_pages=c.nx_huge_pages,
                                  nx_huge_pages_recovery_ratio=c.nx_huge_pages_recovery_ratio,
                                  nx_huge_pages_recovery_period_ms=(
                                      c.nx_huge_pages_recovery_period_ms),
                                  **{choice.field: choice.from_wire[getattr(c, choice.field)]
                                     for choice in _CHOICES}),
                  nr_vcpus=m.nr_vcpus, nr_memslots=m.nr_memslots,
                  nr_host_regions=m.nr_host_regions, dead=m.dead)


def spte(m: vm_pb2.Spte) -> Spte:
    return Spte(level=m.level, gfn=m.gfn, index=m.index, spte=m.spte,
                kind=_SPTE_KIND_FROM_WIRE[m.kind], pfn=m.pfn, readable=m.readable,
                writable=m.writable, executable=m.executable, large=m.large,
                accessed=m.accessed, dirty=m.dirty, host_writable=m.host_writable,
                mmu_writable=m.mmu_writable, zero_page=m.zero_page)


def host_region(m: host_memory_pb2.HostRegion) -> HostRegion:
    return HostRegion(hva=m.hva, size=m.size, backing=_BACKING_FROM_WIRE[m.backing],
                      writable=not m.read_only, populated_4k_pages=m.populated_4k_pages,
                      zero_pages=m.zero_pages)


def memslot(m: memslot_pb2.Memslot) -> Memslot:
    return Memslot(as_id=m.as_id, id=m.id, flags=m.flags, guest_phys_addr=m.guest_phys_addr,
                   memory_size=m.memory_size, userspace_addr=m.userspace_addr,
                   guest_memfd=m.guest_memfd, guest_memfd_offset=m.guest_memfd_offset)


def vcpu_info(m: vcpu_pb2.VcpuInfo) -> VcpuInfo:
    return VcpuInfo(id=m.id, running=m.running, mmio_pending=m.mmio_pending)


def run_result(m: vcpu_pb2.RunResult) -> RunResult:
    e = m.exit
    return RunResult(
        completed=m.completed,
        exit=Exit(reason=_EXIT_REASON_FROM_WIRE[e.reason], gpa=e.gpa, length=e.length,
                  is_write=e.is_write, data=e.data, errno=e.errno, message=e.message,
                  suberror=e.suberror, flags=e.flags),
        read_data=m.read_data, start_ns=m.start_ns, end_ns=m.end_ns)


def run_response(m: vcpu_pb2.RunResponse) -> RunResult:
    """The result of one Run step, or the VmmuError the stream refused it with."""
    if m.HasField("error"):
        raise step_error(m.error)
    return run_result(m.result)


# -- VMs -------------------------------------------------------------------------------

def create_vm(max_vcpus: int, tdp_levels: int, ad_bits: bool, name: str,
              schedule_seed: int | None, sanitizers: bool | None, debug: Iterable[str],
              gpc_policy: str, eager_page_split: bool, manual_dirty_log_protect: int,
              dirty_ring_size: int, dirty_ring_with_bitmap: bool,
              fast_page_fault: bool, clock: str, costs: Mapping[str, int] | None,
              fault_lock: str, table_free: str, aging_lock: str,
              zap_leafs_only: bool, mmu: str, nx_huge_pages: bool,
              nx_huge_pages_recovery_ratio: int = 0,
              nx_huge_pages_recovery_period_ms: int = 0) -> Call[VmInfo]:
    names = {"clock": clock, "fault_lock": fault_lock, "table_free": table_free,
             "aging_lock": aging_lock}
    config = vm_pb2.VmConfig(max_vcpus=max_vcpus, tdp_levels=tdp_levels, ad_bits=ad_bits,
                             name=name, schedule_seed=schedule_seed, sanitizers=sanitizers,
                             debug_knobs=sorted(debug), gpc_policy=gpc_policy,
                             eager_page_split=eager_page_split,
                             manual_dirty_log_protect=manual_dirty_log_protect,
                             dirty_ring_size=dirty_ring_size,
                             dirty_ring_with_bitmap=dirty_ring_with_bitmap,
                             fast_page_fault=fast_page_fault, costs=costs, mmu=mmu,
                             zap_leafs_only=zap_leafs_only, nx_huge_pages=nx_huge_pages,
                             nx_huge_pages_recovery_ratio=nx_huge_pages_recovery_ratio,
                             nx_huge_pages_recovery_period_ms=nx_huge_pages_recovery_period_ms,
                             **{choice.field: choice.to_wire(names[choice.field])
                                for choice in _CHOICES})
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


def enable_cap(vm_id: int, cap: int, args: Iterable[int], flags: int) -> Call[None]:
    return Call("vm", "EnableCap", vm_pb2.EnableCapRequest(vm_id=vm_id, cap=cap, flags=flags,
                                                           args=list(args)), _none)


def recover_nx_huge_pages(vm_id: int, ratio: int) -> Call[int]:
    return Call("vm", "RecoverNxHugePages",
                vm_pb2.RecoverNxHugePagesRequest(vm_id=vm_id, ratio=ratio), lambda r: r.zapped)


def set_nr_mmu_pages(vm_id: int, nr_mmu_pages: int) -> Call[None]:
    return Call("vm", "SetNrMmuPages",
                vm_pb2.SetNrMmuPagesRequest(vm_id=vm_id, nr_mmu_pages=nr_mmu_pages), _none)


def mmu_shrink_scan(vm_id: int, nr_to_scan: int) -> Call[int]:
    return Call("vm", "MmuShrinkScan",
                vm_pb2.MmuShrinkScanRequest(vm_id=vm_id, nr_to_scan=nr_to_scan),
                lambda r: r.freed)


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


def madvise_dontneed(vm_id: int, hva: int, size: int) -> Call[None]:
    request = host_memory_pb2.MadviseRequest(vm_id=vm_id, hva=hva, size=size,
                                             advice=host_memory_pb2.ADVICE_DONTNEED)
    return Call("host_memory", "Madvise", request, _none)


def madvise_populate_write(vm_id: int, hva: int, size: int) -> Call[int]:
    request = host_memory_pb2.MadviseRequest(vm_id=vm_id, hva=hva, size=size,
                                             advice=host_memory_pb2.ADVICE_POPULATE_WRITE)
    return Call("host_memory", "Madvise", request, lambda r: r.pages_populated)


def migrate_pages(vm_id: int, hva: int, size: int) -> Call[int]:
    return Call("host_memory", "MigratePages",
                host_memory_pb2.MigratePagesRequest(vm_id=vm_id, hva=hva, size=size),
                lambda r: r.pages_migrated)


def swap_out(vm_id: int, hva: int, size: int) -> Call[int]:
    return Call("host_memory", "SwapOut",
                host_memory_pb2.SwapOutRequest(vm_id=vm_id, hva=hva, size=size),
                lambda r: r.pages_swapped)


def mprotect(vm_id: int, hva: int, size: int, protection: Protection) -> Call[None]:
    request = host_memory_pb2.MprotectRequest(vm_id=vm_id, hva=hva, size=size,
                                              protection=_PROTECTION_TO_WIRE[protection])
    return Call("host_memory", "Mprotect", request, _none)


def ksm_merge(vm_id: int, hvas: Iterable[int]) -> Call[int]:
    return Call("host_memory", "KsmMerge",
                host_memory_pb2.KsmMergeRequest(vm_id=vm_id, hvas=list(hvas)),
                lambda r: r.pages_merged)


def thp_split(vm_id: int, hva: int) -> Call[None]:
    return Call("host_memory", "ThpSplit",
                host_memory_pb2.ThpSplitRequest(vm_id=vm_id, hva=hva), _none)


def thp_collapse(vm_id: int, hva: int) -> Call[None]:
    return Call("host_memory", "ThpCollapse",
                host_memory_pb2.ThpCollapseRequest(vm_id=vm_id, hva=hva), _none)


def clear_young(vm_id: int, start: int, end: int, fast_only: bool) -> Call[bool]:
    return Call("host_memory", "ClearYoung",
                host_memory_pb2.ClearYoungRequest(vm_id=vm_id, start=start, end=end,
                                                  fast_only=fast_only),
                lambda r: r.young)


def clear_flush_young(vm_id: int, start: int, end: int) -> Call[bool]:
    return Call("host_memory", "ClearFlushYoung",
                host_memory_pb2.ClearFlushYoungRequest(vm_id=vm_id, start=start, end=end),
                lambda r: r.young)


def test_young(vm_id: int, hva: int) -> Call[bool]:
    return Call("host_memory", "TestYoung",
                host_memory_pb2.TestYoungRequest(vm_id=vm_id, start=hva, end=hva + 1),
                lambda r: r.young)


def young_bitmap(vm_id: int, start: int, end: int) -> Call[bytes]:
    return Call("host_memory", "TestYoung",
                host_memory_pb2.TestYoungRequest(vm_id=vm_id, start=start, end=end),
                lambda r: r.young_bitmap)


# -- memslots --------------------------------------------------------------------------

def set_user_memory_region(vm_id: int, slot: int, flags: int, guest_phys_addr: int,
                           memory_size: int, userspace_addr: int, guest_memfd: int = 0,
                           guest_memfd_offset: int = 0) -> Call[None]:
    request = memslot_pb2.SetUserMemoryRegionRequest(
        vm_id=vm_id, slot=slot, flags=flags, guest_phys_addr=guest_phys_addr,
        memory_size=memory_size, userspace_addr=userspace_addr, guest_memfd=guest_memfd,
        guest_memfd_offset=guest_memfd_offset)
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


def run_batch(vm_id: int, vcpu_id: int, batch: Batch, start_ns: int | None
              ) -> Call[RunResult]:
    request = vcpu_pb2.RunBatchRequest(vm_id=vm_id, vcpu_id=vcpu_id,
                                       batch=_access_batch(batch), start_ns=start_ns)
    return Call("vcpu", "RunBatch", request, lambda r: run_result(r.result))


def complete_mmio(vm_id: int, vcpu_id: int, data: bytes) -> Call[RunResult]:
    request = vcpu_pb2.RunBatchRequest(vm_id=vm_id, vcpu_id=vcpu_id,
                                       mmio_completion=vcpu_pb2.MmioCompletion(data=data))
    return Call("vcpu", "RunBatch", request, lambda r: run_result(r.result))


def resume(vm_id: int, vcpu_id: int) -> Call[RunResult]:
    request = vcpu_pb2.RunBatchRequest(vm_id=vm_id, vcpu_id=vcpu_id, resume=vcpu_pb2.Resume())
    return Call("vcpu", "RunBatch", request, lambda r: run_result(r.result))


def run_request(vm_id: int, vcpu_id: int, batch: Batch, start_ns: int | None
                ) -> vcpu_pb2.RunRequest:
    """A step of the Run stream that starts `batch` (at virtual time `start_ns`)."""
    return vcpu_pb2.RunRequest(vm_id=vm_id, vcpu_id=vcpu_id, batch=_access_batch(batch),
                               start_ns=start_ns)


def mmio_request(vm_id: int, vcpu_id: int, data: bytes) -> vcpu_pb2.RunRequest:
    """A step of the Run stream that completes the pending MMIO access."""
    return vcpu_pb2.RunRequest(vm_id=vm_id, vcpu_id=vcpu_id,
                               mmio_completion=vcpu_pb2.MmioCompletion(data=data))


def resume_request(vm_id: int, vcpu_id: int) -> vcpu_pb2.RunRequest:
    """A step of the Run stream that goes on with the batch where the last one left it."""
    return vcpu_pb2.RunRequest(vm_id=vm_id, vcpu_id=vcpu_id, resume=vcpu_pb2.Resume())


# -- held MMU-notifier invalidations ---------------------------------------------------

def held_invalidation(m: notifier_pb2.HeldInvalidation) -> HeldInvalidation:
    lease_s = m.lease.ToNanoseconds() / 1e9 if m.HasField("lease") else None
    return HeldInvalidation(id=m.id, start=m.start, end=m.end,
                            state=_HOLD_STATE_FROM_WIRE[m.state], lease_s=lease_s)


def begin_invalidation(vm_id: int, start: int, end: int, lease_s: float) -> Call[int]:
    lease = duration_pb2.Duration()
    lease.FromNanoseconds(round(lease_s * 1e9))     # ValueError for NaN or infinity
    request = notifier_pb2.BeginInvalidationRequest(vm_id=vm_id, start=start, end=end,
                                                    lease=lease)
    return Call("notifier", "BeginInvalidation", request, lambda r: r.invalidation_id)


def end_invalidation(vm_id: int, invalidation_id: int) -> Call[None]:
    request = notifier_pb2.EndInvalidationRequest(vm_id=vm_id, invalidation_id=invalidation_id)
    return Call("notifier", "EndInvalidation", request, _none)


def invalidations(vm_id: int) -> Call[Invalidations]:
    return Call("notifier", "ListInvalidations",
                notifier_pb2.ListInvalidationsRequest(vm_id=vm_id),
                lambda r: Invalidations(held=[held_invalidation(m) for m in r.held],
                                        ended=[held_invalidation(m) for m in r.ended]))


def hold_request(vm_id: int, start: int, end: int) -> notifier_pb2.HoldInvalidationRequest:
    return notifier_pb2.HoldInvalidationRequest(vm_id=vm_id, start=start, end=end)


# -- tracing ---------------------------------------------------------------------------

def trace_request(vm_ids: Iterable[int], events: Iterable[str], capacity: int | None
                  ) -> trace_pb2.TraceRequest:
    return trace_pb2.TraceRequest(vm_ids=list(vm_ids), events=list(events), capacity=capacity)


def trace_event(m: trace_pb2.TraceEvent) -> TraceEvent:
    return TraceEvent(seq=m.seq, time_ns=m.time_ns, vm_id=m.vm_id, event=m.event,
                      fields={name: getattr(value, value.WhichOneof("value"))
                              for name, value in m.fields.items()},
                      dropped_before=m.dropped_before,
                      virtual_ns=m.virtual_ns if m.HasField("virtual_ns") else None)


def explore_request(scenario: str, seeds: int, knobs: Iterable[str], first_seed: int,
                    workers: int, ray: str | None) -> explore_pb2.ExploreRequest:
    """`ray`: None for the server's processes, "" for a local Ray cluster, else the
    address of the Ray cluster to run the seeds on."""
    return explore_pb2.ExploreRequest(scenario=scenario, seeds=seeds, knobs=list(knobs),
                                      first_seed=first_seed, workers=workers,
                                      ray=ray is not None, ray_address=ray or "")


def exploration(m: explore_pb2.ExploreResponse) -> Exploration:
    v = m.first_violation
    return Exploration(seeds_run=m.seeds_run, workers_lost=m.workers_lost,
                       first_violation=SeedOutcome(seed=v.seed, violation=v.violation,
                                                   oracle=v.oracle, gfn=v.gfn, trace=v.trace,
                                                   points=v.points)
                       if m.HasField("first_violation") else None)
