"""The simulated VMM process address space: the primary MMU that KVM's mappings shadow.

A region of hva is created and destroyed like mmap/munmap and backed by 4K pages, THP (2M
host mappings wherever a whole aligned 2M frame fits in the region) or hugetlb 1G pages.
Host pages are populated on first touch; their contents live in a sparse dict keyed by 4K
pfn and untouched memory reads as zero.

Invariant: while an hva maps a pfn, every secondary MMU that registered an `MmuNotifier`
may cache that translation; anything that takes a translation away first calls
`invalidate_range_start` on every notifier and `invalidate_range_end` after the change.
"""

from __future__ import annotations

import bisect
import errno
from dataclasses import dataclass
from typing import Protocol

from .errors import KvmError, NoSuchObject, einval
from .types import (PAGE_SHIFT, PAGE_SIZE, PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K,
                    Backing, level_shift, pages_per_level)

__all__ = ["HostMm", "HostRegion", "HostRegionInfo", "MmuNotifier", "HVA_BASE"]

HVA_BASE = 0x7F00_0000_0000      # where mmap() without a hint starts placing regions
HVA_LIMIT = 1 << 47              # user address space of a 4-level host
FIRST_PFN = 0x100000             # host frames start at 4 GiB


class MmuNotifier(Protocol):
    async def invalidate_range_start(self, start: int, end: int) -> None: ...
    async def invalidate_range_end(self, start: int, end: int) -> None: ...


@dataclass(frozen=True)
class HostRegionInfo:
    hva: int
    size: int
    backing: Backing
    writable: bool
    populated_4k_pages: int


class HostRegion:
    """One VMA. `frames[level]` maps an hva frame number at that level to its base pfn."""

    __slots__ = ("hva", "size", "end", "backing", "writable", "frames")

    def __init__(self, hva: int, size: int, backing: Backing, writable: bool) -> None:
        self.hva, self.size, self.end = hva, size, hva + size
        self.backing, self.writable = backing, writable
        self.frames: dict[int, dict[int, int]] = {PG_LEVEL_4K: {}, PG_LEVEL_2M: {},
                                                   PG_LEVEL_1G: {}}

    def info(self) -> HostRegionInfo:
        populated = sum(len(f) * pages_per_level(level) for level, f in self.frames.items())
        return HostRegionInfo(self.hva, self.size, self.backing, self.writable, populated)

    def mapped(self, hva: int) -> tuple[int, int] | None:
        """(pfn of the 4K page at hva, host mapping level), or None if not populated."""
        for level in (PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K):
            shift = PAGE_SHIFT + level_shift(level)
            base = self.frames[level].get(hva >> shift)
            if base is not None:
                return base + ((hva >> PAGE_SHIFT) & (pages_per_level(level) - 1)), level
        return None

    def frame_level(self, hva: int) -> int:
        """The largest page the backing can use at hva: a whole aligned frame in the region."""
        for level in (PG_LEVEL_1G, PG_LEVEL_2M):
            if self.backing.page_level >= level:
                size = PAGE_SIZE << level_shift(level)
                start = hva & ~(size - 1)
                if start >= self.hva and start + size <= self.end:
                    return level
        return PG_LEVEL_4K


class PfnAllocator:
    """Host physical frames, naturally aligned per size, recycled through free lists."""

    def __init__(self, first: int = FIRST_PFN) -> None:
        self._next = first
        self._free: dict[int, list[int]] = {PG_LEVEL_4K: [], PG_LEVEL_2M: [], PG_LEVEL_1G: []}
        self.allocated_4k = 0

    def alloc(self, level: int) -> int:
        count = pages_per_level(level)
        self.allocated_4k += count
        if self._free[level]:
            return self._free[level].pop()
        pfn = (self._next + count - 1) & ~(count - 1)
        self._next = pfn + count
        return pfn

    def free(self, pfn: int, level: int) -> None:
        self.allocated_4k -= pages_per_level(level)
        self._free[level].append(pfn)


class HostMm:
    """The VMM's mm: regions, their host pages and the page contents."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._regions: list[HostRegion] = []
        self._next_hva = HVA_BASE
        self.pfns = PfnAllocator()
        self.contents: dict[int, bytearray] = {}
        self.notifiers: list[MmuNotifier] = []
        self.sched = None               # the owning VM's preemption points, if any

    # -- regions ---------------------------------------------------------------------

    def mmap(self, size: int, backing: Backing, *, writable: bool = True,
             hva: int | None = None) -> HostRegion:
        align = PAGE_SIZE << level_shift(backing.page_level) if backing is Backing.HUGETLB_1G \
            else PAGE_SIZE
        if size <= 0 or size % align:
            raise einval(f"size {size:#x} is not a positive multiple of {align:#x}")
        if hva is None:
            hva = self._place(size, max(align, PAGE_SIZE << level_shift(PG_LEVEL_2M)))
        elif hva % align:
            raise einval(f"hva {hva:#x} is not aligned to {align:#x}")
        if hva < PAGE_SIZE or hva + size > HVA_LIMIT:
            raise KvmError(errno.ENOMEM, f"[{hva:#x}, {hva + size:#x}) is outside the user "
                           "address space")
        i = bisect.bisect_right(self._starts, hva)
        if (i and self._regions[i - 1].end > hva) or \
                (i < len(self._starts) and self._starts[i] < hva + size):
            raise KvmError(errno.EEXIST, f"[{hva:#x}, {hva + size:#x}) overlaps a region")
        region = HostRegion(hva, size, backing, writable)
        self._starts.insert(i, hva)
        self._regions.insert(i, region)
        return region

    def _place(self, size: int, align: int) -> int:
        hva = (self._next_hva + align - 1) & ~(align - 1)
        while self._overlaps(hva, size):
            hva += align
        self._next_hva = hva + size + (PAGE_SIZE << level_shift(PG_LEVEL_2M))   # leave a gap
        return hva

    def _overlaps(self, hva: int, size: int) -> bool:
        return any(r.hva < hva + size and hva < r.end for r in self._regions)

    async def munmap(self, hva: int, size: int) -> None:
        """Unmap a whole region: notifiers first, then the host pages are freed."""
        region = self.region_exact(hva, size)
        await self.invalidate(hva, hva + size, lambda: self._drop_region(region))

    def _drop_region(self, region: HostRegion) -> None:
        i = self._regions.index(region)
        del self._regions[i], self._starts[i]
        for level, frames in region.frames.items():
            for base in frames.values():
                self._free_frame(base, level)
            frames.clear()

    async def invalidate(self, start: int, end: int, change) -> None:
        """Run `change()` (synchronous) between invalidate_range_start and _end."""
        for n in self.notifiers:
            await n.invalidate_range_start(start, end)
        try:
            if self.sched is not None:
                await self.sched.point("mm.invalidate_window")
            change()
        finally:
            for n in self.notifiers:
                await n.invalidate_range_end(start, end)

    def region_exact(self, hva: int, size: int) -> HostRegion:
        region = self.find(hva)
        if region is None or region.hva != hva or region.size != size:
            raise NoSuchObject(f"no host region is mapped at exactly [{hva:#x}, "
                               f"{hva + size:#x})")
        return region

    def find(self, hva: int) -> HostRegion | None:
        i = bisect.bisect_right(self._starts, hva) - 1
        if i >= 0 and self._regions[i].end > hva:
            return self._regions[i]
        return None

    def regions(self) -> list[HostRegion]:
        return list(self._regions)

    # -- translation (what GUP does for KVM) -----------------------------------------

    def hva_to_pfn(self, hva: int, write: bool) -> tuple[int, bool, int]:
        """Fault in the page at hva: (pfn, writable, host mapping level).

        Raises EFAULT when nothing is mapped there, or for a write to a read-only mapping.
        A read gets a writable pfn when the mapping allows writes (KVM asks for one
        opportunistically).
        """
        region = self.find(hva)
        if region is None:
            raise KvmError(errno.EFAULT, f"hva {hva:#x} is not mapped")
        if write and not region.writable:
            raise KvmError(errno.EFAULT, f"write to read-only hva {hva:#x}")
        found = region.mapped(hva)
        if found is None:
            found = self._populate(region, hva)
        pfn, level = found
        return pfn, region.writable, level

    def current_pfn(self, hva: int) -> int | None:
        """The pfn the host maps at hva now, without faulting anything in."""
        region = self.find(hva)
        found = region.mapped(hva) if region else None
        return found[0] if found else None

    def host_mapping_level(self, hva: int) -> int:
        region = self.find(hva)
        found = region.mapped(hva) if region else None
        return found[1] if found else PG_LEVEL_4K

    def _populate(self, region: HostRegion, hva: int) -> tuple[int, int]:
        level = region.frame_level(hva)
        base = self.pfns.alloc(level)
        region.frames[level][hva >> (PAGE_SHIFT + level_shift(level))] = base
        return base + ((hva >> PAGE_SHIFT) & (pages_per_level(level) - 1)), level

    def _free_frame(self, base: int, level: int) -> None:
        for pfn in range(base, base + pages_per_level(level)):
            self.contents.pop(pfn, None)
        self.pfns.free(base, level)

    # -- contents --------------------------------------------------------------------

    def read(self, hva: int, length: int) -> bytes:
        """Read as the VMM would (populates, as touching the memory does)."""
        self._check_access(hva, length, write=False)
        out = bytearray()
        for chunk_hva, chunk_len in _page_chunks(hva, length):
            pfn, _, _ = self.hva_to_pfn(chunk_hva, write=False)
            out += self.read_pfn(pfn, chunk_hva & (PAGE_SIZE - 1), chunk_len)
        return bytes(out)

    def write(self, hva: int, data: bytes) -> list[int]:
        """Write as the VMM would; returns the pfns written. Nothing is written on error."""
        self._check_access(hva, len(data), write=True)
        chunks = [(h, n, self.hva_to_pfn(h, write=True)[0])
                  for h, n in _page_chunks(hva, len(data))]
        done = 0
        for chunk_hva, n, pfn in chunks:
            self.write_pfn(pfn, chunk_hva & (PAGE_SIZE - 1), data[done:done + n])
            done += n
        return [pfn for _, _, pfn in chunks]

    def _check_access(self, hva: int, length: int, write: bool) -> None:
        """Fail before touching anything if any byte of the range would fault."""
        if length < 0:
            raise einval(f"negative length {length}")
        end = hva + length
        while hva < end:
            region = self.find(hva)
            if region is None:
                raise KvmError(errno.EFAULT, f"hva {hva:#x} is not mapped")
            if write and not region.writable:
                raise KvmError(errno.EFAULT, f"hva {hva:#x} is mapped read-only")
            hva = region.end

    def read_pfn(self, pfn: int, offset: int, length: int) -> bytes:
        page = self.contents.get(pfn)
        if page is None:
            return bytes(length)
        return bytes(page[offset:offset + length])

    def write_pfn(self, pfn: int, offset: int, data: bytes) -> None:
        page = self.contents.get(pfn)
        if page is None:
            if not any(data):
                return
            page = self.contents[pfn] = bytearray(PAGE_SIZE)
        page[offset:offset + len(data)] = data


def _page_chunks(hva: int, length: int):
    end = hva + length
    while hva < end:
        n = min(end, (hva | (PAGE_SIZE - 1)) + 1) - hva
        yield hva, n
        hva += n
