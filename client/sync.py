"""The blocking client: `Client` and its `Vm`, `Vcpu` and `RunStream` handles.

    with Client("127.0.0.1:50051") as client:
        vm = client.create_vm(max_vcpus=2)
        region = vm.mmap(2 << 20, Backing.THP)
        vm.set_user_memory_region(slot=0, flags=0, guest_phys_addr=0,
                                  memory_size=2 << 20, userspace_addr=region.hva)
        vcpu = vm.create_vcpu(0)
        result = vcpu.run(BatchBuilder().write(0x1000, data=b"12345678").build())

Handles are an id and the client: making one costs no RPC, and a handle to an object the
server does not have fails with NotFound on first use. `AsyncClient` mirrors every method.
"""

from __future__ import annotations

import queue
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc

from vmmu.client import _base, _clock, _dirty_log, _gpc, _guest_memfd
from vmmu.client.batch import Batch
from vmmu.client.errors import VmmuError, error_from_rpc
from vmmu.client.types import (Backing, ClientTls, DirtyGfn, Exploration, Gpc, GuestMemfd,
                               HeldInvalidation, HostRegion, Invalidations, Memslot, Protection,
                               RunResult, Spte, TraceEvent, VcpuInfo, VmInfo)

__all__ = ["Client", "Vm", "Vcpu", "RunStream", "InvalidationHold", "TraceStream"]

T = TypeVar("T")


class Client:
    """A connection to a vmmu server."""

    def __init__(self, target: str, *, token: str | None = None,
                 tls: ClientTls | None = None) -> None:
        """Connect to `target` ("host:port"), over TLS if `tls` is given, sending
        `authorization: Bearer <token>` on every call if `token` is."""
        credentials = _base.channel_credentials(token, tls)
        self._channel = (grpc.insecure_channel(target, options=_base.CHANNEL_OPTIONS)
                         if credentials is None else
                         grpc.secure_channel(target, credentials,
                                             options=_base.CHANNEL_OPTIONS))
        self._stubs = _base.Stubs(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _invoke(self, call: _base.Call[T]) -> T:
        try:
            response = call.stub_method(self._stubs)(call.request)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc
        return call.parse(response)

    def create_vm(self, *, max_vcpus: int = 8, tdp_levels: int = 4, ad_bits: bool = True,
                  name: str = "", schedule_seed: int | None = None,
                  sanitizers: bool | None = None, debug: Iterable[str] = (),
                  gpc_policy: str = "global", eager_page_split: bool = True,
                  manual_dirty_log_protect: int = 0, dirty_ring_size: int = 0,
                  dirty_ring_with_bitmap: bool = False, fast_page_fault: bool = True,
                  clock: str = "wall", costs: Mapping[str, int] | None = None,
                  fault_lock: str = "read", table_free: str = "rcu", aging_lock: str = "none",
                  zap_leafs_only: bool = True, mmu: str = "tdp",
                  nx_huge_pages: bool = False, nx_huge_pages_recovery_ratio: int = 0,
                  nx_huge_pages_recovery_period_ms: int = 0) -> Vm:
        """Create a VM. `sanitizers` None keeps the server's default; `debug` names debug
        knobs to switch protections off; `gpc_policy` ("global" or "range") says which
        invalidations make a gfn-to-pfn cache refresh retry. Dirty logging:
        `eager_page_split` splits huge pages when a slot starts logging (else at their
        next write); `manual_dirty_log_protect` (1 ENABLE, 3 ENABLE | INITIALLY_SET)
        makes get_dirty_log leave bits for clear_dirty_log; `dirty_ring_size` gives each
        vCPU a dirty ring of that many bytes, with memslot bitmaps only if
        `dirty_ring_with_bitmap`; `fast_page_fault` False sends every fault down the
        slow path. Virtual time: `clock` "virtual" makes the VM a discrete-event
        simulation, its work charged from the cost table with `costs` (name -> ns, e.g.
        from `load_cost_file`) overriding defaults; the policies the KVM threads compare:
        `fault_lock` ("read" or "write"), `table_free` ("rcu" or "write_section"),
        `aging_lock` ("none", "read" or "write") and `zap_leafs_only`. ValueError for a
        clock or policy name the wire has no value for. `mmu` "legacy" runs KVM's MMU
        with tdp_mmu=0 (rmaps) instead of the TDP MMU. `nx_huge_pages` turns the NX huge
        page mitigation on (either MMU): fetches map 4K, `recover_nx_huge_pages`
        lets their ranges map huge again; `nx_huge_pages_recovery_ratio` (0: none) runs
        a recovery pass every `nx_huge_pages_recovery_period_ms` (0: one hour / ratio)
        from the first run."""
        info = self._invoke(_base.create_vm(max_vcpus, tdp_levels, ad_bits, name,
                                            schedule_seed, sanitizers, debug, gpc_policy,
                                            eager_page_split, manual_dirty_log_protect,
                                            dirty_ring_size, dirty_ring_with_bitmap,
                                            fast_page_fault, clock, costs, fault_lock,
                                            table_free, aging_lock, zap_leafs_only, mmu,
                                            nx_huge_pages, nx_huge_pages_recovery_ratio,
                                            nx_huge_pages_recovery_period_ms))
        return Vm(self, info.id)

    def vm(self, vm_id: int) -> Vm:
        return Vm(self, vm_id)

    def list_vms(self) -> list[VmInfo]:
        return self._invoke(_base.list_vms())

    def trace(self, *, vm_ids: Iterable[int] = (), events: Iterable[str] = (),
              capacity: int | None = None) -> TraceStream:
        """Subscribe to trace events of `vm_ids` (empty: every VM, later ones included),
        filtered by name (empty: all); returns once the subscription is live."""
        return TraceStream(self._stubs, _base.trace_request(vm_ids, events, capacity))

    def explore(self, scenario: str, seeds: int, *, knobs: Iterable[str] = (),
                first_seed: int = 0, workers: int = 1, ray: str | None = None) -> Exploration:
        """Run a race scenario under `seeds` schedule seeds on the server, with the
        protections `knobs` switched off: on `workers` of its processes, or with `ray`
        as Ray tasks ("": a local cluster of `workers` CPUs, else a cluster's address)."""
        request = _base.explore_request(scenario, seeds, knobs, first_seed, workers, ray)
        try:
            *_, last = self._stubs.explore.Explore(request)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc
        return _base.exploration(last)


class Vm:
    """A VM on the server; its methods are the VM ioctls and the VMM's host memory."""

    __slots__ = ("_client", "id")

    def __init__(self, client: Client, vm_id: int) -> None:
        self._client = client
        self.id = vm_id

    def __repr__(self) -> str:
        return f"Vm(id={self.id})"

    def info(self) -> VmInfo:
        return self._client._invoke(_base.get_vm(self.id))

    def stats(self) -> dict[str, int]:
        return self._client._invoke(_base.vm_stats(self.id))

    def walk(self, gpa: int, as_id: int = 0) -> list[Spte]:
        return self._client._invoke(_base.walk(self.id, gpa, as_id))

    def enable_cap(self, cap: int, args: Sequence[int] = (), flags: int = 0) -> None:
        """KVM_ENABLE_CAP: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_CAP_DIRTY_LOG_RING or
        KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP, with KVM's rules (InvalidArgument else)."""
        self._client._invoke(_base.enable_cap(self.id, cap, args, flags))

    def recover_nx_huge_pages(self, ratio: int) -> int:
        """One pass of the NX huge page recovery worker: zap the oldest ceil(n / ratio)
        of the n possible NX huge pages (stat nx_lpage_splits); returns the tables zapped.
        FailedPrecondition for a VM without nx_huge_pages."""
        return self._client._invoke(_base.recover_nx_huge_pages(self.id, ratio))

    def set_nr_mmu_pages(self, nr_mmu_pages: int) -> None:
        """KVM_SET_NR_MMU_PAGES: at most this many shadow pages (legacy MMU; the oldest
        above it are zapped). InvalidArgument below 64; no effect on the TDP MMU."""
        self._client._invoke(_base.set_nr_mmu_pages(self.id, nr_mmu_pages))

    def mmu_shrink_scan(self, nr_to_scan: int) -> int:
        """The MMU shrinker: zap up to `nr_to_scan` of the oldest shadow pages (legacy
        MMU); returns how many were freed."""
        return self._client._invoke(_base.mmu_shrink_scan(self.id, nr_to_scan))

    def virtual_now(self) -> int:
        """The VM's virtual now in ns (FailedPrecondition for a VM in wall time)."""
        return self._client._invoke(_clock.virtual_now(self.id))

    def costs(self) -> dict[str, int]:
        """The VM's cost table in ns: the defaults with its overrides."""
        return self._client._invoke(_clock.costs(self.id))

    def advance(self, until_ns: int) -> int:
        """Run the VM's simulation up to virtual time `until_ns` and, from now on, never
        past the latest such time; returns the new virtual now."""
        return self._client._invoke(_clock.advance(self.id, until_ns))

    def destroy(self) -> None:
        self._client._invoke(_base.destroy_vm(self.id))

    def mmap(self, size: int, backing: Backing, *, writable: bool = True,
             hva: int | None = None) -> HostRegion:
        return self._client._invoke(_base.mmap(self.id, size, backing, writable, hva))

    def munmap(self, hva: int, size: int) -> None:
        self._client._invoke(_base.munmap(self.id, hva, size))

    def host_regions(self) -> list[HostRegion]:
        return self._client._invoke(_base.host_regions(self.id))

    def read_hva(self, hva: int, length: int) -> bytes:
        return self._client._invoke(_base.read_hva(self.id, hva, length))

    def write_hva(self, hva: int, data: bytes) -> None:
        self._client._invoke(_base.write_hva(self.id, hva, data))

    def madvise_dontneed(self, hva: int, size: int) -> None:
        """madvise(MADV_DONTNEED): the pages go; the next touch reads zeroes."""
        self._client._invoke(_base.madvise_dontneed(self.id, hva, size))

    def madvise_populate_write(self, hva: int, size: int) -> int:
        """madvise(MADV_POPULATE_WRITE): fault the range in writable with its memory
        allocated; returns the 4K pages populated or swapped in."""
        return self._client._invoke(_base.madvise_populate_write(self.id, hva, size))

    def migrate_pages(self, hva: int, size: int) -> int:
        """Move the range's populated pages to new host frames; returns the pages moved."""
        return self._client._invoke(_base.migrate_pages(self.id, hva, size))

    def swap_out(self, hva: int, size: int) -> int:
        """Page the range out; returns the pages swapped out."""
        return self._client._invoke(_base.swap_out(self.id, hva, size))

    def mprotect(self, hva: int, size: int, protection: Protection) -> None:
        """mprotect(2): a guest access the protection refuses is a MEMORY_FAULT exit."""
        self._client._invoke(_base.mprotect(self.id, hva, size, protection))

    def ksm_merge(self, hvas: list[int]) -> int:
        """Merge the pages with identical contents; returns the pages merged away."""
        return self._client._invoke(_base.ksm_merge(self.id, hvas))

    def thp_split(self, hva: int) -> None:
        self._client._invoke(_base.thp_split(self.id, hva))

    def thp_collapse(self, hva: int) -> None:
        self._client._invoke(_base.thp_collapse(self.id, hva))

    def clear_young(self, start: int, end: int, fast_only: bool = False) -> bool:
        """Was any page of hva [start, end) young? It is old afterwards, except what
        `fast_only` aging may leave (the legacy MMU with A/D bits off)."""
        return self._client._invoke(_base.clear_young(self.id, start, end, fast_only))

    def clear_flush_young(self, start: int, end: int) -> bool:
        return self._client._invoke(_base.clear_flush_young(self.id, start, end))

    def test_young(self, hva: int) -> bool:
        return self._client._invoke(_base.test_young(self.id, hva))

    def young_bitmap(self, start: int, end: int) -> bytes:
        """One bit per 4K page that hva [start, end) touches, LSB first: young or not."""
        return self._client._invoke(_base.young_bitmap(self.id, start, end))

    def set_user_memory_region(self, slot: int, flags: int, guest_phys_addr: int,
                               memory_size: int, userspace_addr: int,
                               guest_memfd: int = 0, guest_memfd_offset: int = 0
                               ) -> None:
        """KVM_SET_USER_MEMORY_REGION2; with flag KVM_MEM_GUEST_MEMFD the slot binds
        [guest_memfd_offset, + memory_size) of guest_memfd `guest_memfd`, and is immutable
        until deleted."""
        self._client._invoke(_base.set_user_memory_region(
            self.id, slot, flags, guest_phys_addr, memory_size, userspace_addr, guest_memfd,
            guest_memfd_offset))

    def create_guest_memfd(self, size: int, flags: int = 0) -> GuestMemfd:
        """KVM_CREATE_GUEST_MEMFD: a guest_memfd of `size` bytes (its `fd` in the result)."""
        return self._client._invoke(_guest_memfd.create_guest_memfd(self.id, size, flags))

    def guest_memfd_fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2) on a guest_memfd: FALLOC_FL_KEEP_SIZE allocates the pages, with
        FALLOC_FL_PUNCH_HOLE it unmaps the range from the guest and frees its pages."""
        self._client._invoke(_guest_memfd.fallocate(self.id, fd, mode, offset, length))

    def guest_memfds(self) -> list[GuestMemfd]:
        return self._client._invoke(_guest_memfd.guest_memfds(self.id))

    def set_memory_attributes(self, address: int, size: int, attributes: int,
                              flags: int = 0) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES of gpa [address, address + size):
        KVM_MEMORY_ATTRIBUTE_PRIVATE makes it private, 0 shared."""
        self._client._invoke(_guest_memfd.set_memory_attributes(
            self.id, address, size, attributes, flags))

    def private_ranges(self) -> list[tuple[int, int]]:
        """The private gpa ranges [start, end), in order."""
        return self._client._invoke(_guest_memfd.private_ranges(self.id))

    def memslots(self) -> list[Memslot]:
        return self._client._invoke(_base.memslots(self.id))

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        info = self._client._invoke(_base.create_vcpu(self.id, vcpu_id))
        return Vcpu(self._client, self.id, info.id)

    def vcpu(self, vcpu_id: int) -> Vcpu:
        return Vcpu(self._client, self.id, vcpu_id)

    def begin_invalidation(self, start: int, end: int, lease_s: float) -> int:
        """Invalidate hva [start, end) and hold it until `end_invalidation` or for
        `lease_s` seconds at most; returns the hold's id once the range is zapped."""
        return self._client._invoke(_base.begin_invalidation(self.id, start, end, lease_s))

    def end_invalidation(self, invalidation_id: int) -> None:
        self._client._invoke(_base.end_invalidation(self.id, invalidation_id))

    def invalidations(self) -> Invalidations:
        return self._client._invoke(_base.invalidations(self.id))

    def hold_invalidation(self, start: int, end: int) -> InvalidationHold:
        """Invalidate hva [start, end) and hold it while the returned stream is open;
        returns once the range is zapped."""
        responses = self._client._stubs.notifier.HoldInvalidation(
            _base.hold_request(self.id, start, end))
        return InvalidationHold(self._client, self.id, responses, _next_hold(responses))

    def create_gpc(self, gpa: int, length: int) -> Gpc:
        """Create a gfn-to-pfn cache of [gpa, gpa + length) (one page at most), activated
        and refreshed."""
        return self._client._invoke(_gpc.create_gpc(self.id, gpa, length))

    def check_gpc(self, gpc_id: int, length: int) -> bool:
        """May [gpa, gpa + length) be used through the cache now? False: refresh first."""
        return self._client._invoke(_gpc.check_gpc(self.id, gpc_id, length))

    def refresh_gpc(self, gpc_id: int, length: int) -> Gpc:
        """Make the cache valid again; waits while invalidations that count are in flight."""
        return self._client._invoke(_gpc.refresh_gpc(self.id, gpc_id, length))

    def read_gpc(self, gpc_id: int, offset: int, length: int) -> bytes:
        """Read through a valid cache; FailedPrecondition (EAGAIN) when it is not."""
        return self._client._invoke(_gpc.read_gpc(self.id, gpc_id, offset, length))

    def write_gpc(self, gpc_id: int, offset: int, data: bytes) -> None:
        """Write through a valid cache; FailedPrecondition (EAGAIN) when it is not."""
        self._client._invoke(_gpc.write_gpc(self.id, gpc_id, offset, data))

    def deactivate_gpc(self, gpc_id: int) -> Gpc:
        """Deactivate the cache and forget it; returns its last state."""
        return self._client._invoke(_gpc.deactivate_gpc(self.id, gpc_id))

    def gpcs(self) -> list[Gpc]:
        return self._client._invoke(_gpc.gpcs(self.id))

    def get_dirty_log(self, slot: int) -> bytes:
        """KVM_GET_DIRTY_LOG of `slot` (as_id << 16 | id): one bit per page, LSB first.
        Without manual protect the reported pages are cleared and write-protected again."""
        return self._client._invoke(_dirty_log.get_dirty_log(self.id, slot))

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int,
                        bitmap: bytes) -> int:
        """KVM_CLEAR_DIRTY_LOG: clear the bits of `bitmap` (bit i: page first_page + i) and
        write-protect those pages again; returns the pages whose bit was set."""
        return self._client._invoke(_dirty_log.clear_dirty_log(
            self.id, slot, first_page, num_pages, bitmap))

    def harvest_dirty_ring(self, vcpu_id: int) -> list[DirtyGfn]:
        """The entries the vCPU's dirty ring published since the last harvest, oldest
        first; the next reset_dirty_rings recycles them."""
        return self._client._invoke(_dirty_log.harvest_dirty_ring(self.id, vcpu_id))

    def reset_dirty_rings(self) -> int:
        """KVM_RESET_DIRTY_RINGS: recycle every harvested entry; returns how many."""
        return self._client._invoke(_dirty_log.reset_dirty_rings(self.id))


class Vcpu:
    """A vCPU on the server: run batches on it, one step per call or over a stream."""

    __slots__ = ("_client", "vm_id", "id")

    def __init__(self, client: Client, vm_id: int, vcpu_id: int) -> None:
        self._client = client
        self.vm_id = vm_id
        self.id = vcpu_id

    def __repr__(self) -> str:
        return f"Vcpu(vm_id={self.vm_id}, id={self.id})"

    def info(self) -> VcpuInfo:
        return self._client._invoke(_base.get_vcpu(self.vm_id, self.id))

    def stats(self) -> dict[str, int]:
        return self._client._invoke(_base.vcpu_stats(self.vm_id, self.id))

    def run(self, batch: Batch, start_ns: int | None = None) -> RunResult:
        """Run `batch` from its first access until it is done or exits; in virtual time,
        starting at `start_ns` if given (not before the VM's now)."""
        return self._client._invoke(_base.run_batch(self.vm_id, self.id, batch,
                                                        start_ns))

    def complete_mmio(self, data: bytes = b"") -> RunResult:
        """Complete the pending MMIO access (a read's `length` bytes, or nothing for a
        write) and resume its batch."""
        return self._client._invoke(_base.complete_mmio(self.vm_id, self.id, data))

    def resume(self) -> RunResult:
        """KVM_RUN again with no new batch: retry the access that ended the last step
        with MEMORY_FAULT or INTERNAL_ERROR, or go on after HLT or DIRTY_RING_FULL."""
        return self._client._invoke(_base.resume(self.vm_id, self.id))

    def stream(self) -> RunStream:
        """Open a Run stream on this vCPU; use it as a context manager."""
        return RunStream(self._client._stubs, self.vm_id, self.id)


_CLOSE = object()


class RunStream:
    """The bidirectional Run stream of one vCPU. Each step sends one request and blocks
    for its answer; a refused step raises and the stream goes on. An MMIO exit the stream
    leaves pending is dropped when it closes."""

    def __init__(self, stubs: _base.Stubs, vm_id: int, vcpu_id: int) -> None:
        self.vm_id = vm_id
        self.vcpu_id = vcpu_id
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._responses = stubs.vcpu.Run(iter(self._requests.get, _CLOSE))

    def __enter__(self) -> RunStream:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def run(self, batch: Batch, start_ns: int | None = None) -> RunResult:
        return self._step(_base.run_request(self.vm_id, self.vcpu_id, batch, start_ns))

    def complete_mmio(self, data: bytes = b"") -> RunResult:
        return self._step(_base.mmio_request(self.vm_id, self.vcpu_id, data))

    def resume(self) -> RunResult:
        return self._step(_base.resume_request(self.vm_id, self.vcpu_id))

    def close(self) -> None:
        """Half-close the stream and wait for the server to end it."""
        self._requests.put(_CLOSE)
        try:
            for _ in self._responses:
                pass
        except grpc.RpcError:
            pass    # the step that failed has raised it already

    def _step(self, request: Any) -> RunResult:
        self._requests.put(request)
        try:
            response = next(self._responses, None)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc
        if response is None:
            raise VmmuError(grpc.StatusCode.CANCELLED, "the Run stream is closed")
        return _base.run_response(response)


class InvalidationHold:
    """An invalidation held while this stream is open (`Vm.hold_invalidation`).

    `invalidation` is the hold as it began. `end()` ends it and returns how it ended;
    `cancel()` drops the stream as a client that dies would, and the server ends the hold
    as CLIENT_GONE. As a context manager it ends the hold on exit, or cancels on an error.
    """

    def __init__(self, client: Client, vm_id: int, responses: Any,
                 invalidation: HeldInvalidation) -> None:
        self._client = client
        self._responses = responses
        self.vm_id = vm_id
        self.id = invalidation.id
        self.invalidation = invalidation

    def __enter__(self) -> InvalidationHold:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.end()
        else:
            self.cancel()

    def end(self) -> HeldInvalidation:
        self._client._invoke(_base.end_invalidation(self.vm_id, self.id))
        return _next_hold(self._responses)

    def cancel(self) -> None:
        self._responses.cancel()


def _next_hold(responses: Any) -> HeldInvalidation:
    try:
        response = next(responses, None)
    except grpc.RpcError as exc:
        raise error_from_rpc(exc) from exc
    if response is None:
        raise VmmuError(grpc.StatusCode.CANCELLED, "the HoldInvalidation stream is closed")
    return _base.held_invalidation(response.invalidation)


class TraceStream:
    """The events of a Trace subscription, in emission order: iterate it. Iteration ends
    when the server ends the stream (its VMs are gone) or after `cancel()`, which also
    unsubscribes; as a context manager it cancels on exit."""

    def __init__(self, stubs: _base.Stubs, request: Any) -> None:
        self._responses = stubs.trace.Trace(request)
        self._cancelled = False
        try:
            next(self._responses)               # no event: the subscription is live
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc

    def __enter__(self) -> TraceStream:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.cancel()

    def __iter__(self) -> Iterator[TraceEvent]:
        return self

    def __next__(self) -> TraceEvent:
        try:
            response = next(self._responses)
        except grpc.RpcError as exc:
            if self._cancelled:
                raise StopIteration from None
            raise error_from_rpc(exc) from exc
        return _base.trace_event(response.event)

    def cancel(self) -> None:
        self._cancelled = True
        self._responses.cancel()
