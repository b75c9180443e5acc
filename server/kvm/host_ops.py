"""The host mm taking mappings away: what reclaim, NUMA balancing, khugepaged, ksmd and
the VMM's own madvise/mprotect do to the memory behind a VM (and, the other way,
MADV_POPULATE_WRITE faulting a range in up front).

    madvise_dontneed        the pages go; the next touch populates zeroed ones
    madvise_populate_write  every page is faulted in writable, its memory allocated
    migrate                 each page moves to a new pfn, contents kept
    swap_out                each page's contents go to swap; the next touch swaps it in anew
    mprotect                PROT_NONE, PROT_READ or PROT_READ|PROT_WRITE for part of a region
    ksm_merge               pages with equal contents share one write-protected KSM page
    thp_split               a THP becomes 512 4K mappings of the same pfns (split_huge_pmd)
    thp_collapse            a 2M frame of 4K pages becomes one new THP (khugepaged)

Invariant: every change to a mapping happens inside `HostMm.update`, i.e. between
invalidate_range_start and _end of a range that covers every host page it changes (a THP
that a range covers in part is split first, inside the same invalidation, as the kernel's
split_huge_pmd does). Checks that decide an error run before the invalidation, so a
rejected request changes nothing; checks of state that another task may change while the
notifiers run are made again inside the change, which is synchronous. A range is page
aligned, non-empty and inside one region (EINVAL otherwise). Populating is a fault, not
a change: a page that was not present takes no translation away and needs no
invalidation (a KSM page's copy-on-write break does, through `HostMm.unshare`); its range
may span adjacent regions, as madvise(2) may span VMAs.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from functools import partial

from .errors import KvmError, einval
from .host_mm import GIB, HostMm
from .host_region import (HPAGE_SHIFT, HPAGE_SIZE, PROT_EXEC, PROT_NONE, PROT_READ,
                          PROT_RW, PROT_WRITE, HostRegion, is_zero_pfn, keys_in)
from .resched import Timeslice
from .types import (PAGE_SHIFT, PAGE_SIZE, PG_LEVEL_2M, PG_LEVEL_4K, Backing, level_shift,
                    pages_per_level)

__all__ = ["madvise_dontneed", "madvise_populate_write", "migrate", "swap_out", "mprotect",
           "ksm_merge", "thp_split", "thp_collapse"]


def _range(mm: HostMm, hva: int, size: int, *, huge_aligned: bool = False) -> HostRegion:
    """The region holding [hva, hva + size); with `huge_aligned`, a hugetlb range must be
    whole 1G pages (as the kernel wants for MADV_DONTNEED and mprotect)."""
    if size <= 0 or (hva | size) & (PAGE_SIZE - 1):
        raise einval(f"[{hva:#x}, +{size:#x}) is not a non-empty page-aligned range")
    region = mm.find(hva)
    if region is None or hva + size > region.end:
        raise einval(f"[{hva:#x}, {hva + size:#x}) is not inside one host region")
    if huge_aligned and region.backing is Backing.HUGETLB_1G and (hva | size) & (GIB - 1):
        raise einval(f"[{hva:#x}, {hva + size:#x}) is not whole 1G hugetlb pages")
    return region


# -- madvise(MADV_DONTNEED) -------------------------------------------------------------

async def madvise_dontneed(mm: HostMm, hva: int, size: int) -> None:
    """Drop the pages of [hva, hva + size), swapped ones included: a frame at a time, as
    a migration (`_update_in_parts`)."""
    region = _range(mm, hva, size, huge_aligned=True)
    await _update_in_parts(mm, region, hva, hva + size, _zap)


def _zap(mm: HostMm, region: HostRegion, start: int, end: int) -> int:
    """Drop [start, end) of `region`; returns the frames dropped."""
    region.split_partial(start, end)
    dropped = 0
    for level, frames in region.frames.items():
        shift = PAGE_SHIFT + level_shift(level)
        for frame in keys_in(frames, start >> shift, end >> shift):
            mm.put(frames.pop(frame), level)
            dropped += 1
    for page in keys_in(region.swapped, start >> PAGE_SHIFT, end >> PAGE_SHIFT):
        del region.swapped[page]
    return dropped


# -- madvise(MADV_POPULATE_WRITE) -------------------------------------------------------

async def madvise_populate_write(mm: HostMm, hva: int, size: int) -> int:
    """Fault in every page of [hva, hva + size) writable, as a write touch does: a page
    not present is populated (a THP or hugetlb frame whole, as a fault would), a swapped
    one is swapped in at a new pfn with its contents, a KSM page breaks copy-on-write
    (an invalidation of that page). Then every 4K pfn in the range that has no contents
    gets a zeroed page, so that no later write into the range allocates. The range may
    span adjacent regions. EINVAL if it is not page aligned or empty, ENOMEM if a part
    is not mapped, EINVAL if a part is not writable; the whole range is checked before
    anything changes. A long population lets other tasks run when its timeslice is used
    up, as the kernel's reschedules: the rest of the range is then checked again, so one
    that another task unmapped meanwhile fails part-way, as it may in the kernel. The
    pages that must break copy-on-write break it before any page is populated; one that
    becomes so while the population yields breaks it when the population reaches it.
    Returns
    the 4K pages populated or swapped in (a huge page that this populated counts whole,
    as in `migrate`)."""
    timeslice = Timeslice(mm.sched)
    end = hva + size
    populated = 0
    _populate_range(mm, hva, size)
    mm.check_populate(hva, end, write=True)       # once, before anything changes
    # Every page that must break copy-on-write breaks it first (each break is an
    # invalidation, which may sleep): a range changed meanwhile fails with nothing
    # populated.
    while True:
        chunks = _populate_range(mm, hva, size)
        shared = [(region, page_hva) for region, start, stop in chunks
                  for page_hva in mm.cow_hvas(region, start, stop)]
        if not shared:
            break
        try:
            for region, page_hva in shared:
                await mm.unshare(region, page_hva)
        except KvmError as error:
            if error.errno != errno.EFAULT:
                raise
            # A region was unmapped meanwhile (EFAULT): the range is checked again.
    while True:
        # Synchronous until the slice is used up: nothing can change the range under it.
        for region, start, stop in chunks:
            new, hva = _populate_write(mm, region, start, stop, timeslice)
            populated += new
            if hva < stop:
                break
        if hva == end:
            return populated
        if mm.is_cow(region, hva):
            # It became copy-on-write while this yielded (a KSM merge, a read mapping the
            # zero page): it breaks as it comes, the rest of the range is not looked
            # over again.
            try:
                await mm.unshare(region, hva)
            except KvmError as error:
                if error.errno != errno.EFAULT:
                    raise
        else:
            await timeslice.cond_resched()
        chunks = _populate_range(mm, hva, end - hva)


def _populate_range(mm: HostMm, hva: int, size: int) -> list[tuple[HostRegion, int, int]]:
    """(region, start, end) of each region's part of [hva, hva + size), in order."""
    if size <= 0 or (hva | size) & (PAGE_SIZE - 1):
        raise einval(f"[{hva:#x}, +{size:#x}) is not a non-empty page-aligned range")
    chunks = []
    for region, start, stop in mm.spans(hva, hva + size, errno.ENOMEM):
        if not region.allows(start, stop, PROT_WRITE):
            raise einval(f"[{start:#x}, {stop:#x}) is not all mapped writable")
        chunks.append((region, start, stop))
    return chunks


POPULATE_STEP = 64 * PAGE_SIZE      # the most populated between two need_resched checks


def _populate_write(mm: HostMm, region: HostRegion, start: int, end: int,
                    timeslice: Timeslice) -> tuple[int, int]:
    """Populate [start, end) until done, the timeslice is used up, or a page must break
    copy-on-write first (a KSM page, the zero page): (the 4K pages populated, the hva it
    stopped at)."""
    new = 0
    contents = mm.contents
    hva = start
    while hva < end:
        touched = mm.fault_in(region, hva, write=True)
        if touched is None:
            break                   # copy-on-write: the caller breaks it, and may sleep
        pfn, level, populated = touched
        new += populated
        host_page_end = (hva | ((PAGE_SIZE << level_shift(level)) - 1)) + 1
        stop = min(end, host_page_end, hva + POPULATE_STEP)
        for p in range(pfn, pfn + ((stop - hva) >> PAGE_SHIFT)):
            if p not in contents:
                contents[p] = bytearray(PAGE_SIZE)
        hva = stop
        if timeslice.need_resched():
            break
    return new, hva


# -- migration, swap-out, mprotect ------------------------------------------------------

async def _update_in_parts(mm: HostMm, region: HostRegion, start: int, end: int,
                           apply: Callable[[HostMm, HostRegion, int, int], int]) -> int:
    """`apply(mm, region, lo, hi)` over [start, end) of `region` a part at a time, each
    part a frame (2M, or a 1G hugetlb page) under its own invalidation, as the kernel
    migrates and pages out a folio at a time (MADV_DONTNEED too: docs/differences.md):
    a long range lets other tasks run when its timeslice is used up (1 GiB of 4K pages
    took 1.2-1.8 s without a yield), and a range unmapped meanwhile fails part-way.
    Returns the sum of what the parts return."""
    timeslice = Timeslice(mm.sched)
    part = max(HPAGE_SIZE, PAGE_SIZE << level_shift(region.page_level))
    done, lo = 0, start
    while lo < end:
        hi = min(end, (lo | (part - 1)) + 1)
        done += await mm.update(region, lo, hi, partial(apply, mm, region, lo, hi))
        lo = hi
        if lo < end:
            await timeslice.cond_resched()
    return done


async def migrate(mm: HostMm, hva: int, size: int) -> int:
    """Move every host page that [hva, hva + size) touches to a new pfn; a huge page moves
    whole. A KSM page mapped more than once stays, as migrate_pages(2) leaves shared pages
    without MPOL_MF_MOVE_ALL. Returns the 4K pages moved."""
    region = _range(mm, hva, size)
    return await _update_in_parts(mm, region, hva, hva + size, _migrate)


def _migrate(mm: HostMm, region: HostRegion, start: int, end: int) -> int:
    moving = []
    for level, frames in region.frames.items():
        shift = PAGE_SHIFT + level_shift(level)
        for frame in keys_in(frames, start >> shift, ((end - 1) >> shift) + 1):
            if mm.ksm_pages.get(frames[frame], 0) <= 1 and not is_zero_pfn(frames[frame]):
                moving.append((level, frames, frame))
    # Every new frame is allocated before an old one is freed: no page lands on a pfn
    # that another page of this part has just left (the parts before it are unmapped
    # from the guest already).
    targets = [mm.pfns.alloc(level) for level, _, _ in moving]
    for (level, frames, frame), new in zip(moving, targets):
        old = frames[frame]
        for pfn in keys_in(mm.contents, old, old + pages_per_level(level)):
            mm.contents[new + pfn - old] = mm.contents.pop(pfn)
        if old in mm.ksm_pages:
            mm.ksm_pages[new] = mm.ksm_pages.pop(old)
        frames[frame] = new
        mm.pfns.free(old, level)
    return sum(pages_per_level(level) for level, _, _ in moving)


async def swap_out(mm: HostMm, hva: int, size: int) -> int:
    """Page out [hva, hva + size) as MADV_PAGEOUT does: THPs are split, then each page's
    contents go to swap and its frame is freed; a KSM page mapped more than once stays.
    Hugetlb memory is never swapped. Returns the pages swapped out."""
    region = _range(mm, hva, size)
    if region.backing is Backing.HUGETLB_1G:
        raise einval(f"hugetlb pages at {hva:#x} cannot be swapped")
    return await _update_in_parts(mm, region, hva, hva + size, _swap_out)


def _swap_out(mm: HostMm, region: HostRegion, start: int, end: int) -> int:
    for frame in keys_in(region.frames[PG_LEVEL_2M], start >> HPAGE_SHIFT,
                         ((end - 1) >> HPAGE_SHIFT) + 1):
        region.split_huge(frame)
    frames = region.frames[PG_LEVEL_4K]
    out = 0
    for page in keys_in(frames, start >> PAGE_SHIFT, end >> PAGE_SHIFT):
        pfn = frames[page]
        if mm.ksm_pages.get(pfn, 0) > 1 or is_zero_pfn(pfn):
            continue                        # shared, or the zero page: it stays mapped
        region.swapped[page] = mm.contents.get(pfn)
        del frames[page]
        mm.put(pfn, PG_LEVEL_4K)
        out += 1
    return out


async def mprotect(mm: HostMm, hva: int, size: int, prot: int) -> None:
    """Set the protection of [hva, hva + size) to `prot` (PROT_* bits; on x86 PROT_WRITE
    and PROT_EXEC imply PROT_READ, and PROT_EXEC means nothing to KVM). Removing a
    permission invalidates the range, and so does splitting a THP the range covers in
    part; granting one alone does not: a secondary MMU finds it at its next fault."""
    if prot & ~(PROT_RW | PROT_EXEC):
        raise einval(f"prot {prot:#x} has bits other than PROT_READ|PROT_WRITE|PROT_EXEC")
    prot = (PROT_READ if prot else PROT_NONE) | prot & PROT_WRITE
    region = _range(mm, hva, size, huge_aligned=True)
    end = hva + size

    def apply() -> None:
        region.split_partial(hva, end)
        region.protect(hva, end, prot)

    if region.covers_huge_in_part(hva, end) or \
            any(old & ~prot for old in region.protections(hva, end)):
        await mm.update(region, hva, end, apply)
    else:
        apply()


# -- KSM merging (the copy-on-write break is a write fault: HostMm.hva_to_pfn) ----------

async def ksm_merge(mm: HostMm, hvas: Sequence[int]) -> int:
    """Merge the pages at `hvas` that hold equal contents, as ksmd does: in each group a
    page becomes the KSM page (write-protected; one that is a KSM page already is
    kept), then every other page is replaced by it; each step invalidates its page. A
    page whose contents changed meanwhile is left alone; pages not present (never
    touched, or swapped out) are not scanned. Returns the pages replaced, each of which
    freed a frame."""
    _check_ksm(mm, hvas)
    groups: dict[bytes, list[tuple[HostRegion, int]]] = {}
    for hva in hvas:
        region = mm.find(hva)
        found = region.mapped(hva)
        if found is not None and not is_zero_pfn(found[0]):
            groups.setdefault(mm.read_pfn(found[0], 0, PAGE_SIZE), []).append((region, hva))
    # ksmd reschedules between pages: every step below is one page's own invalidation,
    # which checks that page again, so other tasks may run between two.
    timeslice = Timeslice(mm.sched)
    merged = 0
    for data, group in groups.items():
        if len(group) < 2:
            continue
        await timeslice.cond_resched()
        stable = next((page for page in group if mm.is_ksm(*page)), None)
        if stable is not None:
            kpfn = stable[0].frames[PG_LEVEL_4K][stable[1] >> PAGE_SHIFT]
        else:
            stable = group[0]
            kpfn = await mm.update(stable[0], stable[1], stable[1] + PAGE_SIZE,
                                   partial(_write_protect, mm, *stable, data))
        for region, hva in group:
            if kpfn is not None and hva != stable[1]:
                await timeslice.cond_resched()
                merged += await mm.update(region, hva, hva + PAGE_SIZE,
                                          partial(_replace, mm, region, hva, kpfn))
    return merged


def _check_ksm(mm: HostMm, hvas: Sequence[int]) -> None:
    if len(hvas) < 2 or len(set(hvas)) != len(hvas):
        raise einval(f"KSM merges two or more distinct pages, not {len(hvas)} hvas "
                     f"({len(set(hvas))} distinct)")
    for hva in hvas:
        region = mm.find(hva)
        if hva & (PAGE_SIZE - 1) or region is None:
            raise einval(f"hva {hva:#x} is not a mapped page-aligned address")
        if region.backing is Backing.HUGETLB_1G:
            raise einval(f"hva {hva:#x} is hugetlb memory, which KSM does not merge")


def _write_protect(mm: HostMm, region: HostRegion, hva: int, data: bytes) -> int | None:
    """`write_protect_page`: the page at hva becomes a KSM page if it still holds `data`.
    Returns its pfn, or None."""
    region.split_partial(hva, hva + PAGE_SIZE)
    found = region.mapped(hva)
    if found is None or mm.read_pfn(found[0], 0, PAGE_SIZE) != data:
        return None
    mm.ksm_pages.setdefault(found[0], 1)
    return found[0]


def _replace(mm: HostMm, region: HostRegion, hva: int, kpfn: int) -> int:
    """`replace_page`: hva maps the KSM page instead of its own page, if their contents
    are still equal. Returns 1 if it did."""
    if kpfn not in mm.ksm_pages:
        return 0                                   # every sharer broke COW meanwhile
    region.split_partial(hva, hva + PAGE_SIZE)
    found = region.mapped(hva)
    if found is None or found[0] == kpfn or \
            mm.read_pfn(found[0], 0, PAGE_SIZE) != mm.read_pfn(kpfn, 0, PAGE_SIZE):
        return 0
    region.frames[PG_LEVEL_4K][hva >> PAGE_SHIFT] = kpfn
    mm.ksm_pages[kpfn] += 1
    mm.put(found[0], PG_LEVEL_4K)
    return 1


# -- THP split and collapse -------------------------------------------------------------

def _thp_frame(mm: HostMm, hva: int) -> tuple[HostRegion, int, int]:
    """(region, 2M frame number, first hva) of the whole 2M frame of a THP region at hva."""
    region = mm.find(hva)
    if region is None or region.backing is not Backing.THP:
        raise einval(f"hva {hva:#x} is not in a THP region")
    start = hva & ~(HPAGE_SIZE - 1)
    if start < region.hva or start + HPAGE_SIZE > region.end:
        raise einval(f"the 2M frame at {start:#x} is not wholly inside its region")
    return region, hva >> HPAGE_SHIFT, start


async def thp_split(mm: HostMm, hva: int) -> None:
    """`split_huge_pmd`: the THP at hva is mapped by 512 4K mappings of the same pfns."""
    region, frame, start = _thp_frame(mm, hva)
    if frame not in region.frames[PG_LEVEL_2M]:
        raise einval(f"no THP maps hva {hva:#x}")

    def split() -> None:
        if frame in region.frames[PG_LEVEL_2M]:
            region.split_huge(frame)

    await mm.update(region, start, start + HPAGE_SIZE, split)


async def thp_collapse(mm: HostMm, hva: int) -> None:
    """khugepaged (MADV_COLLAPSE): the 2M frame at hva becomes one new THP with its pages'
    contents (swapped ones are swapped in, unpopulated ones are zero). A frame that is
    huge already stays as it is. EINVAL if the frame has two protections, EBUSY if
    nothing in it is mapped or a page of it is a KSM page."""
    region, frame, start = _thp_frame(mm, hva)
    if frame in region.frames[PG_LEVEL_2M]:
        return
    _check_collapse(mm, region, start)
    await mm.update(region, start, start + HPAGE_SIZE,
                    partial(_collapse, mm, region, frame, start))


def _check_collapse(mm: HostMm, region: HostRegion, start: int) -> None:
    end = start + HPAGE_SIZE
    if not region.uniform(start, end):
        raise einval(f"the 2M frame at {start:#x} has two protections")
    if mm.ksm_hvas(region, start, end):
        raise KvmError(errno.EBUSY, f"the 2M frame at {start:#x} maps a KSM page")
    if not keys_in(region.frames[PG_LEVEL_4K], start >> PAGE_SHIFT, end >> PAGE_SHIFT) and \
            not keys_in(region.swapped, start >> PAGE_SHIFT, end >> PAGE_SHIFT):
        raise KvmError(errno.EBUSY, f"nothing is mapped in the 2M frame at {start:#x}")


def _collapse(mm: HostMm, region: HostRegion, frame: int, start: int) -> None:
    if frame in region.frames[PG_LEVEL_2M]:
        return                                     # collapsed meanwhile
    _check_collapse(mm, region, start)
    base = mm.pfns.alloc(PG_LEVEL_2M)
    small = region.frames[PG_LEVEL_4K]
    first = start >> PAGE_SHIFT
    for i in range(pages_per_level(PG_LEVEL_2M)):
        pfn = small.pop(first + i, None)
        data = region.swapped.pop(first + i, None)
        if pfn is not None:
            data = mm.contents.get(pfn)
            mm.put(pfn, PG_LEVEL_4K)
        if data is not None:
            mm.contents[base + i] = data
    region.frames[PG_LEVEL_2M][frame] = base
    region.split_2m.discard(frame)
