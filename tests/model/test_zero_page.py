"""The shared zero page: a read of private anonymous memory never touched maps it
read-only and allocates nothing; a write breaks copy-on-write under an invalidation."""

from __future__ import annotations

import pytest

from vmmu.server.kvm import KVM_MEM_LOG_DIRTY_PAGES, Backing, VmBugged
from vmmu.server.kvm.host_region import HUGE_ZERO_PFN, ZERO_PFN, is_zero_pfn
from vmmu.server.kvm.sanitizers import STALE_TRANSLATION, SanitizerViolation

from guest_io import leaf, read, write

MIB = 1 << 20
PAGE = 4096


def seq(vm) -> int:
    return vm.stats()["mmu_invalidate_seq"]


async def test_a_read_of_untouched_memory_maps_the_zero_page_read_only(make_guest):
    g = await make_guest(Backing.PAGE_4K, 4 * MIB)
    frames = g.vm.host.pfns.allocated_4k
    assert await read(g, 0x3000) == bytes(8)
    spte = leaf(g, 0x3000)
    assert spte.pfn == ZERO_PFN and spte.readable
    assert not (spte.writable or spte.host_writable or spte.mmu_writable)
    assert g.vm.host.pfns.allocated_4k == frames             # nothing allocated
    info = g.vm.host_regions()[0]
    assert (info.populated_4k_pages, info.zero_pages) == (0, 1)
    assert await read(g, 0x5000) == bytes(8) and leaf(g, 0x5000).pfn == ZERO_PFN   # shared


async def test_a_write_breaks_copy_on_write_with_an_invalidation(make_guest):
    g = await make_guest(Backing.PAGE_4K, 4 * MIB)
    await read(g, 0x3000)
    before = seq(g.vm)
    await write(g, 0x3000, b"written!")
    assert seq(g.vm) == before + 1                           # the COW break invalidated
    spte = leaf(g, 0x3000)
    assert not is_zero_pfn(spte.pfn) and spte.writable
    assert await read(g, 0x3000) == b"written!"
    assert await g.vm.read_hva(g.hva(0x3000), 8) == b"written!"
    info = g.vm.host_regions()[0]
    assert (info.populated_4k_pages, info.zero_pages) == (1, 0)


async def test_a_thp_read_maps_the_huge_zero_page_and_a_write_gets_a_thp(make_guest):
    g = await make_guest(Backing.THP, 4 * MIB)
    assert await read(g, 0x201000) == bytes(8)
    spte = leaf(g, 0x201000)
    assert spte.level == 2 and spte.pfn == HUGE_ZERO_PFN and not spte.writable
    assert g.vm.host_regions()[0].zero_pages == 512
    before = seq(g.vm)
    await write(g, 0x2ff000, b"tail....")
    assert seq(g.vm) == before + 1
    spte = leaf(g, 0x201000)
    assert spte.level == 2 and spte.writable and not is_zero_pfn(spte.pfn)
    assert g.vm.host_regions()[0].populated_4k_pages == 512
    assert await read(g, 0x201000) == bytes(8) and await read(g, 0x2ff000) == b"tail...."


async def test_the_vmm_writing_a_zero_page_breaks_copy_on_write_too(make_guest):
    g = await make_guest(Backing.PAGE_4K, 4 * MIB)
    assert await g.vm.read_hva(g.hva(0x4000), 4) == bytes(4)       # the VMM's read maps it too
    await read(g, 0x4000)
    assert leaf(g, 0x4000).pfn == ZERO_PFN
    await g.vm.write_hva(g.hva(0x4000), b"host")
    assert g.vm.walk(0x4000)[-1].kind == "non-present"       # zapped by the COW break
    assert await read(g, 0x4000, 4) == b"host" and leaf(g, 0x4000).writable


@pytest.mark.parametrize("host_wrote", [False, True])
async def test_in_a_logged_slot_a_read_logs_only_a_page_the_host_wrote(make_guest,
                                                                      host_wrote):
    """A read of a never-touched page maps the zero page read-only: nothing dirty. A
    read of a page the host has written gets a writable pfn, and `make_spte` marks it."""
    g = await make_guest(Backing.PAGE_4K, 4 * MIB)
    if host_wrote:
        await g.vm.write_hva(g.hva(0x6000), b"data")
    await g.vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 4 * MIB, g.region.hva)
    await read(g, 0x6000)
    bitmap = await g.vm.get_dirty_log(0)
    assert bool(bitmap[0] >> 6 & 1) == host_wrote
    await write(g, 0x6000, b"guest!!!")                      # now it is dirty either way
    assert (await g.vm.get_dirty_log(0))[0] >> 6 & 1


async def test_host_operations_leave_the_zero_page_alone(make_guest):
    g = await make_guest(Backing.PAGE_4K, 4 * MIB)
    vm = g.vm
    await read(g, 0x1000)
    await read(g, 0x2000)
    frames = vm.host.pfns.allocated_4k
    assert await vm.migrate_pages(g.hva(0x1000), 2 * PAGE) == 0
    assert await vm.swap_out(g.hva(0x1000), 2 * PAGE) == 0
    assert await vm.ksm_merge([g.hva(0x1000), g.hva(0x2000)]) == 0
    assert vm.host.pfns.allocated_4k == frames
    assert vm.host.current_pfn(g.hva(0x1000)) == vm.host.current_pfn(g.hva(0x2000)) == ZERO_PFN
    await vm.madvise_dontneed(g.hva(0x1000), PAGE)            # the zero page is not freed
    assert vm.host.pfns.allocated_4k == frames and vm.host_regions()[0].zero_pages == 1
    await vm.munmap(g.region.hva, g.region.size)
    assert vm.host.pfns.allocated_4k == frames


async def test_populate_write_breaks_every_zero_page_of_the_range(make_guest):
    g = await make_guest(Backing.THP, 4 * MIB)
    await read(g, 0x1000)                                    # the huge zero page
    before = seq(g.vm)
    # The huge zero page was present (its COW break gets a THP, as a KSM page's gets a
    # copy): only the second 2M frame counts as populated.
    assert await g.vm.madvise_populate_write(g.hva(0), 4 * MIB) == 512
    assert seq(g.vm) == before + 1
    assert g.vm.host_regions()[0].zero_pages == 0
    await write(g, 0x1000, b"no fault")
    assert leaf(g, 0x1000).writable


def test_the_host_refuses_to_write_the_zero_page(kvm_vm):
    with pytest.raises(VmBugged, match="zero page"):
        kvm_vm.host.write_pfn(ZERO_PFN, 0, b"x")
    with pytest.raises(VmBugged, match="zero page"):
        kvm_vm.host.write_byte(HUGE_ZERO_PFN + 3, 0, 0)


async def test_a_guest_write_through_the_zero_page_is_a_sanitizer_violation(make_guest):
    g = await make_guest(Backing.PAGE_4K, 4 * MIB)
    await read(g, 0x1000)
    slot = g.vm.memslot_sets[0].lookup(1)
    with pytest.raises(SanitizerViolation) as e:
        g.vm.sanitizers.check_access(1, ZERO_PFN, True)
    assert e.value.oracle == STALE_TRANSLATION and "zero page" in e.value.detail
    g.vm.sanitizers.check_access(1, ZERO_PFN, False)          # a read through it is fine
    assert slot is not None


async def test_the_ept_walk_and_the_region_say_zero_page(make_guest):
    g = await make_guest(Backing.THP, 4 * MIB)
    await read(g, 0x1000)
    await write(g, 0x200000, b"own page")
    assert leaf(g, 0x1000).zero_page and not leaf(g, 0x200000).zero_page
    info = g.vm.host_regions()[0]
    assert (info.zero_pages, info.populated_4k_pages) == (512, 512)
