"""The host mm takes mappings away and KVM follows (reference §4.3-4.5).

Each story: the guest maps a page, the host changes it, and the next guest access uses
the pfn the host maps now, with the right contents. The sanitizers are on, so every
completed access is also checked against `HostMm.current_pfn` as it happens.
"""

from __future__ import annotations

import asyncio
import errno

import pytest

from vmmu.server.kvm import PROT_READ, PROT_WRITE
from vmmu.server.kvm import AccessKind, Backing, ExitReason, KvmError
from vmmu.server.kvm import spte as S

from guest_io import Gate, leaf, populate, read, run, write

MIB, GIB = 1 << 20, 1 << 30
PAGE = 4096
R, W = AccessKind.READ, AccessKind.WRITE


def host_pfn(g, gpa):
    return g.vm.host.current_pfn(g.hva(gpa))


def seq(g):
    return g.vm.stats()["mmu_invalidate_seq"]


def pages(g):
    stats = g.vm.stats()
    return stats["pages_4k"], stats["pages_2m"], stats["pages_1g"]


def host_state(g):
    """Everything a rejected host operation must leave as it was."""
    host = g.vm.host
    return (seq(g), pages(g), g.vm.host_regions(), dict(host.contents), dict(host.ksm_pages),
            [(dict(r.frames[1]), dict(r.frames[2]), set(r.split_2m), dict(r.swapped),
              r.protections(r.hva, r.end)) for r in host.regions()])


# -- madvise(MADV_DONTNEED) ---------------------------------------------------------------

async def test_dontneed_drops_the_page_and_the_guest_reads_zeroes(make_guest):
    g = await make_guest(Backing.PAGE_4K, 4 * MIB)
    await write(g, 0x1000, b"dropped!")
    await write(g, 0x2000, b"kept....")
    old_pfn, before = leaf(g, 0x1000).pfn, seq(g)

    await g.vm.madvise_dontneed(g.hva(0x1000), PAGE)

    assert seq(g) == before + 1 and pages(g) == (1, 0, 0)
    assert g.vm.walk(0x1000)[-1].kind == "non-present" and host_pfn(g, 0x1000) is None
    assert await read(g, 0x1000) == bytes(8) and await read(g, 0x2000) == b"kept...."
    assert leaf(g, 0x1000).pfn == host_pfn(g, 0x1000) != old_pfn


async def test_dontneed_of_part_of_a_thp_splits_it(make_guest):
    g = await make_guest(Backing.THP, 4 * MIB)
    await write(g, 0x0, b"first-4k")
    await write(g, 0x1000, b"dropped!")
    huge = leaf(g, 0x0)
    assert (huge.level, pages(g)) == (2, (0, 1, 0))

    await g.vm.madvise_dontneed(g.hva(0x1000), PAGE)

    assert pages(g) == (0, 0, 0)                       # the 2M SPTE went with the split
    assert await read(g, 0x0) == b"first-4k" and await read(g, 0x1000) == bytes(8)
    small = leaf(g, 0x0)
    assert (small.level, small.pfn) == (1, huge.pfn)   # same frame, now mapped 4K
    assert leaf(g, 0x1000).pfn != huge.pfn + 1
    assert g.vm.host.host_mapping_level(g.hva(0x3000)) == 1


async def test_dontneed_of_a_whole_thp_leaves_room_for_a_new_one(make_guest):
    g = await make_guest(Backing.THP, 4 * MIB)
    await write(g, 0x200000, b"big page")
    old = leaf(g, 0x200000).pfn
    await g.vm.madvise_dontneed(g.hva(0x200000), 2 * MIB)
    assert await read(g, 0x200000) == bytes(8)
    assert leaf(g, 0x200000).level == 2 and leaf(g, 0x200000).pfn != old


# -- migration ------------------------------------------------------------------------------

@pytest.mark.parametrize("backing, level", [(Backing.PAGE_4K, 1), (Backing.THP, 2)])
async def test_migration_moves_pages_and_keeps_their_contents(make_guest, backing, level):
    g = await make_guest(backing, 4 * MIB)
    await write(g, 0x3008, b"migrate!")
    old, before = leaf(g, 0x3000), seq(g)
    assert old.level == level

    moved = await g.vm.migrate_pages(g.hva(0x3000), PAGE)

    assert moved == (1 if level == 1 else 512)        # a THP moves whole
    assert seq(g) > before and pages(g) == (0, 0, 0)
    assert await read(g, 0x3008) == b"migrate!"
    new = leaf(g, 0x3000)
    assert new.pfn == host_pfn(g, 0x3000) - (3 if level == 2 else 0)
    assert new.pfn != old.pfn and new.level == level


async def test_migration_of_unpopulated_memory_moves_nothing(make_guest):
    g = await make_guest(Backing.PAGE_4K, 4 * MIB)
    assert await g.vm.migrate_pages(g.hva(0), 4 * MIB) == 0


# -- swap -----------------------------------------------------------------------------------

async def test_swap_out_and_in_on_the_next_touch(make_guest):
    g = await make_guest(Backing.PAGE_4K, 4 * MIB)
    await write(g, 0x5000, b"swapped!")
    old, before = leaf(g, 0x5000).pfn, seq(g)

    assert await g.vm.swap_out(g.hva(0x5000), PAGE) == 1

    assert seq(g) == before + 1 and host_pfn(g, 0x5000) is None
    assert g.vm.walk(0x5000)[-1].kind == "non-present"
    assert g.vm.host_regions()[0].populated_4k_pages == 0
    assert await read(g, 0x5000) == b"swapped!"           # swap-in: no invalidation
    assert seq(g) == before + 1
    assert leaf(g, 0x5000).pfn == host_pfn(g, 0x5000) != old


async def test_swapping_part_of_a_thp_splits_it(make_guest):
    g = await make_guest(Backing.THP, 4 * MIB)
    await write(g, 0x0, b"resident")
    await write(g, 0x7000, b"goes out")
    assert await g.vm.swap_out(g.hva(0x7000), PAGE) == 1
    assert pages(g) == (0, 0, 0)
    assert await read(g, 0x7000) == b"goes out" and await read(g, 0x0) == b"resident"
    assert leaf(g, 0x0).level == 1 and leaf(g, 0x7000).level == 1


# -- mprotect -------------------------------------------------------------------------------

async def test_write_protected_memory_faults_writes_and_maps_reads_read_only(make_guest):
    g = await make_guest(Backing.PAGE_4K, 4 * MIB)
    await write(g, 0x1000, b"readonly")
    await write(g, 0x2000, b"writable")
    before = seq(g)

    await g.vm.mprotect(g.hva(0x1000), PAGE, PROT_READ)

    assert seq(g) == before + 1 and g.vm.walk(0x1000)[-1].kind == "non-present"
    result = await run(g.vcpu, (0x1000, W, 8, b"denied!!"))
    assert result.exit.reason is ExitReason.MEMORY_FAULT and result.exit.errno == errno.EFAULT
    assert result.exit.gpa == 0x1000 and result.exit.is_write
    assert await read(g, 0x1000) == b"readonly"
    ro = leaf(g, 0x1000)
    assert ro.readable and not (ro.writable or ro.host_writable or ro.mmu_writable)
    await write(g, 0x2000, b"still ok")                  # the page next door keeps write
    assert not g.vm.host_regions()[0].writable
    with pytest.raises(KvmError) as err:
        await g.vm.write_hva(g.hva(0x1000), b"x")
    assert err.value.errno == errno.EFAULT


async def test_restoring_write_needs_no_invalidation(make_guest):
    g = await make_guest(Backing.PAGE_4K, 4 * MIB)
    await g.vm.mprotect(g.hva(0x1000), PAGE, PROT_READ)
    assert await read(g, 0x1000) == bytes(8)
    before = seq(g)

    await g.vm.mprotect(g.hva(0x1000), PAGE, PROT_READ | PROT_WRITE)

    assert seq(g) == before and not leaf(g, 0x1000).writable   # found at the next fault
    await write(g, 0x1000, b"writable")
    assert leaf(g, 0x1000).writable and leaf(g, 0x1000).host_writable
    assert g.vm.host_regions()[0].writable


async def test_mprotect_of_part_of_a_thp_splits_it_and_keeps_the_rest_huge_elsewhere(
        make_guest):
    g = await make_guest(Backing.THP, 4 * MIB)
    await write(g, 0x0, b"thp page")
    await g.vm.mprotect(g.hva(0x3000), PAGE, PROT_READ)
    assert pages(g) == (0, 0, 0)
    assert await read(g, 0x0) == b"thp page" and leaf(g, 0x0).level == 1
    await write(g, 0x200000, b"2M again")                # the other frame is one protection
    assert leaf(g, 0x200000).level == 2


async def test_a_read_only_frame_is_populated_at_4k_next_to_a_writable_one(make_guest):
    g = await make_guest(Backing.THP, 4 * MIB)
    await g.vm.mprotect(g.hva(0x100000), 2 * MIB, PROT_READ)   # straddles both frames
    assert await read(g, 0x0) == bytes(8) and await read(g, 0x200000) == bytes(8)
    assert leaf(g, 0x0).level == 1 and leaf(g, 0x200000).level == 1


# -- KSM ------------------------------------------------------------------------------------

async def test_ksm_merges_identical_pages_into_one_read_only_pfn(make_guest):
    g = await make_guest(Backing.PAGE_4K, 4 * MIB)
    for gpa in (0x1000, 0x2000):
        await write(g, gpa, b"same....")
    await write(g, 0x3000, b"other...")
    own = {gpa: leaf(g, gpa).pfn for gpa in (0x1000, 0x2000, 0x3000)}

    merged = await g.vm.ksm_merge([g.hva(0x1000), g.hva(0x2000), g.hva(0x3000)])

    assert merged == 1
    assert await read(g, 0x1000) == await read(g, 0x2000) == b"same...."
    first, second = leaf(g, 0x1000), leaf(g, 0x2000)
    assert first.pfn == second.pfn == own[0x1000] == host_pfn(g, 0x2000)
    for shared in (first, second):
        assert not (shared.writable or shared.host_writable)
    assert leaf(g, 0x3000).pfn == own[0x3000]              # different contents: untouched


async def test_a_guest_write_breaks_cow_and_the_other_sharer_keeps_the_ksm_page(make_guest):
    g = await make_guest(Backing.PAGE_4K, 4 * MIB)
    for gpa in (0x1000, 0x2000):
        await write(g, gpa, b"same....")
    await g.vm.ksm_merge([g.hva(0x1000), g.hva(0x2000)])
    assert await read(g, 0x1000) == b"same...."
    shared = leaf(g, 0x1000).pfn
    retries = g.vcpu.stats()["pf_retry"]

    await write(g, 0x2000, b"mine!!!!")

    assert g.vcpu.stats()["pf_retry"] > retries   # the COW break invalidated the page
    mine = leaf(g, 0x2000)
    assert mine.pfn != shared and mine.writable and mine.pfn == host_pfn(g, 0x2000)
    assert await read(g, 0x2000) == b"mine!!!!" and await read(g, 0x1000) == b"same...."
    assert leaf(g, 0x1000).pfn == shared == host_pfn(g, 0x1000)


async def test_a_vmm_write_to_a_ksm_page_breaks_cow_too(make_guest):
    g = await make_guest(Backing.THP, 4 * MIB)                  # KSM splits the THP
    await write(g, 0x1000, b"twin....")
    await write(g, 0x201000, b"twin....")
    assert await g.vm.ksm_merge([g.hva(0x1000), g.hva(0x201000)]) == 1
    assert await read(g, 0x201000) == await read(g, 0x1000) == b"twin...."
    shared = leaf(g, 0x201000).pfn
    assert leaf(g, 0x1000).pfn == shared and leaf(g, 0x1000).level == 1

    await g.vm.write_hva(g.hva(0x1000), b"host")

    assert await read(g, 0x1000) == b"host...." and await read(g, 0x201000) == b"twin...."
    assert leaf(g, 0x1000).pfn != shared


async def test_migrate_and_swap_leave_a_shared_ksm_page_alone(make_guest):
    g = await make_guest(Backing.PAGE_4K, 4 * MIB)
    for gpa in (0x1000, 0x2000):
        await write(g, gpa, b"same....")
    await g.vm.ksm_merge([g.hva(0x1000), g.hva(0x2000)])
    shared = host_pfn(g, 0x1000)
    assert await g.vm.migrate_pages(g.hva(0x1000), PAGE) == 0
    assert await g.vm.swap_out(g.hva(0x1000), 2 * PAGE) == 0
    assert host_pfn(g, 0x1000) == host_pfn(g, 0x2000) == shared


async def test_the_last_sharer_frees_the_ksm_page(make_guest):
    g = await make_guest(Backing.PAGE_4K, 4 * MIB)
    for gpa in (0x1000, 0x2000):
        await write(g, gpa, b"same....")
    allocated = g.vm.host.pfns.allocated_4k
    await g.vm.ksm_merge([g.hva(0x1000), g.hva(0x2000)])
    assert g.vm.host.pfns.allocated_4k == allocated - 1
    await g.vm.madvise_dontneed(g.hva(0x1000), 2 * PAGE)
    assert g.vm.host.ksm_pages == {} and g.vm.host.pfns.allocated_4k == allocated - 2


# -- THP split and collapse -----------------------------------------------------------------

async def test_thp_split_zaps_the_2m_spte_and_the_guest_refaults_at_4k(make_guest):
    g = await make_guest(Backing.THP, 4 * MIB)
    await write(g, 0x5000, b"split me")
    huge, before = leaf(g, 0x5000), seq(g)

    await g.vm.thp_split(g.hva(0x5000))

    assert seq(g) == before + 1 and pages(g) == (0, 0, 0)
    assert await read(g, 0x5000) == b"split me"
    small = leaf(g, 0x5000)
    assert (small.level, small.pfn) == (1, huge.pfn + 5)    # same frames, now 4K
    assert g.vm.stats()["pages_4k"] == 1


async def test_thp_collapse_refaults_at_2m_with_the_contents(make_guest):
    g = await make_guest(Backing.THP, 4 * MIB)
    await write(g, 0x0, b"page 0..")
    await g.vm.thp_split(g.hva(0x0))
    await write(g, 0x1FF000, b"page 511")
    assert await read(g, 0x0) == b"page 0.."
    await g.vm.swap_out(g.hva(0x8000), PAGE)                  # collapse swaps it in
    old = leaf(g, 0x0).pfn
    assert pages(g) == (2, 0, 0)

    await g.vm.thp_collapse(g.hva(0x1234))

    assert pages(g) == (0, 0, 0)
    assert await read(g, 0x1FF000) == b"page 511" and await read(g, 0x0) == b"page 0.."
    huge = leaf(g, 0x0)
    assert huge.level == 2 and huge.pfn % 512 == 0 and huge.pfn != old
    assert g.vm.stats()["pages_2m"] == 1
    await g.vm.thp_collapse(g.hva(0x0))                      # already huge: nothing to do
    assert leaf(g, 0x0).pfn == huge.pfn


# -- races with the fault path ---------------------------------------------------------------

async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_thp_populated_while_the_notifiers_run_is_inside_the_invalidation(make_guest):
    """The fault looks its pfn up before the invalidation begins and populates a THP over
    the dropped page; the invalidation already covered the whole frame, so the fault
    retries and maps the split frame at 4K."""
    g = await make_guest(Backing.THP, 4 * MIB)
    vm = g.vm
    await read(g, 0x200000)                                    # root loaded
    before = seq(g)
    await vm.mmu_lock.acquire_write()                          # hold everyone at the door
    drop = asyncio.create_task(vm.madvise_dontneed(g.hva(0x1000), PAGE))
    await settle()                                             # queued for the write lock
    fault = asyncio.create_task(run(g.vcpu, (0x5000, R, 8, b"")))
    await settle()                                             # THP populated, queued
    assert vm.host.host_mapping_level(g.hva(0x5000)) == 2
    huge = host_pfn(g, 0x0)
    vm.mmu_lock.release_write()
    result, _ = await asyncio.gather(fault, drop)

    assert result.exit.reason is ExitReason.DONE and g.vcpu.stats()["pf_retry"] >= 1
    assert seq(g) == before + 1 and host_pfn(g, 0x1000) is None
    assert (leaf(g, 0x5000).level, leaf(g, 0x5000).pfn) == (1, huge + 5)


async def test_a_collapse_landing_inside_a_zap_window_makes_it_announce_the_thp(make_guest):
    """dontneed announces one 4K page of a split frame; before its change runs, a collapse
    makes the frame huge: the zap must announce the whole THP again before it splits it."""
    g = await make_guest(Backing.THP, 4 * MIB)
    vm = g.vm
    await write(g, 0x0, b"survives")
    await vm.thp_split(g.hva(0x0))
    await write(g, 0x1000, b"dropped!")
    before = seq(g)
    gate = Gate(g.hva(0x1000), g.hva(0x2000))
    vm.host.notifiers.append(gate)
    drop = asyncio.create_task(vm.madvise_dontneed(g.hva(0x1000), PAGE))
    await gate.reached.wait()

    await vm.thp_collapse(g.hva(0x0))
    assert vm.host.host_mapping_level(g.hva(0x1000)) == 2
    gate.open.set()
    await drop

    assert seq(g) == before + 3                  # the collapse, then the zap twice
    assert host_pfn(g, 0x1000) is None and vm.host.host_mapping_level(g.hva(0x0)) == 1
    assert await read(g, 0x0) == b"survives" and await read(g, 0x1000) == bytes(8)


# -- tracepoints ------------------------------------------------------------------------------

async def test_host_operations_emit_a_tracepoint(make_guest):
    g = await make_guest(Backing.PAGE_4K, 4 * MIB)
    await write(g, 0x1000, b"traced!!")
    sub = g.vm.tracer.subscribe(frozenset({"host_mm_op"}))
    await g.vm.migrate_pages(g.hva(0x1000), PAGE)
    await g.vm.madvise_dontneed(g.hva(0x1000), PAGE)
    events = [await sub.get() for _ in range(2)]
    sub.close()
    assert [e.fields for e in events] == [
        {"op": "migrate", "start": g.hva(0x1000), "end": g.hva(0x2000), "pages": 1},
        {"op": "madvise_dontneed", "start": g.hva(0x1000), "end": g.hva(0x2000), "pages": 0}]


# -- bad input changes nothing --------------------------------------------------------------

@pytest.mark.parametrize("call, code", [
    (lambda vm, h: vm.madvise_dontneed(h + 1, PAGE), errno.EINVAL),          # misaligned
    (lambda vm, h: vm.madvise_dontneed(h, 0), errno.EINVAL),                 # empty
    (lambda vm, h: vm.madvise_dontneed(h, 4 * MIB + PAGE), errno.EINVAL),    # runs off
    (lambda vm, h: vm.madvise_dontneed(0x1000, PAGE), errno.EINVAL),         # no region
    (lambda vm, h: vm.migrate_pages(h - PAGE, 2 * PAGE), errno.EINVAL),
    (lambda vm, h: vm.swap_out(h, 100), errno.EINVAL),
    (lambda vm, h: vm.mprotect(h + 8, PAGE, PROT_READ), errno.EINVAL),
    (lambda vm, h: vm.ksm_merge([h]), errno.EINVAL),                          # one page
    (lambda vm, h: vm.ksm_merge([h, h]), errno.EINVAL),                       # duplicates
    (lambda vm, h: vm.ksm_merge([h, h + 8]), errno.EINVAL),                   # misaligned
    (lambda vm, h: vm.ksm_merge([h, 0x1000]), errno.EINVAL),                  # unmapped
    (lambda vm, h: vm.thp_split(h + 2 * MIB), errno.EINVAL),                 # not huge now
    (lambda vm, h: vm.thp_split(0x1000), errno.EINVAL),
    (lambda vm, h: vm.thp_collapse(h + 2 * MIB), errno.EBUSY),               # nothing there
    (lambda vm, h: vm.clear_young(h + PAGE, h), errno.EINVAL),
])
async def test_bad_requests_are_refused_and_change_nothing(make_guest, call, code):
    g = await make_guest(Backing.THP, 4 * MIB)
    await write(g, 0x0, b"resident")
    state = host_state(g)
    with pytest.raises(KvmError) as err:
        await call(g.vm, g.region.hva)
    assert err.value.errno == code
    assert host_state(g) == state


async def test_hugetlb_ranges_are_whole_1g_pages_and_never_swapped(make_guest):
    g = await make_guest(Backing.HUGETLB_1G, GIB, gpa=GIB)
    await write(g, GIB, b"hugetlb!")
    state = host_state(g)
    for call in (lambda: g.vm.madvise_dontneed(g.region.hva, 2 * MIB),
                 lambda: g.vm.mprotect(g.region.hva, PAGE, PROT_READ),
                 lambda: g.vm.swap_out(g.region.hva, GIB),
                 lambda: g.vm.ksm_merge([g.region.hva, g.region.hva + PAGE]),
                 lambda: g.vm.thp_split(g.region.hva)):
        with pytest.raises(KvmError) as err:
            await call()
        assert err.value.errno == errno.EINVAL
    assert host_state(g) == state
    assert await g.vm.migrate_pages(g.region.hva + 5 * PAGE, PAGE) == 1 << 18
    assert await read(g, GIB) == b"hugetlb!" and leaf(g, GIB).level == 3


async def test_collapse_refuses_a_frame_with_a_ksm_page_or_two_protections(make_guest):
    g = await make_guest(Backing.THP, 8 * MIB)
    for gpa in (0x1000, 0x201000):
        await write(g, gpa, b"same....")
    await g.vm.ksm_merge([g.hva(0x1000), g.hva(0x201000)])
    await write(g, 0x400000, b"resident")
    await g.vm.mprotect(g.hva(0x400000), PAGE, PROT_READ)
    state = host_state(g)
    with pytest.raises(KvmError) as err:
        await g.vm.thp_collapse(g.hva(0x1000))
    assert err.value.errno == errno.EBUSY
    with pytest.raises(KvmError) as err:
        await g.vm.thp_collapse(g.hva(0x400000))
    assert err.value.errno == errno.EINVAL
    assert host_state(g) == state


async def test_host_operations_on_a_destroyed_vm_are_enoent(make_guest):
    g = await make_guest(Backing.PAGE_4K, 4 * MIB)
    await g.vm.destroy()
    for op in (g.vm.madvise_dontneed, g.vm.madvise_populate_write):
        with pytest.raises(KvmError) as err:
            await op(g.region.hva, PAGE)
        assert err.value.errno == errno.ENOENT, op.__name__


# -- the host pages themselves --------------------------------------------------------------

def test_protection_steps_split_and_merge(kvm_vm):
    region = kvm_vm.host.mmap(16 * PAGE, Backing.PAGE_4K)
    h = region.hva
    rw = PROT_READ | PROT_WRITE
    region.protect(h + 4 * PAGE, h + 8 * PAGE, PROT_READ)
    region.protect(h + 6 * PAGE, h + 10 * PAGE, PROT_READ)
    assert region.protections(h, region.end) == [rw, PROT_READ, rw]
    assert not region.writable_at(h + 9 * PAGE) and region.writable_at(h + 10 * PAGE)
    region.protect(h + 4 * PAGE, h + 10 * PAGE, rw)
    assert region.protections(h, region.end) == [rw] and region.writable


async def test_a_freed_frame_does_not_come_straight_back(make_guest):
    g = await make_guest(Backing.PAGE_4K, 4 * MIB)
    await write(g, 0x1000, b"abcdefgh")
    old = leaf(g, 0x1000).pfn
    for _ in range(3):
        await g.vm.madvise_dontneed(g.hva(0x1000), PAGE)
        assert await read(g, 0x1000) == bytes(8)
        await populate(g, 0x1000)                          # not the zero page: a frame
        assert leaf(g, 0x1000).pfn != old
        old = leaf(g, 0x1000).pfn


async def test_spte_after_a_host_change_is_a_fresh_leaf(make_guest):
    """The refault builds a new SPTE from the host's answer, not from the zapped one."""
    g = await make_guest(Backing.PAGE_4K, 4 * MIB)
    await write(g, 0x1000, b"12345678")
    await g.vm.migrate_pages(g.hva(0x1000), PAGE)
    await read(g, 0x1000)
    spte = leaf(g, 0x1000).spte
    assert S.spte_to_pfn(spte) == host_pfn(g, 0x1000) and S.is_accessed(spte)
    assert S.is_writable(spte) and S.is_host_writable(spte)   # KVM maps writable when it can


async def test_a_destroyed_vm_frees_its_host_pages_and_uncharges_them_exactly(make_guest):
    g = await make_guest(Backing.THP, 8 * MIB)
    for gpa in (0x1000, 0x201000):
        await write(g, gpa, b"twin....")
    assert await g.vm.ksm_merge([g.hva(0x1000), g.hva(0x201000)]) == 1    # one KSM page
    await write(g, 0x3000, b"gone....")
    assert await g.vm.swap_out(g.hva(0x3000), PAGE) == 1
    assert await read(g, 0x400000) == bytes(8)                   # the huge zero page
    await write(g, 0x600000, b"huge....")                          # a THP
    host = g.vm.host
    charges, charge = [], host.pfns.charge
    while charge is not None:
        charges.append(charge)
        charge = charge.parent
    # The first two 2M frames were THPs that KSM split: their 1024 pages less the one
    # merged into the other's KSM page and the one swapped out; the third THP; the huge
    # zero page holds none.
    populated = (512 + 512 - 1 - 1 + 512) * PAGE
    assert host.pfns.allocated_4k * PAGE == populated
    assert [c.usage for c in charges] == [populated] * len(charges)

    await g.vm.destroy()

    assert [c.usage for c in charges] == [0] * len(charges)
    assert host.pfns.allocated_4k == 0 and host.contents == {} and host.ksm_pages == {}


async def test_the_populate_check_counts_a_4k_region_as_it_would_page_by_page(make_guest):
    """`check_populate` counts a region of 4K frames from its present and swapped pages;
    over every range of a region holding each kind of page, the count is the sum of the
    page-by-page rule's (`_populate_need_at`), for a write and for a read."""
    g = await make_guest(Backing.PAGE_4K, 4 * MIB)
    host, base = g.vm.host, g.region.hva
    region = host.find(base)
    for page in (1, 2, 3, 5, 8, 9):
        await g.vm.write_hva(base + page * PAGE, b"same" if page in (2, 3) else bytes([page]))
    await g.vm.read_hva(base + 6 * PAGE, 8)                      # maps the zero page
    assert await g.vm.ksm_merge([base + 2 * PAGE, base + 3 * PAGE]) == 1
    assert await g.vm.swap_out(base + 8 * PAGE, 2 * PAGE) == 2
    states = {page: (region.mapped(base + page * PAGE), (base >> 12) + page in region.swapped)
              for page in range(12)}
    assert {mapped is None for mapped, _ in states.values()} == {True, False}
    assert any(swapped for _, swapped in states.values())
    assert any(host.is_cow(region, base + page * PAGE) for page in (2, 6))
    for write in (True, False):
        for first in range(12):
            for last in range(first + 1, 13):
                by_page, hva = 0, base + first * PAGE
                while hva < base + last * PAGE:
                    cost, hva = host._populate_need_at(region, hva, write)
                    by_page += cost
                assert host._populate_need_4k(region, base + first * PAGE,
                                              base + last * PAGE, write) == by_page, \
                    (write, first, last)
