"""madvise(MADV_POPULATE_WRITE): the host faults a range in writable, as a write touch
does, and allocates its memory, so that no later write into it allocates.

Then the readers of `HostMm.contents` (KSM, swap, migration, collapse, freeing, reads)
must treat a populated zero page exactly as a page without contents.
"""

from __future__ import annotations

import asyncio
import errno

import pytest

from vmmu.server.kvm import AccessKind, Backing, KvmError

from guest_io import Gate, leaf, read, write

MIB, GIB = 1 << 20, 1 << 30
PAGE = 4096
ZERO = bytes(PAGE)
R, W = AccessKind.READ, AccessKind.WRITE


def kvm_maps(g, gpa) -> bool:
    path = g.vm.walk(gpa)
    return bool(path) and path[-1].kind == "leaf"


def host_pfn(g, gpa):
    return g.vm.host.current_pfn(g.hva(gpa))


def seq(vm):
    return vm.stats()["mmu_invalidate_seq"]


def populated(vm, i=0):
    return vm.host_regions()[i].populated_4k_pages


def host_state(vm):
    """Everything a rejected request must leave as it was."""
    host = vm.host
    return (seq(vm), vm.host_regions(), host.pfns.allocated_4k,
            {pfn: bytes(data) for pfn, data in host.contents.items()}, dict(host.ksm_pages),
            [(dict(r.frames[1]), dict(r.frames[2]), dict(r.frames[3]), set(r.split_2m),
              dict(r.swapped), r.protections(r.hva, r.end)) for r in host.regions()])


def contents_of(vm, hva):
    """The contents object of the page mapped at hva (None: not allocated)."""
    return vm.host.contents.get(vm.host.current_pfn(hva))


# -- what it populates ------------------------------------------------------------------------

async def test_4k_pages_are_populated_and_get_zeroed_contents(make_guest):
    g = await make_guest(Backing.PAGE_4K, 4 * MIB)
    vm, host = g.vm, g.vm.host
    before = seq(vm)

    assert await vm.madvise_populate_write(g.hva(0x1000), 3 * PAGE) == 3

    assert populated(vm) == 3 and host.pfns.allocated_4k == 3
    assert seq(vm) == before                             # a fault takes nothing away
    for gpa in (0x1000, 0x2000, 0x3000):
        assert host.host_mapping_level(g.hva(gpa)) == 1
        assert contents_of(vm, g.hva(gpa)) == ZERO
        assert not kvm_maps(g, gpa)                      # the host's fault, not KVM's
    assert host_pfn(g, 0x0) is None and host_pfn(g, 0x4000) is None
    assert len(host.contents) == 3
    assert await vm.read_hva(g.hva(0x1000), 3 * PAGE) == bytes(3 * PAGE)


async def test_a_later_guest_write_allocates_nothing(make_guest):
    g = await make_guest(Backing.PAGE_4K, 4 * MIB)
    vm, host = g.vm, g.vm.host
    await vm.madvise_populate_write(g.hva(0), 4 * PAGE)
    pages = [contents_of(vm, g.hva(gpa)) for gpa in range(0, 4 * PAGE, PAGE)]
    allocated = host.pfns.allocated_4k
    pfns = [host_pfn(g, gpa) for gpa in range(0, 4 * PAGE, PAGE)]

    for gpa in range(0, 4 * PAGE, PAGE):
        await write(g, gpa + 8, b"no alloc")
    await vm.write_hva(g.hva(0x3010), b"vmm too!")

    assert host.pfns.allocated_4k == allocated and len(host.contents) == 4
    assert [host_pfn(g, gpa) for gpa in range(0, 4 * PAGE, PAGE)] == pfns
    assert [contents_of(vm, g.hva(gpa)) for gpa in range(0, 4 * PAGE, PAGE)] == pages
    assert all(contents_of(vm, g.hva(gpa)) is page
               for gpa, page in zip(range(0, 4 * PAGE, PAGE), pages))
    assert await read(g, 0x2008) == b"no alloc" and await read(g, 0x3010) == b"vmm too!"
    assert leaf(g, 0x1000).pfn == pfns[1]


async def test_thp_frames_populate_as_2m_and_contents_only_in_the_range(make_guest):
    g = await make_guest(Backing.THP, 4 * MIB)
    vm, host = g.vm, g.vm.host

    assert await vm.madvise_populate_write(g.hva(0x1000), PAGE) == 512

    assert populated(vm) == 512 and host.host_mapping_level(g.hva(0x1000)) == 2
    assert list(host.contents) == [host_pfn(g, 0x1000)] and contents_of(vm, g.hva(0x1000)) == ZERO
    assert await read(g, 0x1000) == bytes(8)
    huge = leaf(g, 0x1000)
    assert (huge.level, huge.pfn) == (2, host_pfn(g, 0x0))
    # The whole region: the frame mapped already counts nothing, the other one 512.
    assert await vm.madvise_populate_write(g.hva(0), 4 * MIB) == 512
    assert populated(vm) == 1024 and len(host.contents) == 1024
    assert all(contents_of(vm, g.hva(gpa)) == ZERO for gpa in range(0, 4 * MIB, PAGE))
    assert host.host_mapping_level(g.hva(0x300000)) == 2


async def test_a_split_thp_frame_populates_4k_pages(make_guest):
    g = await make_guest(Backing.THP, 4 * MIB)
    vm, host = g.vm, g.vm.host
    await write(g, 0x0, b"resident")
    await vm.thp_split(g.hva(0x0))
    await vm.madvise_dontneed(g.hva(0x1000), PAGE)

    assert await vm.madvise_populate_write(g.hva(0x1000), PAGE) == 1

    assert host.host_mapping_level(g.hva(0x1000)) == 1 and populated(vm) == 512
    assert contents_of(vm, g.hva(0x1000)) == ZERO


async def test_hugetlb_populates_the_whole_1g_page(make_guest):
    g = await make_guest(Backing.HUGETLB_1G, GIB, gpa=GIB)
    vm, host = g.vm, g.vm.host

    assert await vm.madvise_populate_write(g.hva(GIB + 5 * PAGE), 2 * PAGE) == 1 << 18

    assert populated(vm) == 1 << 18 and host.host_mapping_level(g.hva(GIB)) == 3
    base = host_pfn(g, GIB)
    assert sorted(host.contents) == [base + 5, base + 6]     # allocated: the range only
    assert await read(g, GIB + 5 * PAGE) == bytes(8)
    assert (leaf(g, GIB).level, leaf(g, GIB).pfn) == (3, base)
    state = host_state(vm)
    assert await vm.madvise_populate_write(g.hva(GIB + 5 * PAGE), 2 * PAGE) == 0
    assert host_state(vm) == state


async def test_populated_pages_keep_their_contents_and_pfn(make_guest):
    g = await make_guest(Backing.PAGE_4K, 4 * MIB)
    vm = g.vm
    await write(g, 0x1000, b"resident")
    await read(g, 0x2000)                                # present, no contents
    pfns, page = [host_pfn(g, 0x1000), host_pfn(g, 0x2000)], contents_of(vm, g.hva(0x1000))

    assert await vm.madvise_populate_write(g.hva(0x1000), 2 * PAGE) == 0

    assert [host_pfn(g, 0x1000), host_pfn(g, 0x2000)] == pfns
    assert contents_of(vm, g.hva(0x1000)) is page
    assert await read(g, 0x1000) == b"resident"
    assert contents_of(vm, g.hva(0x2000)) == ZERO        # allocated now


async def test_a_range_may_span_adjacent_regions(kvm_vm):
    first = kvm_vm.mmap(4 * PAGE, Backing.PAGE_4K)
    second = kvm_vm.mmap(4 * PAGE, Backing.PAGE_4K, hva=first.hva + first.size)

    assert await kvm_vm.madvise_populate_write(first.hva + 2 * PAGE, 4 * PAGE) == 4

    assert [r.populated_4k_pages for r in kvm_vm.host_regions()] == [2, 2]
    assert kvm_vm.host.current_pfn(second.hva + PAGE) in kvm_vm.host.contents
    assert kvm_vm.host.current_pfn(second.hva + 2 * PAGE) is None


async def test_populate_emits_a_tracepoint(make_guest):
    g = await make_guest(Backing.PAGE_4K, 4 * MIB)
    sub = g.vm.tracer.subscribe(frozenset({"host_mm_op"}))
    await g.vm.madvise_populate_write(g.hva(0x1000), 2 * PAGE)
    event = await sub.get()
    sub.close()
    assert event.fields == {"op": "madvise_populate_write", "start": g.hva(0x1000),
                            "end": g.hva(0x3000), "pages": 2}


# -- swap-in and the copy-on-write break of KSM pages ----------------------------------------

async def test_swapped_pages_come_back_at_a_new_pfn_with_their_contents(make_guest):
    g = await make_guest(Backing.PAGE_4K, 4 * MIB)
    vm = g.vm
    await write(g, 0x1000, b"swapped!")
    await read(g, 0x2000)                                # present without contents
    old = [host_pfn(g, 0x1000), host_pfn(g, 0x2000)]
    assert await vm.swap_out(g.hva(0x1000), 2 * PAGE) == 2
    before = seq(vm)

    assert await vm.madvise_populate_write(g.hva(0x1000), 2 * PAGE) == 2

    assert seq(vm) == before and populated(vm) == 2 and vm.host.regions()[0].swapped == {}
    new = [host_pfn(g, 0x1000), host_pfn(g, 0x2000)]
    assert None not in new and not set(new) & set(old)
    assert bytes(contents_of(vm, g.hva(0x1000))[:8]) == b"swapped!"
    assert contents_of(vm, g.hva(0x2000)) == ZERO
    assert await read(g, 0x1000) == b"swapped!" and leaf(g, 0x1000).pfn == new[0]


async def test_a_ksm_page_breaks_copy_on_write_first(make_guest):
    g = await make_guest(Backing.PAGE_4K, 4 * MIB)
    vm, host = g.vm, g.vm.host
    for gpa in (0x1000, 0x2000, 0x3000):
        await write(g, gpa, b"shared..")
    assert await vm.ksm_merge([g.hva(0x1000), g.hva(0x2000), g.hva(0x3000)]) == 2
    kpfn = host_pfn(g, 0x1000)
    assert await read(g, 0x2000) == b"shared.." and not leaf(g, 0x2000).host_writable
    before = seq(vm)

    assert await vm.madvise_populate_write(g.hva(0x2000), PAGE) == 0   # it was present

    assert seq(vm) == before + 1                         # the COW break invalidated it
    mine = host_pfn(g, 0x2000)
    assert mine != kpfn and host.ksm_pages == {kpfn: 2}
    assert host_pfn(g, 0x1000) == host_pfn(g, 0x3000) == kpfn
    assert bytes(contents_of(vm, g.hva(0x2000))[:8]) == b"shared.."
    assert contents_of(vm, g.hva(0x2000)) is not host.contents[kpfn]
    assert not kvm_maps(g, 0x2000)                       # KVM's read-only SPTE went
    await write(g, 0x2000, b"mine....")                  # no COW break any more
    assert seq(vm) == before + 1 and host_pfn(g, 0x2000) == mine
    assert await read(g, 0x1000) == b"shared.." and await read(g, 0x2000) == b"mine...."


async def test_a_ksm_page_without_contents_gets_a_zeroed_copy(make_guest):
    g = await make_guest(Backing.PAGE_4K, 4 * MIB)
    vm, host = g.vm, g.vm.host
    await read(g, 0x1000)
    await read(g, 0x2000)
    assert await vm.ksm_merge([g.hva(0x1000), g.hva(0x2000)]) == 1
    kpfn = host_pfn(g, 0x1000)
    assert kpfn not in host.contents

    assert await vm.madvise_populate_write(g.hva(0x1000), 2 * PAGE) == 0

    assert host.ksm_pages == {}                          # both broke COW; the last freed it
    assert kpfn not in (host_pfn(g, 0x1000), host_pfn(g, 0x2000))
    assert contents_of(vm, g.hva(0x1000)) == contents_of(vm, g.hva(0x2000)) == ZERO


# -- errors change nothing --------------------------------------------------------------------

@pytest.mark.parametrize("start, size, code", [
    (0x1001, PAGE, errno.EINVAL),                        # misaligned start
    (0x1000, PAGE + 8, errno.EINVAL),                    # misaligned size
    (0x1000, 0, errno.EINVAL),                           # empty
    (0x1000, -PAGE, errno.EINVAL),                       # negative
    (-PAGE, 2 * PAGE, errno.ENOMEM),                     # starts below the region
    (4 * MIB - PAGE, 2 * PAGE, errno.ENOMEM),            # runs off its end
    (0x3000, PAGE, errno.EINVAL),                        # the read-only page
    (0x0, 4 * MIB, errno.EINVAL),                        # includes the read-only page
])
async def test_bad_ranges_are_refused_and_change_nothing(make_guest, start, size, code):
    g = await make_guest(Backing.THP, 4 * MIB)
    vm = g.vm
    for gpa in (0x201000, 0x202000):                     # a KSM page in the range
        await write(g, gpa, b"twins...")
    await vm.ksm_merge([g.hva(0x201000), g.hva(0x202000)])
    await write(g, 0x100000, b"swapped!")
    await vm.swap_out(g.hva(0x100000), PAGE)
    await vm.mprotect(g.hva(0x3000), PAGE, writable=False)
    state = host_state(vm)

    with pytest.raises(KvmError) as err:
        await vm.madvise_populate_write(g.hva(start), size)

    assert err.value.errno == code
    assert host_state(vm) == state


async def test_read_only_regions_and_holes(kvm_vm):
    ro = kvm_vm.mmap(4 * PAGE, Backing.PAGE_4K, writable=False)
    rw = kvm_vm.mmap(4 * PAGE, Backing.PAGE_4K)
    state = host_state(kvm_vm)
    for hva, size, code in ((ro.hva, PAGE, errno.EINVAL),
                            (rw.hva, rw.size + PAGE, errno.ENOMEM),     # a hole after it
                            (rw.hva - PAGE, 2 * PAGE, errno.ENOMEM),    # and before it
                            (0x1000, PAGE, errno.ENOMEM)):
        with pytest.raises(KvmError) as err:
            await kvm_vm.madvise_populate_write(hva, size)
        assert err.value.errno == code, hex(hva)
    assert host_state(kvm_vm) == state


async def _ksm_region_held_at_its_cow_break(vm):
    """A region with a KSM page at its second page, and a populate of the whole region
    held at the start of that page's COW break: (region, populate task)."""
    region = vm.mmap(8 * PAGE, Backing.PAGE_4K)
    for page in (1, 5):
        await vm.write_hva(region.hva + page * PAGE, b"twins...")
    assert await vm.ksm_merge([region.hva + PAGE, region.hva + 5 * PAGE]) == 1
    gate = Gate(region.hva + PAGE, region.hva + 2 * PAGE)
    vm.host.notifiers.append(gate)
    task = asyncio.create_task(vm.madvise_populate_write(region.hva, region.size))
    await gate.reached.wait()
    return region, gate, task


async def test_a_range_unmapped_during_a_cow_break_is_enomem(kvm_vm):
    region, gate, task = await _ksm_region_held_at_its_cow_break(kvm_vm)
    await kvm_vm.munmap(region.hva, region.size)
    gate.open.set()
    with pytest.raises(KvmError) as err:
        await task
    assert err.value.errno == errno.ENOMEM
    assert kvm_vm.host.contents == {} and kvm_vm.host.pfns.allocated_4k == 0


async def test_a_range_write_protected_during_a_cow_break_populates_nothing(kvm_vm):
    region, gate, task = await _ksm_region_held_at_its_cow_break(kvm_vm)
    await kvm_vm.mprotect(region.hva + 7 * PAGE, PAGE, writable=False)
    gate.open.set()
    with pytest.raises(KvmError) as err:
        await task
    assert err.value.errno == errno.EINVAL
    host = kvm_vm.host
    assert [host.current_pfn(region.hva + i * PAGE) is not None for i in range(8)] == \
        [False, True, False, False, False, True, False, False]
    assert await kvm_vm.read_hva(region.hva + PAGE, 8) == b"twins..."


# -- the readers of the contents: a populated zero page is a zero page --------------------------

@pytest.mark.parametrize("populated_first", [True, False])
async def test_ksm_merges_a_populated_zero_page_with_one_without_contents(make_guest,
                                                                         populated_first):
    g = await make_guest(Backing.PAGE_4K, 4 * MIB)
    vm, host = g.vm, g.vm.host
    await read(g, 0x1000)                                # present, no contents
    await vm.madvise_populate_write(g.hva(0x2000), 2 * PAGE)
    await write(g, 0x3000, b"nonzero!")
    assert host_pfn(g, 0x1000) not in host.contents and contents_of(vm, g.hva(0x2000)) == ZERO
    bare, allocated = g.hva(0x1000), g.hva(0x2000)
    pfns = {bare: host_pfn(g, 0x1000), allocated: host_pfn(g, 0x2000)}
    stable = allocated if populated_first else bare      # the first becomes the KSM page

    merged = await vm.ksm_merge([allocated, bare, g.hva(0x3000)] if populated_first
                                else [bare, allocated, g.hva(0x3000)])

    assert merged == 1 and host.ksm_pages == {pfns[stable]: 2}
    assert host_pfn(g, 0x1000) == host_pfn(g, 0x2000) == pfns[stable] != host_pfn(g, 0x3000)
    assert await read(g, 0x1000) == await read(g, 0x2000) == bytes(8)
    await vm.madvise_populate_write(g.hva(0x1000), 2 * PAGE)     # unmerged again
    assert host.ksm_pages == {} and contents_of(vm, bare) == contents_of(vm, allocated) == ZERO


async def test_swapping_a_populated_zero_page_keeps_it_allocated(make_guest):
    g = await make_guest(Backing.PAGE_4K, 4 * MIB)
    vm, host = g.vm, g.vm.host
    await vm.madvise_populate_write(g.hva(0x1000), PAGE)
    old = host_pfn(g, 0x1000)

    assert await vm.swap_out(g.hva(0x1000), PAGE) == 1

    assert old not in host.contents and host.regions()[0].swapped[g.hva(0x1000) >> 12] == ZERO
    assert await read(g, 0x1000) == bytes(8)             # swapped in by the guest's read
    assert host_pfn(g, 0x1000) != old and contents_of(vm, g.hva(0x1000)) == ZERO
    allocated = host.pfns.allocated_4k
    await write(g, 0x1000, b"no alloc")
    assert host.pfns.allocated_4k == allocated and len(host.contents) == 1


async def test_migration_and_collapse_carry_the_allocated_pages(make_guest):
    g = await make_guest(Backing.THP, 4 * MIB)
    vm, host = g.vm, g.vm.host
    await vm.madvise_populate_write(g.hva(0x0), 2 * MIB)     # one THP, all allocated
    await vm.thp_split(g.hva(0x0))
    await vm.madvise_dontneed(g.hva(0x5000), PAGE)           # one page not present
    assert await vm.swap_out(g.hva(0x6000), PAGE) == 1       # one page in swap
    assert len(host.contents) == 510

    assert await vm.migrate_pages(g.hva(0x0), 2 * MIB) == 510
    assert len(host.contents) == 510 and contents_of(vm, g.hva(0x1000)) == ZERO

    await vm.thp_collapse(g.hva(0x0))
    assert host.host_mapping_level(g.hva(0x0)) == 2
    base = host_pfn(g, 0x0)
    assert sorted(host.contents) == [base + i for i in range(512) if i != 5]
    assert all(host.contents[p] == ZERO for p in host.contents)
    assert await vm.read_hva(g.hva(0x0), 2 * MIB) == bytes(2 * MIB)


async def test_freeing_drops_the_allocated_contents(make_guest):
    g = await make_guest(Backing.THP, 4 * MIB)
    vm, host = g.vm, g.vm.host
    await vm.madvise_populate_write(g.hva(0x0), 4 * MIB)
    assert len(host.contents) == 1024

    await vm.madvise_dontneed(g.hva(0x0), 2 * MIB)
    assert len(host.contents) == 512 and host.pfns.allocated_4k == 512
    assert await read(g, 0x1000) == bytes(8)                 # a fresh page, unallocated
    assert contents_of(vm, g.hva(0x1000)) is None

    await vm.munmap(g.region.hva, 4 * MIB)
    assert host.contents == {} and host.pfns.allocated_4k == 0
