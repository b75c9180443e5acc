"""Walks of memslot rmaps under mmu_lock held for write that yield it, as KVM's
`walk_slot_rmaps` does (`cond_resched_rwlock_write`).

A walk visits the heads of gfns [first, last) of a slot, level by level from the lowest,
in chunks of RMAP_CHUNK heads; the caller does its work on the non-empty heads of a chunk
(zap, write-protect, age) and says in `walk.flush` whether a TLB flush is pending. Between
chunks the walk yields mmu_lock if a task waits for it (`rwlock_needbreak`) or it has
visited YIELD_BATCH heads since it last yielded (`need_resched`), with the TDP MMU's
rules:

- flush first: a pending flush is done before the lock is dropped (if the walk's caller
  asks for it, as every zap does), so that no vCPU uses a translation the walk took away
  while others hold the lock;
- restart safely: the walk goes on from the next chunk, read from the head array after the
  lock is retaken, so heads filled meanwhile are seen. A slot deleted or moved while the
  lock was out had every SPTE zapped first (zap_all_fast), so the heads the walk holds are
  empty and it finds nothing more there; a slot that is gone before its walk begins has
  nothing to walk.

A VM with a schedule seed yields only when a task waits (or the batch is used up): the
point `shadow.cond_resched` is where the explorer lets others in.
"""

from __future__ import annotations

import asyncio
from array import array
from collections.abc import AsyncIterator
from itertools import compress
from typing import TYPE_CHECKING

from .tdp_mmu import YIELD_BATCH

if TYPE_CHECKING:
    from .memslots import Memslot
    from .shadow_mmu import ShadowMmu

__all__ = ["RmapWalk", "RMAP_CHUNK", "yield_write_lock"]

RMAP_CHUNK = 64              # heads between two checks for a yield


async def yield_write_lock(mmu: "ShadowMmu") -> None:
    """Drop mmu_lock (held for write), let the tasks that wait for it run, retake it."""
    lock = mmu.mmu_lock
    lock.release_write()
    try:
        await asyncio.sleep(0)
    finally:
        await lock.acquire_write()
    mmu.stat.shadow_mmu_yields += 1


class RmapWalk:
    """One walk under mmu_lock held for write, over one or more slots' rmaps."""

    __slots__ = ("mmu", "flush", "flush_on_yield", "visited")

    def __init__(self, mmu: "ShadowMmu", flush_on_yield: bool) -> None:
        mmu.mmu_lock.assert_held_write()
        self.mmu = mmu
        self.flush = False                    # a TLB flush is pending
        self.flush_on_yield = flush_on_yield
        self.visited = 0

    async def chunks(self, slot: "Memslot", first: int, last: int, min_level: int,
                     max_level: int) -> AsyncIterator[tuple[array, int, list[int]]]:
        """(heads, level, indices of its non-empty heads) for each chunk of the walk."""
        async for heads, level, i, stop in self.spans(slot, first, last, min_level, max_level,
                                                      joined=False):
            yield heads, level, list(compress(range(i, stop), heads[i:stop]))

    async def spans(self, slot: "Memslot", first: int, last: int, min_level: int,
                    max_level: int, joined: bool = True
                    ) -> AsyncIterator[tuple[array, int, int, int]]:
        """(heads, level, lo, hi): each chunk of the walk, or (`joined`) the chunks between
        two of its checks for a yield joined into one span, for callers that do a span's
        work in bulk. The checks fall where they fall chunk by chunk: a waiter can appear
        only while the walk awaits, so a span begun with no waiter runs until the batch is
        used up (or the level ends), and one begun with a waiter is one chunk."""
        mmu = self.mmu
        rmaps = mmu.slot_rmaps.get((slot.as_id, slot.id))
        for level in range(min_level, max_level + 1) if rmaps is not None else ():
            i, end = rmaps.span(first, last, level)
            heads = rmaps.heads[level]
            while i < end:
                chunks = 1
                if joined and not mmu.mmu_lock.needbreak():
                    chunks = max(1, -(-(YIELD_BATCH - self.visited) // RMAP_CHUNK))
                stop = min(end, i + chunks * RMAP_CHUNK)
                yield heads, level, i, stop
                self.visited += stop - i
                i = stop
                if self.visited >= YIELD_BATCH or mmu.mmu_lock.needbreak():
                    await self.cond_resched()

    async def cond_resched(self) -> None:
        """Flush if one is pending and the caller wants it, then yield mmu_lock."""
        mmu = self.mmu
        if self.flush and self.flush_on_yield:
            mmu.flush_remote_tlbs()
            self.flush = False
        await mmu.sched.point("shadow.cond_resched")
        await yield_write_lock(mmu)
        self.visited = 0
