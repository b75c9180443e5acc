"""One region of the VMM's address space (a VMA) and the state of every page in it.

A page of a region is in one of three states: not populated (reads as zero on first
touch), mapped by a host page (4K, or part of a 2M THP or a 1G hugetlb page; for private
anonymous memory that has only been read, the shared zero page or the huge zero page,
read-only: a write breaks copy-on-write), or swapped out (its contents wait in `swapped` for the next touch). Besides, each page has a
protection (PROT_NONE, PROT_READ or PROT_READ | PROT_WRITE), kept as a step function over
the region so that mprotect of any part of it costs a few steps, not a flag per page. A
PROT_NONE page keeps its host page (the kernel keeps it behind a PROT_NONE PTE), but no
access may be made through it.

Invariants: a page is mapped at one level at most, and never both mapped and swapped; a
2M frame of a THP region that holds 4K mappings is in `split_2m` (mapped through a table of
4K entries, after split_huge_pmd, a partial zap, a swap-out or a 4K fault) and is never
mapped huge again until it is collapsed; a huge page never straddles two protections.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .types import (PAGE_SHIFT, PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K, Backing,
                    level_shift, pages_per_level)

__all__ = ["HostRegion", "HostRegionInfo", "HPAGE_SHIFT", "HPAGE_SIZE", "keys_in",
           "PROT_NONE", "PROT_READ", "PROT_WRITE", "PROT_EXEC", "PROT_RW",
           "ZERO_PFN", "HUGE_ZERO_PFN", "is_zero_pfn"]

HPAGE_SHIFT = PAGE_SHIFT + level_shift(PG_LEVEL_2M)    # a THP: 2M
HPAGE_SIZE = 1 << HPAGE_SHIFT
_HUGE_LEVELS = (PG_LEVEL_1G, PG_LEVEL_2M)
PROT_NONE, PROT_READ, PROT_WRITE, PROT_EXEC = 0, 1, 2, 4     # mprotect(2)'s bits
PROT_RW = PROT_READ | PROT_WRITE
# The shared zero page and the huge zero page (2M, naturally aligned): what a read of
# private anonymous memory never touched maps, read-only, in every region. Below the
# frames of page tables and of the host: they are never allocated or freed.
HUGE_ZERO_PFN = 0x200
ZERO_PFN = HUGE_ZERO_PFN + pages_per_level(PG_LEVEL_2M)      # 0x400, right after it
# Every zero pfn in one range, whose membership test runs in C: faults, first writes and
# the accounting of a whole region ask it.
_ZERO_PFNS = range(HUGE_ZERO_PFN, ZERO_PFN + 1)


def is_zero_pfn(pfn: int) -> bool:
    """Is pfn the zero page or a 4K page of the huge zero page?"""
    return pfn in _ZERO_PFNS


@dataclass(frozen=True)
class HostRegionInfo:
    hva: int
    size: int
    backing: Backing
    writable: bool               # every page of the region is mapped with PROT_WRITE
    populated_4k_pages: int      # 4K pages with a frame of their own (zero page excluded)
    zero_pages: int = 0          # 4K pages mapping the zero page (or the huge zero page)


class HostRegion:
    """One VMA. `frames[level]` maps an hva frame number at that level to its base pfn;
    `swapped` maps a 4K page number (hva >> 12) to the contents it had when it left."""

    __slots__ = ("hva", "size", "end", "backing", "page_level", "frames", "split_2m",
                 "swapped", "_prot_at", "_prot", "_prot_uniform")

    def __init__(self, hva: int, size: int, backing: Backing, writable: bool) -> None:
        self.hva, self.size, self.end = hva, size, hva + size
        self.backing = backing
        self.page_level = backing.page_level      # the largest host page it may use
        self.frames: dict[int, dict[int, int]] = {PG_LEVEL_4K: {}, PG_LEVEL_2M: {},
                                                   PG_LEVEL_1G: {}}
        self.split_2m: set[int] = set()
        self.swapped: dict[int, bytearray | None] = {}
        self._set_steps([(hva, PROT_RW if writable else PROT_READ)])

    @property
    def writable(self) -> bool:
        return all(prot & PROT_WRITE for prot in self._prot)

    def info(self) -> HostRegionInfo:
        """Counted in bulk: a region of 1 GiB has 262,144 frames of 4K, and a call per
        frame held the event loop for 30-80 ms. No frame holds a pfn below the zero
        pages', so a frame maps a zero page iff its pfn is at most ZERO_PFN."""
        populated = zero = 0
        for level, frames in self.frames.items():
            pages = pages_per_level(level)
            pfns = np.fromiter(frames.values(), dtype=np.int64, count=len(frames))
            zeros = int(np.count_nonzero(pfns <= ZERO_PFN))
            zero += zeros * pages
            populated += (len(frames) - zeros) * pages
        return HostRegionInfo(self.hva, self.size, self.backing, self.writable, populated,
                              zero)

    # -- host pages ------------------------------------------------------------------

    def mapped(self, hva: int) -> tuple[int, int] | None:
        """(pfn of the 4K page at hva, host mapping level), or None if not mapped."""
        frames = self.frames
        pfn = frames[PG_LEVEL_4K].get(hva >> PAGE_SHIFT)     # the most common, and the
        if pfn is not None:                                  # cheapest to answer
            return pfn, PG_LEVEL_4K
        for level, shift, mask in _HUGE_MAPPED:
            base = frames[level].get(hva >> shift)
            if base is not None:
                return base + ((hva >> PAGE_SHIFT) & mask), level
        return None

    def huge_page(self, hva: int) -> tuple[int, int] | None:
        """(first hva, size) of the 2M or 1G host page that maps hva, if one does."""
        for level in _HUGE_LEVELS:
            shift = PAGE_SHIFT + level_shift(level)
            if hva >> shift in self.frames[level]:
                return (hva >> shift) << shift, 1 << shift
        return None

    def huge_frame(self, hva: int) -> tuple[int, int] | None:
        """(first hva, size) of the huge page that maps hva, or of the unsplit frame where a
        fault may populate one (a protection change may make the frame uniform)."""
        return self.huge_page(hva) or next(self._unsplit_frames(hva), None)

    def hull(self, start: int, end: int) -> tuple[int, int]:
        """[start, end) widened to whole huge pages at its edges, mapped or about to be:
        a fault may populate a THP while an invalidation of part of it runs."""
        first, last = self.huge_frame(start), self.huge_frame(end - 1)
        return (first[0] if first else start, last[0] + last[1] if last else end)

    def covers_huge_in_part(self, start: int, end: int) -> bool:
        """Does [start, end) cover a mapped huge page in part (which a change must split)?"""
        return any(page is not None and (page[0] < start or page[0] + page[1] > end)
                   for page in (self.huge_page(start), self.huge_page(end - 1)))

    def frame_level(self, hva: int) -> int:
        """The largest page a fault at hva may populate: a whole aligned frame inside the
        region, not split, under one protection."""
        if self.page_level == PG_LEVEL_4K:
            return PG_LEVEL_4K              # a 4K backing: no huge frame (every fault of it)
        for start, size in self._unsplit_frames(hva):
            if self.uniform(start, start + size):
                return PG_LEVEL_2M if size == HPAGE_SIZE else PG_LEVEL_1G
        return PG_LEVEL_4K

    def _unsplit_frames(self, hva: int) -> Iterator[tuple[int, int]]:
        """(first hva, size) of each huge frame the backing allows at hva, largest first,
        that lies wholly inside the region and is not split."""
        for level in _HUGE_LEVELS:
            if self.page_level < level:
                continue
            shift = PAGE_SHIFT + level_shift(level)
            start = (hva >> shift) << shift
            if start >= self.hva and start + (1 << shift) <= self.end and \
                    not (level == PG_LEVEL_2M and hva >> shift in self.split_2m):
                yield start, 1 << shift

    def split_huge(self, frame: int) -> None:
        """`split_huge_pmd`: the 2M page `frame` becomes 512 4K mappings of the same pfns."""
        base = self.frames[PG_LEVEL_2M].pop(frame)
        first = frame << (HPAGE_SHIFT - PAGE_SHIFT)
        small = self.frames[PG_LEVEL_4K]
        for i in range(pages_per_level(PG_LEVEL_2M)):
            small[first + i] = base + i
        self.split_2m.add(frame)

    def split_partial(self, start: int, end: int) -> None:
        """Split the 2M pages that [start, end) covers only in part (at most one per edge)."""
        for hva in (start, end - 1):
            frame = hva >> HPAGE_SHIFT
            whole = start <= frame << HPAGE_SHIFT and (frame + 1) << HPAGE_SHIFT <= end
            if frame in self.frames[PG_LEVEL_2M] and not whole:
                self.split_huge(frame)

    # -- protection: a step function over [hva, end) --------------------------------

    def protections(self, start: int, end: int) -> list[int]:
        """The protection of each step that overlaps [start, end), in order."""
        first = bisect.bisect_right(self._prot_at, start) - 1
        last = bisect.bisect_left(self._prot_at, end)
        return self._prot[first:last]

    def allows(self, start: int, end: int, prot: int) -> bool:
        """Does every page of [start, end) allow the accesses of `prot`?"""
        return all(p & prot == prot for p in self.protections(start, end))

    def prot_at(self, hva: int) -> int:
        prot = self._prot_uniform
        if prot is None:
            prot = self._prot[bisect.bisect_right(self._prot_at, hva) - 1]
        return prot

    def writable_at(self, hva: int) -> bool:
        return bool(self.prot_at(hva) & PROT_WRITE)

    def uniform(self, start: int, end: int) -> bool:
        return len(self.protections(start, end)) == 1

    def protect(self, start: int, end: int, prot: int) -> None:
        """Set the protection of [start, end); neighbouring equal steps merge."""
        steps = list(zip(self._prot_at, self._prot))
        first = bisect.bisect_left(self._prot_at, start)
        last = bisect.bisect_right(self._prot_at, end)
        middle = [(start, prot)]
        if end < self.end:
            middle.append((end, self.prot_at(end)))
        merged: list[tuple[int, int]] = []
        for at, w in steps[:first] + middle + steps[last:]:
            if not merged or merged[-1][1] != w:
                merged.append((at, w))
        self._set_steps(merged)

    def _set_steps(self, steps: list[tuple[int, int]]) -> None:
        """(start, prot) of each protection step, ascending, the first at `hva`."""
        self._prot_at = [at for at, _ in steps]
        self._prot = [prot for _, prot in steps]
        # The protection of the whole region when it has one: every fault asks
        # `prot_at`, and most regions are never mprotected in part.
        self._prot_uniform = steps[0][1] if len(steps) == 1 else None


def keys_in(table: dict[int, object], lo: int, hi: int) -> list[int]:
    """The keys of `table` in [lo, hi), ascending, scanning whichever is shorter."""
    if hi - lo <= len(table):
        return [k for k in range(lo, hi) if k in table]
    return sorted(k for k in table if lo <= k < hi)


# (level, hva shift of its frames, mask of the 4K page within a frame) of the huge levels:
# a page is mapped at one level only, so `mapped` may ask them in any order.
_HUGE_MAPPED = tuple((level, PAGE_SHIFT + level_shift(level), pages_per_level(level) - 1)
                     for level in _HUGE_LEVELS)
