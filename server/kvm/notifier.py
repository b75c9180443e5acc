"""The MMU-notifier side of a VM: invalidation state and the fault-retry check.

State (reference §4.1): `mmu_invalidate_seq` moves at the end of every invalidation;
`mmu_invalidate_in_progress` counts begun-not-ended invalidations that hit a memslot, and
`[range_start, range_end)` is the hull of their gfns; `mn_active_invalidate_count` counts
every start() whose end() has not finished, and memslot updates wait for it to reach zero;
`invalidating_hvas` holds the hva ranges of those same invalidations (what a range-based
GPC refresh asks about instead of the count).

Contract with the host: once `invalidate_range_start` returns, no SPTE maps the range and
every TLB is flushed; until the matching end, no fault installs a mapping of the range
(faults check `retry_gfn` under mmu_lock against the sequence they snapshotted first).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .clock import WaitQueue
from .errors import VmBugged

if TYPE_CHECKING:
    from .vm import Vm

__all__ = ["Notifier"]

INVALID_GFN = -1


class Notifier:
    def __init__(self, vm: "Vm") -> None:
        self.vm = vm
        self.mmu_invalidate_seq = 0
        self.mmu_invalidate_in_progress = 0
        self.range_start = INVALID_GFN
        self.range_end = INVALID_GFN
        self.mn_active_invalidate_count = 0
        self._end_waiters = WaitQueue(vm.clock)       # faults waiting for an end
        self._idle_waiters = WaitQueue(vm.clock)      # waiting for the count to reach 0
        self.start_hooks: list = []     # run at start() before mmu_lock: the GPC sweep
        # hva ranges between the top of start() and the bottom of end(), kept with
        # mn_active_invalidate_count: what a range-based GPC refresh asks about (gpc.py).
        self.invalidating_hvas: list[tuple[int, int]] = []
        self._hva_range_waiters = WaitQueue(vm.clock)  # waiting for any start() to end

    # -- the host's callbacks -------------------------------------------------------

    async def invalidate_range_start(self, start: int, end: int) -> None:
        self.mn_active_invalidate_count += 1
        self.invalidating_hvas.append((start, end))
        clock = self.vm.clock
        if clock is not None:
            clock.charge(clock.costs.notifier_callback)
        tracer = self.vm.tracer
        if tracer.on:
            tracer.emit("kvm_mmu_invalidate_range", phase="start", start=start, end=end)
            tracer.emit("kvm_unmap_hva_range", start=start, end=end)
        for hook in self.start_hooks:
            hook(start, end)
        hits = self._gfn_ranges(start, end)
        if not hits:
            return
        vm = self.vm
        async with vm.mmu_lock.write:
            self._begin()
            flush = False
            if vm.sanitizers is not None:
                vm.sanitizers.invalidation_begun(start, end)
            for as_id, gfn_start, gfn_end in hits:
                self._range_add(gfn_start, gfn_end)
                flush = await vm.mmu.unmap_gfn_range(as_id, gfn_start, gfn_end) or flush
            if flush and "skip_zap_tlb_flush" not in vm.knobs:
                vm.flush_remote_tlbs()
            if vm.sanitizers is not None:
                for as_id, gfn_start, gfn_end in hits:
                    vm.sanitizers.check_range_unmapped(as_id, gfn_start, gfn_end)

    async def invalidate_range_end(self, start: int, end: int) -> None:
        clock = self.vm.clock
        if clock is not None:
            clock.charge(clock.costs.notifier_callback)
        if self.vm.tracer.on:
            self.vm.tracer.emit("kvm_mmu_invalidate_range", phase="end", start=start, end=end)
        if self._gfn_ranges(start, end):
            async with self.vm.mmu_lock.write:
                self._end()
                if self.vm.sanitizers is not None:
                    self.vm.sanitizers.invalidation_ended(start, end)
        self.mn_active_invalidate_count -= 1
        if self.mn_active_invalidate_count < 0:
            raise VmBugged("mn_active_invalidate_count went negative")
        self.invalidating_hvas.remove((start, end))
        self._hva_range_waiters.wake_all()
        if self.mn_active_invalidate_count == 0:
            self._idle_waiters.wake_all()

    # -- invalidations by gfn: memory attributes and guest_memfd ------------------------

    async def invalidate_gfns_begin(self, hits: list[tuple[int, int, int]]) -> None:
        """`kvm_mmu_invalidate_begin` with `kvm_mmu_unmap_gfn_range` of each (as_id,
        start, end) in `hits`, for a change KVM makes by gfn (memory attributes, a
        guest_memfd hole): once this returns nothing maps the ranges, every TLB is
        flushed, and until `invalidate_gfns_end` a fault that maps them retries."""
        vm = self.vm
        async with vm.mmu_lock.write:
            self._begin()
            if vm.sanitizers is not None:
                vm.sanitizers.gfn_invalidation_begun(hits)
            flush = False
            for as_id, gfn_start, gfn_end in hits:
                self._range_add(gfn_start, gfn_end)
                flush = await vm.mmu.unmap_gfn_range(as_id, gfn_start, gfn_end) or flush
            if flush and "skip_zap_tlb_flush" not in vm.knobs:
                vm.flush_remote_tlbs()

    async def invalidate_gfns_end(self, hits: list[tuple[int, int, int]]) -> None:
        """`kvm_mmu_invalidate_end` of an `invalidate_gfns_begin`."""
        vm = self.vm
        async with vm.mmu_lock.write:
            self._end()
            if vm.sanitizers is not None:
                vm.sanitizers.gfn_invalidation_ended(hits)

    def _gfn_ranges(self, start: int, end: int) -> list[tuple[int, int, int]]:
        return [(slots.as_id, gfn_start, gfn_end)
                for slots in self.vm.memslot_sets
                for _, gfn_start, gfn_end in slots.in_hva_range(start, end)]

    # -- begin/range_add/end: mmu_lock held for write --------------------------------

    def _begin(self) -> None:
        self.vm.mmu_lock.assert_held_write()
        self.mmu_invalidate_in_progress += 1
        if self.mmu_invalidate_in_progress == 1:
            self.range_start = self.range_end = INVALID_GFN

    def _range_add(self, start: int, end: int) -> None:
        if self.range_start == INVALID_GFN:
            self.range_start, self.range_end = start, end
        else:
            self.range_start = min(self.range_start, start)
            self.range_end = max(self.range_end, end)

    def _end(self) -> None:
        self.vm.mmu_lock.assert_held_write()
        self.mmu_invalidate_seq += 1
        self.vm.stat.mmu_invalidate_seq = self.mmu_invalidate_seq
        self.mmu_invalidate_in_progress -= 1
        if self.mmu_invalidate_in_progress < 0:
            raise VmBugged("mmu_invalidate_in_progress went negative")
        self._end_waiters.wake_all()

    # -- what faults ask -------------------------------------------------------------

    def retry_gfn(self, mmu_seq: int, gfn: int) -> bool:
        """`mmu_invalidate_retry_gfn`, under mmu_lock."""
        self.vm.mmu_lock.assert_held()
        return self.retry_gfn_unsafe(mmu_seq, gfn)

    def retry_gfn_unsafe(self, mmu_seq: int, gfn: int) -> bool:
        """The lockless pre-check: may be wrong both ways without the lock."""
        if self.mmu_invalidate_in_progress and self.range_start <= gfn < self.range_end:
            return True
        return self.mmu_invalidate_seq != mmu_seq

    def blocks(self, gfn: int) -> bool:
        """Is an invalidation covering gfn between begin and end right now?"""
        return bool(self.mmu_invalidate_in_progress) and \
            self.range_start <= gfn < self.range_end

    async def wait_for_end(self) -> None:
        """Sleep until the next invalidation end (a faulting vCPU need not spin)."""
        await self._end_waiters.wait()

    async def wait_idle(self) -> None:
        """Wait until no invalidation is between start() and the end of end()."""
        while self.mn_active_invalidate_count:
            await self._idle_waiters.wait()

    def invalidating(self, start: int, end: int) -> bool:
        """Does an invalidation between start() and the end of end() overlap hva
        [start, end)?"""
        for s, e in self.invalidating_hvas:
            if s < end and start < e:
                return True
        return False

    async def wait_hva_idle(self, start: int, end: int) -> None:
        """Wait until no invalidation in flight overlaps hva [start, end); others may
        go on. Returns at once when none does."""
        while self.invalidating(start, end):
            await self._hva_range_waiters.wait()
