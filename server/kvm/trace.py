"""Tracepoints: events named after KVM's (`kvm_page_fault`, `kvm_tdp_mmu_spte_changed`, ...).

`Tracer.emit(event, **fields)` is free when nobody listens (one attribute test at the call
site: `if vm.tracer.on:`). A subscriber gets a bounded buffer: when a slow reader lets it
fill, the oldest events are dropped and counted, so a reader can never slow the VM down or
make the server grow without limit.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from dataclasses import dataclass, field

__all__ = ["Tracer", "TraceEvent", "Subscription", "EVENTS"]

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
    "kvm_userspace_exit",          # vcpu, reason
    "kvm_mmio",                    # vcpu, gpa, len, is_write
    "fast_page_fault",             # vcpu, gpa, old, new, result
    "kvm_mmu_split_huge_page",     # gfn, level
    "kvm_tlb_flush",               # remote flush requested
    "kvm_dirty_ring_push",         # vcpu, slot, offset
    "kvm_dirty_ring_reset",        # vcpu, count
    "kvm_dirty_ring_exit",         # vcpu
    "gpc_invalidate",              # gpc, start, end
    "gpc_refresh",                 # gpc, result, retries
)


@dataclass(frozen=True)
class TraceEvent:
    seq: int
    time_ns: int
    vm_id: int
    event: str
    fields: dict = field(default_factory=dict)


class Subscription:
    """A bounded buffer of events for one reader; `get()` waits for the next event."""

    def __init__(self, tracer: "Tracer", events: frozenset[str] | None, capacity: int) -> None:
        self._tracer = tracer
        self.events = events
        self._buffer: collections.deque[TraceEvent] = collections.deque(maxlen=capacity)
        self._ready = asyncio.Event()
        self.dropped = 0
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

    def close(self) -> None:
        self.closed = True
        self._ready.set()
        self._tracer.unsubscribe(self)


class Tracer:
    def __init__(self, vm_id: int) -> None:
        self.vm_id = vm_id
        self.on = False
        self._subscribers: list[Subscription] = []
        self._seq = itertools.count()
        self.emitted = 0

    def emit(self, event: str, **fields) -> None:
        self.emitted += 1
        record = TraceEvent(next(self._seq), time.monotonic_ns(), self.vm_id, event, fields)
        for sub in self._subscribers:
            sub.offer(record)

    def subscribe(self, events: frozenset[str] | None = None,
                  capacity: int = 4096) -> Subscription:
        sub = Subscription(self, events, capacity)
        self._subscribers.append(sub)
        self.on = True
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subscribers:
            self._subscribers.remove(sub)
        self.on = bool(self._subscribers)

    def close(self) -> None:
        for sub in list(self._subscribers):
            sub.close()
