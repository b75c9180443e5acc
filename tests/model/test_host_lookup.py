"""The host lookups every slow page fault makes: the region at an hva (the last one found
is tried first), the protection at an hva (answered at once while the region has one) and
the host page mapped there."""

from __future__ import annotations

import pytest

from vmmu.server.kvm import PROT_NONE, PROT_READ, PROT_WRITE, Backing
from vmmu.server.kvm.host_mm import HostMm
from vmmu.server.kvm.host_region import ZERO_PFN
from vmmu.server.kvm.types import PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K

MIB, GIB = 1 << 20, 1 << 30
PAGE = 4096
RW = PROT_READ | PROT_WRITE


async def test_a_region_unmapped_is_not_found_again_and_its_successor_is():
    mm = HostMm()
    first, second = mm.mmap(2 * MIB, Backing.PAGE_4K), mm.mmap(2 * MIB, Backing.PAGE_4K)
    assert mm.find(first.hva + PAGE) is first           # now the last one found
    assert mm.find(second.end - 1) is second and mm.find(first.hva) is first
    await mm.munmap(first.hva, first.size)
    assert mm.find(first.hva + PAGE) is None and mm.find(second.hva) is second
    again = mm.mmap(first.size, Backing.PAGE_4K, hva=first.hva)
    assert mm.find(first.hva + PAGE) is again
    assert mm.find(again.end) is None                    # the gap before `second`


def test_protection_steps_and_back_to_one():
    mm = HostMm()
    region = mm.mmap(2 * MIB, Backing.PAGE_4K)
    mid = region.hva + 16 * PAGE
    assert region.writable_at(region.hva) and region.writable_at(region.end - 1)
    region.protect(mid, mid + PAGE, PROT_READ)
    assert [region.writable_at(h) for h in (mid - PAGE, mid, mid + PAGE)] == \
        [True, False, True]
    region.protect(mid + PAGE, mid + 2 * PAGE, PROT_NONE)
    assert [region.prot_at(h) for h in (mid, mid + PAGE, mid + 2 * PAGE)] == \
        [PROT_READ, PROT_NONE, RW]
    assert not region.allows(mid, mid + 2 * PAGE, PROT_READ)
    assert region.allows(mid, mid + PAGE, PROT_READ)
    region.protect(mid, mid + 2 * PAGE, RW)               # the steps merge into one again
    assert region.protections(region.hva, region.end) == [RW] and region.writable_at(mid)
    region.protect(region.hva, region.end, PROT_READ)
    assert not region.writable_at(mid) and region.protections(region.hva, region.end) == \
        [PROT_READ]


@pytest.mark.parametrize("backing, size, level", [
    (Backing.PAGE_4K, 2 * MIB, PG_LEVEL_4K), (Backing.THP, 4 * MIB, PG_LEVEL_2M),
    (Backing.HUGETLB_1G, GIB, PG_LEVEL_1G),
])
async def test_mapped_gives_the_4k_pfn_and_the_host_level(backing, size, level):
    mm = HostMm()
    region = mm.mmap(size, backing)
    hva = region.hva + 3 * PAGE
    assert region.mapped(hva) is None
    pfn, writable, got = await mm.hva_to_pfn(hva, write=True)
    assert writable and got == level
    assert region.mapped(hva) == (pfn, level)
    assert region.mapped(hva + PAGE) == (None if level == PG_LEVEL_4K else (pfn + 1, level))
    assert mm.hva_to_pfn_nowait(hva, write=False) == (pfn, True, level)


async def test_a_write_to_the_zero_page_leaves_the_cow_break_to_the_lookup_that_may_sleep():
    mm = HostMm()
    region = mm.mmap(2 * MIB, Backing.PAGE_4K)
    hva = region.hva + PAGE
    assert mm.hva_to_pfn_nowait(hva, write=False) == (ZERO_PFN, False, PG_LEVEL_4K)
    assert mm.hva_to_pfn_nowait(hva, write=True) is None
    assert region.mapped(hva) == (ZERO_PFN, PG_LEVEL_4K) and mm.pfns.allocated_4k == 0
    pfn, writable, level = await mm.hva_to_pfn_slow(hva, write=True)
    assert pfn != ZERO_PFN and writable and level == PG_LEVEL_4K
    assert mm.hva_to_pfn_nowait(hva, write=True) == (pfn, True, PG_LEVEL_4K)
    assert mm.pfns.allocated_4k == 1


def test_release_frees_in_bulk_only_the_frames_the_regions_hold():
    mm = HostMm()
    region = mm.mmap(2 * MIB, Backing.PAGE_4K)
    assert mm.hva_to_pfn_nowait(region.hva, write=True) is not None
    mm.pfns.alloc(PG_LEVEL_4K)                   # held elsewhere (a guest_memfd page)
    mm.release()
    assert mm.regions() == [] and mm.pfns.allocated_4k == 1
