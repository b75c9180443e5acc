"""The simulated VMM process address space: the primary MMU that KVM's mappings shadow.

A region of hva is created and destroyed like mmap/munmap and backed by 4K pages, THP (2M
host mappings wherever a whole aligned 2M frame fits in the region) or hugetlb 1G pages.
Host pages are populated on first touch (or swapped in); their contents live in a sparse
dict keyed by 4K pfn and untouched memory reads as zero. `hva_to_pfn` is what GUP does
for KVM, including the copy-on-write break of a KSM page on a write. The operations that
take mappings away (madvise, migration, swap-out, mprotect, KSM merging, THP split and
collapse) live in `host_ops` and change mappings only through `update`.

Invariant: while an hva maps a pfn, every secondary MMU that registered an `MmuNotifier`
may cache that translation; anything that takes a translation away, or changes the level
of the host page behind it, first calls `invalidate_range_start` on every notifier over a
range that covers every host page it changes, and `invalidate_range_end` after. The change
itself is synchronous, so nothing can observe it half done.
"""

from __future__ import annotations

import bisect
import errno
from collections import deque
from collections.abc import Callable
from typing import Iterator, Protocol, TypeVar

from .errors import KvmError, NoSuchObject, VmBugged, einval
from .host_region import (HPAGE_SHIFT, HPAGE_SIZE, HUGE_ZERO_PFN, PROT_READ, PROT_WRITE,
                          ZERO_PFN, HostRegion, HostRegionInfo, is_zero_pfn, keys_in)
from .limits import MemoryCharge
from .resched import Timeslice
from .types import (LEVEL_SHIFT, PAGE_MASK, PAGE_SHIFT, PAGE_SIZE, PG_LEVEL_1G,
                    PG_LEVEL_2M, PG_LEVEL_4K, TASK_SIZE_MAX, Backing, level_shift,
                    pages_per_level)

__all__ = ["HostMm", "HostRegion", "HostRegionInfo", "MmuNotifier", "PfnAllocator",
           "HVA_BASE"]

HVA_BASE = 0x7F00_0000_0000      # where mmap() without a hint starts placing regions
FIRST_PFN = 0x100000             # host frames start at 4 GiB
GIB = 1 << 30

T = TypeVar("T")
_AGAIN = object()                # an update found a wider range to announce


class MmuNotifier(Protocol):
    async def invalidate_range_start(self, start: int, end: int) -> None: ...
    async def invalidate_range_end(self, start: int, end: int) -> None: ...


class PfnAllocator:
    """Host physical frames, naturally aligned per size, recycled through free lists.

    A freed frame is handed out again only after `REUSE_DELAY` more frames of its size
    were freed after it (oldest first): a page the host just took away does not come
    straight back at the same pfn, so a stale translation shows as a wrong pfn.
    """

    REUSE_DELAY = 16

    def __init__(self, first: int = FIRST_PFN, charge: MemoryCharge | None = None) -> None:
        self._next = first
        self._free: dict[int, deque[int]] = {PG_LEVEL_4K: deque(), PG_LEVEL_2M: deque(),
                                              PG_LEVEL_1G: deque()}
        self.allocated_4k = 0
        self.charge = charge           # refuses, before anything changes, past its limit

    def alloc(self, level: int) -> int:
        count = 1 << LEVEL_SHIFT[level]
        if self.charge is not None:
            self.charge.try_charge(count << PAGE_SHIFT)
        self.allocated_4k += count
        free = self._free[level]
        if len(free) > self.REUSE_DELAY:
            return free.popleft()
        pfn = (self._next + count - 1) & ~(count - 1)
        self._next = pfn + count
        return pfn

    def free(self, pfn: int, level: int) -> None:
        count = 1 << LEVEL_SHIFT[level]
        self.allocated_4k -= count
        if self.charge is not None:
            self.charge.uncharge(count << PAGE_SHIFT)
        self._free[level].append(pfn)

    def free_all(self) -> None:
        """Free every frame at once (whatever held them is gone); none is handed out again."""
        if self.charge is not None:
            self.charge.uncharge(self.allocated_4k << PAGE_SHIFT)
        self.allocated_4k = 0
        for free in self._free.values():
            free.clear()


class HostMm:
    """The VMM's mm: regions, their host pages, KSM pages and the page contents."""

    def __init__(self, mapped: MemoryCharge | None = None,
                 populated: MemoryCharge | None = None) -> None:
        self._starts: list[int] = []
        self._regions: list[HostRegion] = []
        self._last_found: HostRegion | None = None
        self.mapped = mapped
        self.pfns = PfnAllocator(charge=populated)
        self.sched = None                          # the owning VM's preemption points
        self.clock = None                          # its virtual clock, in virtual time
        self.contents: dict[int, bytearray] = {}
        self.ksm_pages: dict[int, int] = {}      # pfn of a KSM page -> hvas that map it
        self.notifiers: list[MmuNotifier] = []

    # -- regions ---------------------------------------------------------------------

    def mmap(self, size: int, backing: Backing, *, writable: bool = True,
             hva: int | None = None) -> HostRegion:
        align = PAGE_SIZE << level_shift(backing.page_level) if backing is Backing.HUGETLB_1G \
            else PAGE_SIZE
        if size <= 0 or size % align:
            raise einval(f"size {size:#x} is not a positive multiple of {align:#x}")
        if hva is None:
            hva = self._place(size, max(align, HPAGE_SIZE))
        elif hva % align:
            raise einval(f"hva {hva:#x} is not aligned to {align:#x}")
        if hva < PAGE_SIZE or hva + size > TASK_SIZE_MAX:
            raise KvmError(errno.ENOMEM, f"[{hva:#x}, {hva + size:#x}) is outside the user "
                           "address space")
        i = bisect.bisect_right(self._starts, hva)
        if (i and self._regions[i - 1].end > hva) or \
                (i < len(self._starts) and self._starts[i] < hva + size):
            raise KvmError(errno.EEXIST, f"[{hva:#x}, {hva + size:#x}) overlaps a region")
        if self.mapped is not None:
            self.mapped.try_charge(size)
        region = HostRegion(hva, size, backing, writable)
        self._starts.insert(i, hva)
        self._regions.insert(i, region)
        return region

    def _place(self, size: int, align: int) -> int:
        """The lowest `align`ed hva from HVA_BASE up with room for `size` bytes and a gap
        of HPAGE_SIZE on both sides (first fit: the space of unmapped regions is reused);
        TASK_SIZE_MAX when there is none. Nothing changes until the caller inserts."""
        hva = _align_up(HVA_BASE, align)
        for region in self._regions[max(0, bisect.bisect_right(self._starts, HVA_BASE) - 1):]:
            if region.end <= HVA_BASE:
                continue
            if hva + size + HPAGE_SIZE <= region.hva:
                break
            hva = max(hva, _align_up(region.end + HPAGE_SIZE, align))
        return min(hva, TASK_SIZE_MAX)

    async def munmap(self, hva: int, size: int) -> None:
        """Unmap a whole region: notifiers first, then the host pages are freed."""
        region = self.region_exact(hva, size)
        await self.invalidate(hva, hva + size, lambda: self._drop_region(region))

    def release(self) -> None:
        """Drop every region and its pages at once (the VM is gone: no notifier listens).
        Its guest_memfd files gave their pages back first, so every frame still allocated
        is a region's (or a KSM page regions share): they are freed, and uncharged, in
        bulk rather than one `put` each. Should a frame be held elsewhere all the same,
        the regions go page by page, and only their frames are freed."""
        held = sum(region.info().populated_4k_pages for region in self._regions) - \
            sum(self.ksm_pages.values()) + len(self.ksm_pages)
        if held != self.pfns.allocated_4k:
            for region in list(self._regions):
                self._drop_region(region)
            return
        for region in self._regions:
            if self.mapped is not None:
                self.mapped.uncharge(region.size)
            for frames in region.frames.values():
                frames.clear()
            region.swapped.clear()
        self._regions.clear()
        self._starts.clear()
        self._last_found = None
        self.contents.clear()
        self.ksm_pages.clear()
        self.pfns.free_all()

    def _drop_region(self, region: HostRegion) -> None:
        i = self._regions.index(region)
        del self._regions[i], self._starts[i]
        if self.mapped is not None:
            self.mapped.uncharge(region.size)
        if region is self._last_found:
            self._last_found = None
        for level, frames in region.frames.items():
            for base in frames.values():
                self.put(base, level)
            frames.clear()
        region.swapped.clear()

    async def invalidate(self, start: int, end: int, change: Callable[[], T]) -> T:
        """Run `change()` (synchronous) between invalidate_range_start and _end."""
        for n in self.notifiers:
            await n.invalidate_range_start(start, end)
        try:
            if self.clock is not None:             # the host works on the range a while
                self.clock.charge(self.clock.costs.host_op_page *
                                  ((end - start + PAGE_SIZE - 1) >> PAGE_SHIFT))
            if self.sched is not None:
                await self.sched.point("mm.invalidate_window")
            return change()
        finally:
            for n in self.notifiers:
                await n.invalidate_range_end(start, end)

    async def update(self, region: HostRegion, start: int, end: int,
                     apply: Callable[[], T]) -> T:
        """Run `apply()` under an invalidation of every host page it may change: [start,
        end) widened to the huge pages at its edges, mapped or about to be. Should a huge
        page appear at an edge while the notifiers run anyway (a protection change made a
        frame whole), the wider range is announced again and `apply` runs then."""
        while True:
            lo, hi = region.hull(start, end)

            def change():
                if self.find(start) is not region:
                    raise KvmError(errno.EFAULT, f"[{start:#x}, {end:#x}) was unmapped "
                                   "meanwhile")
                return apply() if region.hull(start, end) == (lo, hi) else _AGAIN

            result = await self.invalidate(lo, hi, change)
            if result is not _AGAIN:
                return result

    def region_exact(self, hva: int, size: int) -> HostRegion:
        region = self.find(hva)
        if region is None or region.hva != hva or region.size != size:
            raise NoSuchObject(f"no host region is mapped at exactly [{hva:#x}, "
                               f"{hva + size:#x})")
        return region

    def find(self, hva: int) -> HostRegion | None:
        """The region that maps hva: the last one found first (the faults of a vCPU come
        in runs over one region, as `Memslots.lookup` keeps its last slot), then a
        binary search."""
        region = self._last_found
        if region is not None and region.hva <= hva < region.end:
            return region
        i = bisect.bisect_right(self._starts, hva) - 1
        if i >= 0:
            region = self._regions[i]
            if region.end > hva:
                self._last_found = region
                return region
        return None

    def hull(self, start: int, end: int) -> tuple[int, int]:
        """[start, end) widened to the huge pages at its edges (`HostRegion.hull`)."""
        first, last = self.find(start), self.find(end - 1)
        if first is not None:
            start = first.hull(start, min(end, first.end))[0]
        if last is not None:
            end = last.hull(max(start, last.hva), end)[1]
        return start, end

    def regions(self) -> list[HostRegion]:
        return list(self._regions)

    # -- translation (what GUP does for KVM) -----------------------------------------

    async def hva_to_pfn(self, hva: int, write: bool) -> tuple[int, bool, int]:
        """Fault in the page at hva: (pfn, writable, host mapping level).

        Raises EFAULT when nothing is mapped there, the mapping is PROT_NONE, or for a
        write to a read-only mapping.
        A read gets a writable pfn when the mapping allows writes (KVM asks for one
        opportunistically), but never for a copy-on-write page (a KSM page, the zero page);
        a read of private anonymous memory never touched maps the zero page (the huge
        zero page for a whole THP frame), allocating nothing. A write to a copy-on-write
        page first breaks copy-on-write, which invalidates the page. A swapped-out page
        comes back at a new pfn with its contents.
        """
        clock = self.clock
        if clock is not None:
            clock.charge(clock.costs.gup_slow)
        return await self.hva_to_pfn_slow(hva, write)

    async def hva_to_pfn_slow(self, hva: int, write: bool) -> tuple[int, bool, int]:
        """`hva_to_pfn` past its charge: look up, breaking copy-on-write (for a write)
        until hva maps a page of its own."""
        while True:
            region, _ = self._region_for_access(hva, write)
            found = self._get_page_nowait(region, hva, write, region.mapped(hva))
            if found is not None:
                return found
            await self.unshare(region, hva)

    def hva_to_pfn_nowait(self, hva: int, write: bool) -> tuple[int, bool, int] | None:
        """A fault's lookup up to where it would sleep: GUP-fast, else the slow lookup,
        charging each it takes; None when a write must first break copy-on-write, which
        may sleep (`hva_to_pfn_slow` does it). Raises as `hva_to_pfn` does. One region
        lookup serves both: this runs on every slow page fault."""
        region, writable = self._region_for_access(hva, write)
        found = region.mapped(hva)
        fast = self._gup_fast(found, write, writable)
        clock = self.clock
        if clock is not None:
            clock.charge(clock.costs.gup_fast)
            if fast is None:
                clock.charge(clock.costs.gup_slow)
        return fast if fast is not None else self._get_page_nowait(region, hva, write, found)

    def _gup_fast(self, found: tuple[int, int] | None, write: bool,
                  writable: bool) -> tuple[int, bool, int] | None:
        """GUP-fast (`hva_to_pfn_fast`), given `found = region.mapped(hva)` and whether hva
        is writable: what `hva_to_pfn` returns when the page is mapped and nothing has to
        sleep, else None (not populated, swapped out, or a write that must break
        copy-on-write)."""
        if found is None:
            return None
        pfn, level = found
        shared = self.is_cow_pfn(pfn)
        if write and shared:
            return None
        return pfn, writable and not shared, level

    def current_pfn(self, hva: int) -> int | None:
        """The pfn mapped at hva now, faulting nothing in (None: not populated)."""
        region = self.find(hva)
        found = region.mapped(hva) if region else None
        return found[0] if found else None

    def host_mapping_level(self, hva: int) -> int:
        region = self.find(hva)
        found = region.mapped(hva) if region else None
        return found[1] if found else PG_LEVEL_4K

    def _region_for_access(self, hva: int, write: bool) -> tuple[HostRegion, bool]:
        """The region at hva and whether hva is writable in it; EFAULT if the access
        cannot be made there."""
        region = self.find(hva)
        if region is None:
            raise KvmError(errno.EFAULT, f"hva {hva:#x} is not mapped")
        prot = region.prot_at(hva)
        if not prot:
            raise KvmError(errno.EFAULT, f"hva {hva:#x} is mapped PROT_NONE")
        writable = bool(prot & PROT_WRITE)
        if write and not writable:
            raise KvmError(errno.EFAULT, f"write to read-only hva {hva:#x}")
        return region, writable

    def _get_page_nowait(self, region: HostRegion, hva: int, write: bool,
                         found: tuple[int, int] | None) -> tuple[int, bool, int] | None:
        """`_get_page`, or None for a write to a copy-on-write page (break it first)."""
        if write and found is not None and self.is_cow_pfn(found[0]):
            return None
        return self._get_page(region, hva, write, found)

    def _get_page(self, region: HostRegion, hva: int, write: bool,
                  found: tuple[int, int] | None) -> tuple[int, bool, int]:
        """The page at hva, populated or swapped in if `found` (`region.mapped(hva)`) is
        None: (pfn, writable, host mapping level)."""
        if found is None:
            page = hva >> PAGE_SHIFT
            if page in region.swapped:
                found = self._swap_in(region, page)
            elif not write and region.backing is not Backing.HUGETLB_1G:
                found = self._map_zero_page(region, hva)
            else:
                found = self._populate(region, hva)
        pfn, level = found
        shared = self.is_cow_pfn(pfn)
        if write and shared:
            raise VmBugged(f"write mapping of copy-on-write page {pfn:#x} without a COW "
                           "break")
        return pfn, region.writable_at(hva) and not shared, level

    def fault_in(self, region: HostRegion, hva: int,
                 write: bool) -> tuple[int, int, int] | None:
        """Touch the page at hva of `region` as `hva_to_pfn` does once its checks passed:
        (pfn, host mapping level, 4K pages this populated or swapped in, 0 if hva was
        mapped already); None for a write to a copy-on-write page (break it first)."""
        found = region.mapped(hva)
        got = self._get_page_nowait(region, hva, write, found)
        if got is None:
            return None
        pfn, _, level = got
        return pfn, level, 0 if found is not None else pages_per_level(level)

    def _populate(self, region: HostRegion, hva: int) -> tuple[int, int]:
        level = region.frame_level(hva)
        if level == PG_LEVEL_4K and region.backing is Backing.THP:
            region.split_2m.add(hva >> HPAGE_SHIFT)     # a table of 4K entries maps it now
        base = self.pfns.alloc(level)
        clock = self.clock
        if clock is not None:
            costs = clock.costs
            clock.charge(costs.page_alloc_4k + costs.page_zero_4k if level == PG_LEVEL_4K
                         else (costs.page_alloc_2m + costs.page_zero_2m) *
                         pages_per_level(level) // pages_per_level(PG_LEVEL_2M))
        shift = LEVEL_SHIFT[level]
        region.frames[level][hva >> (PAGE_SHIFT + shift)] = base
        return base + ((hva >> PAGE_SHIFT) & ((1 << shift) - 1)), level

    def _map_zero_page(self, region: HostRegion, hva: int) -> tuple[int, int]:
        """`do_anonymous_page` (and `do_huge_pmd_anonymous_page`) for a read: map the
        shared zero page read-only, or the huge zero page for a whole THP frame."""
        level = region.frame_level(hva)
        if level == PG_LEVEL_2M:
            region.frames[PG_LEVEL_2M][hva >> HPAGE_SHIFT] = HUGE_ZERO_PFN
            return HUGE_ZERO_PFN + ((hva >> PAGE_SHIFT) & (pages_per_level(level) - 1)), level
        if region.backing is Backing.THP:
            region.split_2m.add(hva >> HPAGE_SHIFT)     # a table of 4K entries maps it now
        region.frames[PG_LEVEL_4K][hva >> PAGE_SHIFT] = ZERO_PFN
        return ZERO_PFN, PG_LEVEL_4K

    def _swap_in(self, region: HostRegion, page: int) -> tuple[int, int]:
        pfn = self.pfns.alloc(PG_LEVEL_4K)
        if self.clock is not None:
            self.clock.charge(self.clock.costs.page_alloc_4k)
        data = region.swapped.pop(page)
        if data is not None:
            self.contents[pfn] = data
        region.frames[PG_LEVEL_4K][page] = pfn
        return pfn, PG_LEVEL_4K

    def put(self, pfn: int, level: int) -> None:
        """Drop one mapping of the host page at pfn; free it with the last one. The zero
        pages are never freed."""
        if is_zero_pfn(pfn):
            return
        sharers = self.ksm_pages.get(pfn)
        if sharers is not None:
            if sharers > 1:
                self.ksm_pages[pfn] = sharers - 1
                return
            del self.ksm_pages[pfn]
        for p in keys_in(self.contents, pfn, pfn + pages_per_level(level)):
            del self.contents[p]
        self.pfns.free(pfn, level)

    # -- the copy-on-write break of a KSM page or the zero page (a write fault) -------

    def is_ksm(self, region: HostRegion, hva: int) -> bool:
        """Does hva map a KSM page (shared, write-protected) in `region`?"""
        return region.frames[PG_LEVEL_4K].get(hva >> PAGE_SHIFT) in self.ksm_pages

    def is_cow(self, region: HostRegion, hva: int) -> bool:
        """Does hva map a page a write must copy first: a KSM page, or the zero page?"""
        found = region.mapped(hva)
        return found is not None and self.is_cow_pfn(found[0])

    def is_cow_pfn(self, pfn: int) -> bool:
        """Is pfn a page a write must copy first: a KSM page, or the zero page?"""
        return pfn in self.ksm_pages or is_zero_pfn(pfn)

    def cow_hvas(self, region: HostRegion, start: int, end: int) -> list[int]:
        """An hva in each page of [start, end) of `region` that a write must copy first
        (one for a huge zero page)."""
        hvas = [page << PAGE_SHIFT for page, pfn in
                ((page, region.frames[PG_LEVEL_4K][page]) for page in
                 keys_in(region.frames[PG_LEVEL_4K], start >> PAGE_SHIFT, end >> PAGE_SHIFT))
                if self.is_cow_pfn(pfn)]
        huge = region.frames[PG_LEVEL_2M]
        hvas += [max(start, frame << HPAGE_SHIFT) for frame in
                 keys_in(huge, start >> HPAGE_SHIFT, ((end - 1) >> HPAGE_SHIFT) + 1)
                 if huge[frame] == HUGE_ZERO_PFN]
        return hvas

    def ksm_hvas(self, region: HostRegion, start: int, end: int) -> list[int]:
        """The hvas of the pages in [start, end) of `region` that map a KSM page."""
        frames = region.frames[PG_LEVEL_4K]
        return [page << PAGE_SHIFT
                for page in keys_in(frames, start >> PAGE_SHIFT, end >> PAGE_SHIFT)
                if frames[page] in self.ksm_pages]

    async def unshare(self, region: HostRegion, hva: int) -> None:
        """Break copy-on-write of the KSM page or zero page at hva (if it still maps
        one), as a write fault does, under an invalidation of the page (of the whole 2M
        for the huge zero page)."""
        page = hva & PAGE_MASK
        await self.update(region, page, page + PAGE_SIZE,
                          lambda: self._break_cow(region, page >> PAGE_SHIFT))

    def _break_cow(self, region: HostRegion, page: int) -> None:
        """`wp_page_copy`: the page gets a private copy of the KSM page it mapped, or a
        zeroed page of its own for the zero page (a THP for the huge zero page, as
        `do_huge_zero_wp_pmd` allocates)."""
        found = region.mapped(page << PAGE_SHIFT)
        if found is not None and is_zero_pfn(found[0]):
            level = found[1]
            frame = page >> level_shift(level)
            region.frames[level][frame] = self.pfns.alloc(level)
            return
        frames = region.frames[PG_LEVEL_4K]
        kpfn = frames.get(page)
        if kpfn not in self.ksm_pages:
            return                                      # another writer broke it first
        pfn = self.pfns.alloc(PG_LEVEL_4K)
        if kpfn in self.contents:
            self.contents[pfn] = bytearray(self.contents[kpfn])
        frames[page] = pfn
        self.put(kpfn, PG_LEVEL_4K)

    # -- contents --------------------------------------------------------------------

    async def read(self, hva: int, length: int) -> bytes:
        """Read as the VMM would (populates, as touching the memory does). A long read
        lets other tasks run when its timeslice is used up, then checks the rest of the
        range again: a part unmapped meanwhile is EFAULT, as it is for the VMM."""
        self._check_access(hva, length, write=False)
        self.check_populate(hva, hva + length, write=False)
        timeslice = Timeslice(self.sched)
        end = hva + length
        out = bytearray()
        for chunk_hva, chunk_len in _page_chunks(hva, length):
            if timeslice.need_resched():
                await timeslice.cond_resched()
                self._check_access(chunk_hva, end - chunk_hva, write=False)
            region = self.find(chunk_hva)
            pfn, _, _ = self._get_page(region, chunk_hva, False, region.mapped(chunk_hva))
            out += self.read_pfn(pfn, chunk_hva & (PAGE_SIZE - 1), chunk_len)
        return bytes(out)

    async def write(self, hva: int, data: bytes) -> None:
        """Write as the VMM would. Nothing is written on error.

        KSM pages in the range break copy-on-write first (invalidations, which may let
        other tasks run); the write itself then happens without an `await`, a window of
        WRITE_WINDOW bytes at a time: between two, a long write lets other tasks run when
        its timeslice is used up, and the next window is checked (and unshared) again, so
        a part unmapped or made read-only meanwhile ends the write there with EFAULT, as
        it does for the VMM.
        """
        self._check_access(hva, len(data), write=True)
        self.check_populate(hva, hva + len(data), write=True)
        timeslice = Timeslice(self.sched)
        for done in range(0, max(len(data), 1), WRITE_WINDOW):
            if done:
                await timeslice.cond_resched()
            window = data[done:done + WRITE_WINDOW]
            start = hva + done
            chunks = list(_page_chunks(start, len(window)))
            while True:
                self._check_access(start, len(window), write=True)
                shared = [h for h, _ in chunks if self.is_cow(self.find(h), h)]
                if not shared:
                    break
                for chunk_hva in shared:
                    await self.unshare(self.find(chunk_hva), chunk_hva)
            offset = 0
            for chunk_hva, n in chunks:
                region = self.find(chunk_hva)
                pfn = self._get_page(region, chunk_hva, True, region.mapped(chunk_hva))[0]
                self.write_pfn(pfn, chunk_hva & (PAGE_SIZE - 1), window[offset:offset + n])
                offset += n

    def spans(self, start: int, end: int, unmapped_errno: int
              ) -> Iterator[tuple[HostRegion, int, int]]:
        """(region, hva, stop) of each region's part of [start, end), in order; an hva that
        no region maps, when the walk reaches it, raises KvmError(unmapped_errno)."""
        hva = start
        while hva < end:
            region = self.find(hva)
            if region is None:
                raise KvmError(unmapped_errno, f"hva {hva:#x} is not mapped")
            stop = min(end, region.end)
            yield region, hva, stop
            hva = stop

    def _check_access(self, hva: int, length: int, write: bool) -> None:
        """Fail before touching anything if any byte of the range would fault."""
        if length < 0:
            raise einval(f"negative length {length}")
        need = PROT_WRITE if write else PROT_READ
        for region, start, stop in self.spans(hva, hva + length, errno.EFAULT):
            if not region.allows(start, stop, need):
                raise KvmError(errno.EFAULT, f"[{start:#x}, {stop:#x}) is not all mapped "
                               + ("writable" if write else "readable"))

    def check_populate(self, start: int, end: int, write: bool) -> None:
        """Raise LimitExceeded if touching the mapped pages of [start, end) could pass a
        memory limit: a page not present costs its frame whole, as a fault takes it (a
        read maps the zero page instead, but of a 1G hugetlb region, and a swapped-out
        page comes back as 4K); for a write, a page mapping the zero page or a KSM page
        costs the copy its copy-on-write break allocates."""
        charge = self.pfns.charge
        if charge is None or start >= end:
            return
        need, hva = 0, start & PAGE_MASK
        while hva < end:
            region = self.find(hva)
            if region is None:
                hva += PAGE_SIZE
                continue
            if region.page_level == PG_LEVEL_4K:
                # Every frame is a 4K page: counted over what is present, not page by page
                # (1 GiB is 262,144 pages, a second of this loop without a yield).
                stop = min(region.end, (end + PAGE_SIZE - 1) & PAGE_MASK)
                need += self._populate_need_4k(region, hva, stop, write)
                hva = stop
                continue
            cost, hva = self._populate_need_at(region, hva, write)
            need += cost
        charge.check(need)

    def _populate_need_at(self, region: HostRegion, hva: int, write: bool) -> tuple[int, int]:
        """What touching the page at hva of `region` may allocate (`check_populate`), and
        the next hva to ask about: past the whole frame when it costs one."""
        found = region.mapped(hva)
        if found is not None:
            if write and self.is_cow_pfn(found[0]):
                frame = PAGE_SIZE << level_shift(found[1]) if is_zero_pfn(found[0]) \
                    else PAGE_SIZE
                return frame, (hva & ~(frame - 1)) + frame
            return 0, hva + PAGE_SIZE
        if hva >> PAGE_SHIFT in region.swapped:
            return PAGE_SIZE, hva + PAGE_SIZE
        if not write and region.backing is not Backing.HUGETLB_1G:
            return 0, hva + PAGE_SIZE
        frame = PAGE_SIZE << level_shift(region.frame_level(hva))
        return frame, (hva & ~(frame - 1)) + frame

    def _populate_need_4k(self, region: HostRegion, start: int, stop: int,
                          write: bool) -> int:
        """`_populate_need_at` summed over the pages of [start, stop) of a region of 4K
        frames, from the pages present and swapped out: a write costs a page for every
        page but those present and not copy-on-write, a read one for every page swapped
        out."""
        first, last = start >> PAGE_SHIFT, stop >> PAGE_SHIFT
        if not write:
            return len(keys_in(region.swapped, first, last)) * PAGE_SIZE
        frames, is_cow_pfn = region.frames[PG_LEVEL_4K], self.is_cow_pfn
        owned = sum(1 for page in keys_in(frames, first, last)
                    if not is_cow_pfn(frames[page]))
        return (last - first - owned) * PAGE_SIZE

    def read_pfn(self, pfn: int, offset: int, length: int) -> bytes:
        page = self.contents.get(pfn)
        if page is None:
            return bytes(length)
        return bytes(page[offset:offset + length])

    def write_byte(self, pfn: int, offset: int, value: int) -> None:
        """`write_pfn` of the one byte `value`: a guest's byte store, without slices."""
        page = self.contents.get(pfn)
        if page is None:
            if is_zero_pfn(pfn):
                raise VmBugged(f"write to the zero page (pfn {pfn:#x})")
            if not value:
                return
            page = self.contents[pfn] = bytearray(PAGE_SIZE)
        page[offset] = value

    def write_pfn(self, pfn: int, offset: int, data: bytes) -> None:
        page = self.contents.get(pfn)
        if page is None:
            if is_zero_pfn(pfn):
                raise VmBugged(f"write to the zero page (pfn {pfn:#x})")
            if not any(data):
                return
            page = self.contents[pfn] = bytearray(PAGE_SIZE)
        page[offset:offset + len(data)] = data


WRITE_WINDOW = 1 << 20      # bytes a write moves between two need_resched checks


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


def _page_chunks(hva: int, length: int):
    end = hva + length
    while hva < end:
        n = min(end, (hva | (PAGE_SIZE - 1)) + 1) - hva
        yield hva, n
        hva += n
