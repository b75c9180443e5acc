"""Tracepoints: events named after KVM's (`kvm_page_fault`, `kvm_tdp_mmu_spte_changed`, ...).

`Tracer.emit(event, **fields)` is free when nobody listens (one attribute test at the call
site: `if vm.tracer.on:`). Field values are ints, strs and bools. A subscriber gets a bounded
buffer: when a slow reader lets it fill, the oldest events are dropped and counted, so a
reader can never slow the VM down or make the server grow without limit.

A `Subscription` may listen to the tracers of several VMs (`Kvm.trace`); events reach it in
the order they were emitted, since emitting is synchronous.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from .errors import einval

__all__ = ["Tracer", "TraceEvent", "Subscription", "EVENTS", "DEFAULT_CAPACITY",
           "MAX_CAPACITY"]

EVENTS = (
    "kvm_page_fault",              # vcpu, gpa, error_code
    "kvm_mmu_spte_requested",      # gfn, pfn, level
    "kvm_tdp_mmu_spte_changed",    # as_id, gfn, level, old, new
    "kvm_mmu_prepare_zap_page",    # gfn, level (a page-table page torn down)
    "mark_mmio_spte",              # gfn, gen
    "handle_mmio_page_fault",      # gpa
    "kvm_mmu_invalidate_range",    # phase (start/end), start, end (hva)
    "kvm_unmap_hva_range",         # start, end
    "kvm_age_hva",                 # start, end, young
    "kvm_test_age_hva",            # start, end, young
    "host_mm_op",                  # op (madvise_dontneed, migrate, ...), start, end, pages
    "kvm_userspace_exit",          # vcpu, reason
    "kvm_mmio",                    # vcpu, gpa, len, is_write
    "fast_page_fault",             # vcpu, gpa, old, new, result
    "kvm_mmu_split_huge_page",     # gfn, level
    "kvm_mmu_get_page",            # gfn, level, as_id, created (legacy MMU)
    "kvm_mmu_set_spte",            # gfn, level, old, new (legacy MMU)
    "kvm_mmu_zap_all_fast",        # mmu_valid_gen, used_pages (legacy MMU)
    "kvm_tlb_flush",               # remote flush requested: vcpus
    "kvm_dirty_ring_push",         # vcpu, slot, offset
    "kvm_dirty_ring_reset",        # vcpu, count
    "kvm_dirty_ring_exit",         # vcpu
    "gpc_invalidate",              # gpc, start, end
    "gpc_refresh",                 # gpc, result, retries
    "host_mm_op",                  # op, start, end, pages (a host_ops call that completed)
    "kvm_vm_set_mem_attributes",   # start, end (gfns), attributes
    "kvm_gmem_invalidate",         # fd, start, end (guest_memfd page indices)
)

DEFAULT_CAPACITY = 4096
MAX_CAPACITY = 1 << 16


@dataclass(frozen=True)
class TraceEvent:
    seq: int                    # per VM, in emission order
    time_ns: int                # time.monotonic_ns() at emission
    vm_id: int
    event: str
    fields: dict = field(default_factory=dict)
    virtual_ns: int | None = None   # a VM in virtual time: the emitter's virtual time


class Subscription:
    """A bounded buffer of events for one reader, fed by one or more tracers.

    `get()` waits for the next event; `async for event, dropped_before in subscription`
    also says how many events were dropped just before each one. `close()` (or leaving a
    `with` block) detaches it from every tracer. A subscription that `ends_with_tracers`
    also ends once the last of its tracers closes (its VMs are destroyed); either way the
    reader gets what is still buffered before the end.
    """

    def __init__(self, events: Iterable[str] | None = None,
                 capacity: int = DEFAULT_CAPACITY, *, ends_with_tracers: bool = True) -> None:
        events = frozenset(events or ())
        unknown = events.difference(EVENTS)
        if unknown:
            raise einval(f"unknown trace events {sorted(unknown)}")
        if not 1 <= capacity <= MAX_CAPACITY:
            raise einval(f"trace buffer capacity {capacity} is not in 1..{MAX_CAPACITY}")
        self.events = events or None
        self.ends_with_tracers = ends_with_tracers
        self._tracers: list[Tracer] = []
        self._buffer: collections.deque[TraceEvent] = collections.deque(maxlen=capacity)
        self._ready = asyncio.Event()
        self.dropped = 0
        self._reported = 0              # drops already told to the async iterator's reader
        self.closed = False

    def offer(self, event: TraceEvent) -> None:
        if self.events is not None and event.event not in self.events:
            return
        if len(self._buffer) == self._buffer.maxlen:
            self.dropped += 1
        self._buffer.append(event)
        self._ready.set()

    async def get(self) -> TraceEvent | None:
        """The next event, or None once the subscription is closed and drained."""
        while not self._buffer:
            if self.closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        return self._buffer.popleft()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> tuple[TraceEvent, int]:
        """(the next event, how many were dropped between the previous one and it)."""
        event = await self.get()
        if event is None:
            raise StopAsyncIteration
        dropped_before, self._reported = self.dropped - self._reported, self.dropped
        return event, dropped_before

    def attached(self, tracer: Tracer) -> None:
        self._tracers.append(tracer)

    def detached(self, tracer: Tracer) -> None:
        self._tracers.remove(tracer)
        if not self._tracers and self.ends_with_tracers:
            self.closed = True
            self._ready.set()

    def close(self) -> None:
        self.closed = True
        self._ready.set()
        for tracer in list(self._tracers):
            tracer.unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Tracer:
    def __init__(self, vm_id: int) -> None:
        self.vm_id = vm_id
        self.on = False
        self._subscribers: list[Subscription] = []
        self._seq = itertools.count()
        self.emitted = 0
        self.clock = None               # the VM's virtual clock, in virtual time

    def emit(self, event: str, **fields) -> None:
        self.emitted += 1
        record = TraceEvent(next(self._seq), time.monotonic_ns(), self.vm_id, event, fields,
                            self.clock.time() if self.clock is not None else None)
        for sub in self._subscribers:
            sub.offer(record)

    def subscribe(self, events: frozenset[str] | None = None,
                  capacity: int = DEFAULT_CAPACITY) -> Subscription:
        sub = Subscription(events, capacity)
        self.attach(sub)
        return sub

    def attach(self, sub: Subscription) -> None:
        self._subscribers.append(sub)
        sub.attached(self)
        self.on = True

    def unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subscribers:
            self._subscribers.remove(sub)
            sub.detached(self)
        self.on = bool(self._subscribers)

    def close(self) -> None:
        """The VM is gone: detach every subscriber (`Subscription.ends_with_tracers`)."""
        for sub in list(self._subscribers):
            self.unsubscribe(sub)
