"""Dirty logging: enabling and disabling it, GET/CLEAR_DIRTY_LOG, dirty rings, and the
no-lost-dirty-page oracle (reference §7)."""

from __future__ import annotations

import asyncio
import errno

import pytest

from vmmu.server.kvm import (KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP,
                             KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_MEM_LOG_DIRTY_PAGES,
                             KVM_MEM_READONLY, AccessBatch, AccessKind, Backing, DirtyGfn,
                             ExitReason, KvmError, VmBugged, VmConfig)
from vmmu.server.kvm.dirty_ring import DirtyRing, coalesce
from vmmu.server.kvm.sanitizers import NO_LOST_DIRTY_PAGE, SanitizerViolation

MIB, GIB = 1 << 20, 1 << 30
LOG = KVM_MEM_LOG_DIRTY_PAGES
R, W = AccessKind.READ, AccessKind.WRITE
MANUAL, INITIALLY_SET = 1, 2


async def run(vcpu, kind, *gfns):
    result = await vcpu.run(AccessBatch.build([(gfn << 12, kind, 8, None) for gfn in gfns]))
    assert result.exit.reason is ExitReason.DONE, result.exit
    return result


async def set_log(g, on: bool, slot: int = 0) -> None:
    await g.vm.set_user_memory_region(slot, LOG if on else 0, g.gpa, g.size, g.region.hva)


def pages(vm) -> tuple[int, int, int]:
    stats = vm.stats()
    return stats["pages_4k"], stats["pages_2m"], stats["pages_1g"]


def leaf(vm, gfn: int):
    spte = vm.walk(gfn << 12)[-1]
    assert spte.kind == "leaf", spte
    return spte


def leaves(vm, gfns) -> dict[int, int]:
    return {gfn: leaf(vm, gfn).spte for gfn in gfns}


def bits(bitmap: bytes) -> set[int]:
    return {8 * i + b for i, byte in enumerate(bitmap) for b in range(8) if byte >> b & 1}


def bitmap_of(offsets, num_pages: int) -> bytes:
    value = sum(1 << o for o in set(offsets))
    return value.to_bytes(8 * ((num_pages + 63) // 64), "little")


def flushes(vm) -> int:
    return vm.stats()["remote_tlb_flush_requests"]


def slot0(vm):
    return vm.memslot_sets[0].by_id[0]


async def logging_guest(make_guest, touched=range(16), **config):
    """4 MiB of 4K pages at gpa 0, `touched` pages mapped writable, then logging on.
    The host has written the touched pages (MADV_POPULATE_WRITE), so a read maps them
    writable (a read of a page never touched would map the zero page, read-only)."""
    g = await make_guest(Backing.PAGE_4K, 4 * MIB, **config)
    if touched:
        await g.vm.madvise_populate_write(g.region.hva, 4 * MIB)
        await run(g.vcpu, R, *touched)
    await set_log(g, True)
    return g


# -- enabling and disabling ------------------------------------------------------------------

@pytest.mark.tdp_only          # splits and recovers in place: the legacy MMU zaps
async def test_enable_splits_huge_pages_eagerly_and_write_protects_every_leaf(make_guest):
    g = await make_guest(Backing.THP, 4 * MIB)
    await run(g.vcpu, W, 0, 512)
    assert pages(g.vm) == (0, 2, 0)
    tables, before = g.vm.stats()["tdp_mmu_pages"], flushes(g.vm)

    await set_log(g, True)
    assert pages(g.vm) == (1024, 0, 0)
    assert g.vm.stats()["tdp_mmu_pages"] == tables + 2
    assert flushes(g.vm) == before + 1
    for gfn in (0, 1, 511, 512, 1023):
        spte = leaf(g.vm, gfn)
        assert spte.level == 1 and not spte.writable and spte.mmu_writable
        assert spte.pfn == leaf(g.vm, gfn & ~511).pfn + (gfn & 511)     # same host frames
    assert bits(await g.vm.get_dirty_log(0)) == set()


@pytest.mark.tdp_only          # splits and recovers in place: the legacy MMU zaps
async def test_lazy_split_write_protects_huge_leaves_and_a_write_splits_one(make_guest):
    g = await make_guest(Backing.THP, 4 * MIB, eager_page_split=False)
    await run(g.vcpu, W, 0, 512)
    await set_log(g, True)
    assert pages(g.vm) == (0, 2, 0)
    huge = leaf(g.vm, 512)
    assert huge.large and not huge.writable and huge.mmu_writable

    await run(g.vcpu, W, 515)
    assert pages(g.vm) == (512, 1, 0)
    assert leaf(g.vm, 515).writable and not leaf(g.vm, 516).writable
    assert leaf(g.vm, 516).pfn == huge.pfn + 4


async def test_a_write_fault_that_maps_a_page_writable_logs_it(make_guest):
    g = await make_guest(Backing.THP, 4 * MIB, eager_page_split=False)
    await run(g.vcpu, W, 512)
    await set_log(g, True)
    await run(g.vcpu, W, 515, 900)          # the slow path splits, maps 4K writable
    assert bits(await g.vm.get_dirty_log(0)) == {515, 900}


async def test_enabling_an_unmapped_slot_still_flushes(make_guest):
    g = await make_guest(Backing.PAGE_4K, 1 * MIB)
    before = flushes(g.vm)
    await set_log(g, True)
    assert flushes(g.vm) == before + 1 and pages(g.vm) == (0, 0, 0)


@pytest.mark.tdp_only          # splits and recovers in place: the legacy MMU zaps
async def test_disable_recovers_huge_pages_with_the_same_frames_and_data(make_guest):
    g = await make_guest(Backing.THP, 4 * MIB)
    await g.vm.write_hva(g.region.hva + 0x3008, b"kept")
    await run(g.vcpu, W, 0, 512)
    frames = leaf(g.vm, 0).pfn, leaf(g.vm, 512).pfn
    tables = g.vm.stats()["tdp_mmu_pages"]
    await set_log(g, True)
    before = flushes(g.vm)

    await set_log(g, False)
    assert pages(g.vm) == (0, 2, 0)
    assert (leaf(g.vm, 5).pfn, leaf(g.vm, 700).pfn) == frames
    assert leaf(g.vm, 5).large
    assert g.vm.stats()["tdp_mmu_pages"] == tables
    assert flushes(g.vm) == before + 1          # tables replaced by huge leaves
    result = await g.vcpu.run(AccessBatch.build([(0x3008, R, 4, b"")]))
    assert result.read_data == b"kept"


async def test_disable_leaves_4k_where_the_host_maps_4k(make_guest):
    g = await logging_guest(make_guest)
    before = flushes(g.vm)
    await set_log(g, False)
    assert pages(g.vm) == (16, 0, 0) and flushes(g.vm) == before


@pytest.mark.tdp_only          # splits and recovers in place: the legacy MMU zaps
async def test_disable_recovers_only_what_the_lpage_rules_allow(kvm_vm):
    region = kvm_vm.mmap(4 * MIB, Backing.THP)
    # 3 MiB at gpa 2 MiB: the second 2M frame is only half in the slot, so 4K only.
    await kvm_vm.set_user_memory_region(0, 0, 2 * MIB, 3 * MIB, region.hva)
    vcpu = kvm_vm.create_vcpu(0)
    await run(vcpu, W, 512, 1100)
    assert pages(kvm_vm) == (1, 1, 0)
    await kvm_vm.set_user_memory_region(0, LOG, 2 * MIB, 3 * MIB, region.hva)
    assert pages(kvm_vm) == (513, 0, 0)
    await kvm_vm.set_user_memory_region(0, 0, 2 * MIB, 3 * MIB, region.hva)
    assert pages(kvm_vm) == (1, 1, 0)


@pytest.mark.tdp_only          # splits and recovers in place: the legacy MMU zaps
async def test_1g_pages_are_split_to_4k_and_recovered_whole(make_guest):
    g = await make_guest(Backing.HUGETLB_1G, GIB, gpa=GIB)
    base = GIB >> 12
    await run(g.vcpu, W, base + 7)
    frame = leaf(g.vm, base).pfn
    await set_log(g, True)
    assert pages(g.vm) == (1 << 18, 0, 0)
    assert leaf(g.vm, base + 513).pfn == frame + 513
    await set_log(g, False)
    assert pages(g.vm) == (0, 0, 1)
    assert leaf(g.vm, base + 513).pfn == frame


async def test_a_read_only_slot_is_neither_split_nor_protected(make_guest):
    g = await make_guest(Backing.THP, 4 * MIB, flags=KVM_MEM_READONLY)
    await run(g.vcpu, R, 0)
    before = flushes(g.vm)
    await g.vm.set_user_memory_region(0, KVM_MEM_READONLY | LOG, 0, 4 * MIB, g.region.hva)
    assert pages(g.vm) == (0, 1, 0) and flushes(g.vm) == before
    assert bits(await g.vm.get_dirty_log(0)) == set()


async def test_enabling_waits_for_a_lockless_fault_that_saw_the_slot_before(make_guest):
    """A fast page fault that looked at the slot before logging was on finishes before the
    slot is write-protected (KVM: synchronize_srcu), so the W it sets does not survive.

    The schedule seed turns the wall-clock time slice off (resched.py): the test's own
    point is the only task switch, so the vCPU retires its write before enabling logging
    goes on, whatever the machine's load (with a slice, a vCPU parked longer than it may
    give the loop away after the fixed fault, and its write then faults again, logged)."""
    g = await make_guest(Backing.THP, 4 * MIB, eager_page_split=False, schedule_seed=0)
    await run(g.vcpu, W, 0)
    await set_log(g, True)
    await set_log(g, False)              # the 2M leaf stays write-protected, MMU-writable
    huge = leaf(g.vm, 0)
    assert huge.large and not huge.writable and huge.mmu_writable
    at_cas, go = asyncio.Event(), asyncio.Event()

    async def point(name: str) -> None:
        if name == "fast_pf.cas":
            at_cas.set()
            await go.wait()

    g.vm.sched.point = point
    fault = asyncio.create_task(run(g.vcpu, W, 5))
    await at_cas.wait()                 # the fast path read the SPTE, the slot did not log
    enable = asyncio.create_task(set_log(g, True))
    for _ in range(20):                 # unprotected, enabling is done in far fewer turns
        await asyncio.sleep(0)
    assert not enable.done()
    go.set()
    await asyncio.gather(fault, enable)
    assert not leaf(g.vm, 0).writable and not leaf(g.vm, 5).writable
    # The fault used the slot it looked up first (KVM's fault->slot), which did not log:
    # its write came before enabling logging returned, so no harvest owes it.
    assert bits(await g.vm.get_dirty_log(0)) == set()


# -- KVM_GET_DIRTY_LOG ---------------------------------------------------------------------

async def test_get_reports_clears_and_reprotects_exactly_the_reported_pages(make_guest):
    g = await logging_guest(make_guest)
    await run(g.vcpu, W, 1, 2, 3)                  # the fast path gives W back and logs
    g.vm.mark_page_dirty(slot0(g.vm), 9)           # KVM's own write: no SPTE change
    before, flushed = leaves(g.vm, range(16)), flushes(g.vm)

    bitmap = await g.vm.get_dirty_log(0)
    assert len(bitmap) == 4 * MIB // 4096 // 8 and bits(bitmap) == {1, 2, 3, 9}
    after = leaves(g.vm, range(16))
    changed = {gfn for gfn in range(16) if after[gfn] != before[gfn]}
    assert changed == {1, 2, 3}
    assert all(before[gfn] ^ after[gfn] == 0b010 for gfn in changed)      # W, nothing else
    assert all(leaf(g.vm, gfn).mmu_writable for gfn in changed)
    assert flushes(g.vm) == flushed + 1

    assert bits(await g.vm.get_dirty_log(0)) == set()
    assert flushes(g.vm) == flushed + 1            # nothing reported: no flush


async def test_after_get_the_next_write_faults_and_is_logged_again(make_guest):
    g = await logging_guest(make_guest)
    await run(g.vcpu, W, 4)
    assert bits(await g.vm.get_dirty_log(0)) == {4}
    fast = g.vcpu.stats()["pf_fast"]
    await run(g.vcpu, W, 4)
    assert g.vcpu.stats()["pf_fast"] == fast + 1
    assert bits(await g.vm.get_dirty_log(0)) == {4}


async def test_the_bitmap_is_padded_to_64_bit_words(kvm_vm):
    region = kvm_vm.mmap(1000 * 4096, Backing.PAGE_4K)
    await kvm_vm.set_user_memory_region(3, LOG, 0, 1000 * 4096, region.hva)
    kvm_vm.mark_page_dirty(kvm_vm.memslot_sets[0].by_id[3], 999)
    bitmap = await kvm_vm.get_dirty_log(3)
    assert len(bitmap) == 128 and bits(bitmap) == {999}


@pytest.mark.parametrize("config, slot, err", [
    ({"dirty_ring_size": 4096}, 0, errno.ENXIO),
    ({}, 2 << 16, errno.EINVAL),
    ({}, 32764, errno.EINVAL),
    ({}, 1 << 32, errno.EINVAL),
    ({}, 5, errno.ENOENT),
    ({}, 1, errno.ENOENT),                     # exists, does not log
])
async def test_get_dirty_log_errors(make_guest, config, slot, err):
    g = await make_guest(Backing.PAGE_4K, 2 * MIB, flags=LOG, **config)
    region = g.vm.mmap(MIB, Backing.PAGE_4K)
    await g.vm.set_user_memory_region(1, 0, 4 * MIB, MIB, region.hva)
    if not config:
        g.vm.mark_page_dirty(slot0(g.vm), 3)
    with pytest.raises(KvmError) as e:
        await g.vm.get_dirty_log(slot)
    assert e.value.errno == err
    if not config:
        assert bits(await g.vm.get_dirty_log(0)) == {3}


# -- manual protect and KVM_CLEAR_DIRTY_LOG --------------------------------------------------

async def test_manual_protect_get_copies_without_clearing_or_protecting(make_guest):
    g = await logging_guest(make_guest, manual_dirty_log_protect=MANUAL)
    await run(g.vcpu, W, 1, 2)
    flushed = flushes(g.vm)
    assert bits(await g.vm.get_dirty_log(0)) == {1, 2}
    assert bits(await g.vm.get_dirty_log(0)) == {1, 2}
    assert leaf(g.vm, 1).writable and flushes(g.vm) == flushed


async def test_clear_clears_and_reprotects_exactly_the_given_pages(make_guest):
    g = await logging_guest(make_guest, touched=range(80), manual_dirty_log_protect=MANUAL)
    await run(g.vcpu, W, 1, 3, 70)
    flushed = flushes(g.vm)

    cleared = await g.vm.clear_dirty_log(0, 0, 128, bitmap_of({3, 70, 71}, 128))
    assert cleared == 2                            # 71 was not dirty
    assert bits(await g.vm.get_dirty_log(0)) == {1}
    assert [leaf(g.vm, gfn).writable for gfn in (1, 3, 70, 71)] == [True, False, False, False]
    assert flushes(g.vm) == flushed + 1

    assert await g.vm.clear_dirty_log(0, 0, 128, bitmap_of({3}, 128)) == 0
    assert flushes(g.vm) == flushed + 1            # nothing cleared: no flush


async def test_clear_works_without_manual_protect(make_guest):
    g = await logging_guest(make_guest)
    await run(g.vcpu, W, 5, 6)
    assert await g.vm.clear_dirty_log(0, 0, 64, bitmap_of({5}, 64)) == 1
    assert not leaf(g.vm, 5).writable and leaf(g.vm, 6).writable
    assert bits(await g.vm.get_dirty_log(0)) == {6}


@pytest.fixture
async def two_logged_slots(make_kvm_vm):
    """Slot 0: 1024 pages at gpa 0; slot 1: 1000 pages at 8 MiB; both logging, manual
    protect, every page dirty."""
    vm = make_kvm_vm(manual_dirty_log_protect=MANUAL)
    for slot, gpa, npages in ((0, 0, 1024), (1, 8 * MIB, 1000)):
        region = vm.mmap(npages * 4096, Backing.PAGE_4K)
        await vm.set_user_memory_region(slot, LOG, gpa, npages * 4096, region.hva)
        memslot = vm.memslot_sets[0].by_id[slot]
        for gfn in range(memslot.base_gfn, memslot.end_gfn):
            vm.mark_page_dirty(memslot, gfn)
    return vm


@pytest.mark.parametrize("slot, first_page, num_pages, cleared", [
    (0, 0, 64, 64),
    (0, 960, 64, 64),
    (0, 0, 1024, 1024),
    (0, 1024, 0, 0),               # first_page == npages, nothing
    (1, 960, 40, 40),              # not a multiple of 64, but reaches the end
    (1, 0, 1000, 1000),
])
async def test_clear_accepts_kvms_ranges(two_logged_slots, slot, first_page, num_pages,
                                         cleared):
    vm = two_logged_slots
    mask = bitmap_of(range(num_pages), num_pages)
    assert await vm.clear_dirty_log(slot, first_page, num_pages, mask) == cleared
    npages = vm.memslot_sets[0].by_id[slot].npages
    remaining = set(range(npages)) - set(range(first_page, first_page + num_pages))
    assert bits(await vm.get_dirty_log(slot)) == remaining


@pytest.mark.parametrize("slot, first_page, num_pages, size, err", [
    (0, 32, 64, 8, errno.EINVAL),          # first_page not a multiple of 64
    (0, 1, 0, 0, errno.EINVAL),
    (0, 0, 100, 16, errno.EINVAL),         # not a multiple of 64, short of the end
    (1, 960, 39, 8, errno.EINVAL),
    (0, 960, 128, 16, errno.EINVAL),       # past the end
    (1, 960, 41, 8, errno.EINVAL),
    (0, 1088, 0, 0, errno.EINVAL),         # first_page beyond npages
    (0, 0, 64, 7, errno.EINVAL),           # bitmap too short
    (0, 0, 64, 16, errno.EINVAL),          # bitmap too long
    (5, 0, 64, 8, errno.ENOENT),
    (2, 0, 64, 8, errno.ENOENT),
    (32764, 0, 64, 8, errno.EINVAL),
    (2 << 16, 0, 64, 8, errno.EINVAL),
    (0, -64, 64, 8, errno.EINVAL),
    (0, 0, 1 << 32, 8, errno.EINVAL),
])
async def test_clear_rejects_what_kvm_rejects_and_changes_nothing(two_logged_slots, slot,
                                                                  first_page, num_pages, size,
                                                                  err):
    vm = two_logged_slots
    region = vm.mmap(MIB, Backing.PAGE_4K)
    await vm.set_user_memory_region(2, 0, 16 * MIB, MIB, region.hva)     # not logging
    with pytest.raises(KvmError) as e:
        await vm.clear_dirty_log(slot, first_page, num_pages, b"\xff" * size)
    assert e.value.errno == err
    assert bits(await vm.get_dirty_log(0)) == set(range(1024))
    assert bits(await vm.get_dirty_log(1)) == set(range(1000))


async def test_clear_without_a_bitmap_is_enxio(make_guest):
    g = await make_guest(Backing.PAGE_4K, MIB, flags=LOG, dirty_ring_size=4096)
    with pytest.raises(KvmError) as e:
        await g.vm.clear_dirty_log(0, 0, 64, bytes(8))
    assert e.value.errno == errno.ENXIO


# -- KVM_DIRTY_LOG_INITIALLY_SET -------------------------------------------------------------

async def test_initially_set_starts_all_dirty_and_protects_nothing(make_guest):
    g = await make_guest(Backing.THP, 4 * MIB, manual_dirty_log_protect=MANUAL | INITIALLY_SET)
    await run(g.vcpu, W, 0, 512)
    before = flushes(g.vm)
    await set_log(g, True)
    assert pages(g.vm) == (0, 2, 0) and flushes(g.vm) == before
    assert leaf(g.vm, 0).writable and leaf(g.vm, 512).writable
    assert await g.vm.get_dirty_log(0) == b"\xff" * 128


@pytest.mark.tdp_only          # splits in place: the legacy MMU zaps
@pytest.mark.parametrize("eager", [True, False])
async def test_initially_set_clear_protects_the_huge_pages_around_the_range(make_guest,
                                                                            eager):
    g = await make_guest(Backing.THP, 4 * MIB, manual_dirty_log_protect=MANUAL | INITIALLY_SET,
                         eager_page_split=eager)
    await run(g.vcpu, W, 0, 512)
    await set_log(g, True)
    assert await g.vm.clear_dirty_log(0, 64, 64, bitmap_of(range(64), 64)) == 64
    untouched = leaf(g.vm, 512)
    assert untouched.large and untouched.writable
    if eager:
        assert pages(g.vm) == (512, 1, 0)
        assert [leaf(g.vm, gfn).writable for gfn in (63, 64, 127, 128)] == \
            [True, False, False, True]
    else:
        huge = leaf(g.vm, 64)
        assert pages(g.vm) == (0, 2, 0)
        assert huge.large and not huge.writable and not huge.mmu_writable
        await run(g.vcpu, W, 100)                  # the slow path splits it
        assert pages(g.vm) == (512, 1, 0) and leaf(g.vm, 100).writable


# -- dirty rings -----------------------------------------------------------------------------

@pytest.mark.parametrize("config, err", [
    ({"dirty_ring_size": 2048}, errno.EINVAL),
    ({"dirty_ring_size": 3 * 4096}, errno.EINVAL),
    ({"dirty_ring_size": -4096}, errno.EINVAL),
    ({"dirty_ring_size": 2 << 20}, errno.E2BIG),
    ({"dirty_ring_with_bitmap": True}, errno.EINVAL),
    ({"manual_dirty_log_protect": INITIALLY_SET}, errno.EINVAL),
    ({"manual_dirty_log_protect": 4}, errno.EINVAL),
    ({"manual_dirty_log_protect": MANUAL | 4}, errno.EINVAL),
])
def test_bad_dirty_log_configs_are_refused(config, err):
    with pytest.raises(KvmError) as e:
        VmConfig(**config).validate()
    assert e.value.errno == err


@pytest.mark.parametrize("config", [
    {"dirty_ring_size": 4096}, {"dirty_ring_size": 1 << 20},
    {"dirty_ring_size": 8192, "dirty_ring_with_bitmap": True},
    {"manual_dirty_log_protect": MANUAL}, {"manual_dirty_log_protect": MANUAL | INITIALLY_SET},
])
def test_good_dirty_log_configs_are_accepted(config):
    VmConfig(**config).validate()


async def test_every_vcpu_gets_a_ring_of_the_configured_size(make_kvm_vm):
    vm = make_kvm_vm(dirty_ring_size=8192)
    ring = vm.create_vcpu(0).dirty_ring
    assert (ring.size, ring.soft_limit) == (512, 448)
    assert make_kvm_vm().create_vcpu(0).dirty_ring is None


def test_the_ring_is_soft_full_at_size_minus_the_reserved_entries():
    ring = DirtyRing(256)
    assert not any(ring.push(0, i) for i in range(191))
    assert not ring.soft_full()
    assert ring.push(0, 191) and ring.soft_full()
    assert len(ring.harvest()) == 192 and ring.soft_full()     # harvested, not reset
    ring.recycle(192)
    assert not ring.soft_full() and ring.used == 0
    for i in range(256):
        ring.push(1, i)
    with pytest.raises(VmBugged):
        ring.push(1, 256)


async def test_ring_push_harvest_and_reset(make_guest):
    g = await logging_guest(make_guest, dirty_ring_size=4096)
    vcpu1 = g.vm.create_vcpu(1)
    await run(g.vcpu, W, 1, 2)                     # the fast path logs into vCPU 0's ring
    g.vm.mark_page_dirty(slot0(g.vm), 7, vcpu1)
    assert g.vm.harvest_dirty_ring(0) == [DirtyGfn(0, 1), DirtyGfn(0, 2)]
    assert g.vm.harvest_dirty_ring(0) == []
    g.vm.mark_page_dirty(slot0(g.vm), 5, g.vcpu)  # published, not harvested
    flushed = flushes(g.vm)

    assert await g.vm.reset_dirty_rings() == 2    # vCPU 1's entry is not harvested yet
    assert not leaf(g.vm, 1).writable and not leaf(g.vm, 2).writable
    assert flushes(g.vm) == flushed + 1
    assert (g.vcpu.dirty_ring.reset_index, g.vcpu.dirty_ring.dirty_index) == (2, 3)
    assert g.vm.harvest_dirty_ring(1) == [DirtyGfn(0, 7)]
    assert g.vm.harvest_dirty_ring(0) == [DirtyGfn(0, 5)]
    assert await g.vm.reset_dirty_rings() == 2
    assert await g.vm.reset_dirty_rings() == 0
    assert flushes(g.vm) == flushed + 2            # the empty reset did not flush


async def test_a_ring_entry_names_the_slot_and_the_offset(make_kvm_vm):
    vm = make_kvm_vm(dirty_ring_size=4096)
    region = vm.mmap(MIB, Backing.PAGE_4K)
    await vm.set_user_memory_region(1 << 16 | 4, LOG, 8 * MIB, MIB, region.hva)
    vcpu = vm.create_vcpu(0)
    vm.mark_page_dirty(vm.memslot_sets[1].by_id[4], (8 * MIB >> 12) + 9, vcpu)
    assert vm.harvest_dirty_ring(0) == [DirtyGfn(1 << 16 | 4, 9)]


def test_reset_batches_one_slot_within_64_pages_forwards_and_backwards():
    entries = [DirtyGfn(s, o) for s, o in
               [(0, 10), (0, 12), (0, 73), (0, 5), (0, 200), (1, 200), (0, 201)]]
    assert coalesce(entries) == [(0, 10, 1 | 1 << 2 | 1 << 63), (0, 5, 1), (0, 200, 1),
                                 (1, 200, 1), (0, 201, 1)]
    backwards = [DirtyGfn(0, o) for o in (70, 65, 66, 6)]
    assert coalesce(backwards) == [(0, 65, 1 | 1 << 1 | 1 << 5), (0, 6, 1)]
    sliding = [DirtyGfn(0, o) for o in (70, 65, 66, 7)]       # 7..70 is one window
    assert coalesce(sliding) == [(0, 7, 1 | 1 << 58 | 1 << 59 | 1 << 63)]


async def test_ring_only_vms_have_no_bitmap(make_guest):
    g = await logging_guest(make_guest, dirty_ring_size=4096)
    assert slot0(g.vm).dirty_bitmap is None
    g.vm.mark_page_dirty(slot0(g.vm), 3)          # no vCPU, no bitmap: not recorded
    assert g.vm.harvest_dirty_ring(0) == []
    with pytest.raises(KvmError) as e:
        await g.vm.get_dirty_log(0)
    assert e.value.errno == errno.ENXIO


async def test_ring_with_bitmap_logs_writes_without_a_vcpu_in_the_bitmap(make_guest):
    g = await logging_guest(make_guest, dirty_ring_size=4096, dirty_ring_with_bitmap=True)
    g.vm.mark_page_dirty(slot0(g.vm), 3)
    g.vm.mark_page_dirty(slot0(g.vm), 4, g.vcpu)
    assert bits(await g.vm.get_dirty_log(0)) == {3}
    assert g.vm.harvest_dirty_ring(0) == [DirtyGfn(0, 4)]


async def test_ring_calls_without_a_ring(make_guest):
    g = await logging_guest(make_guest)
    for call in (g.vm.reset_dirty_rings(),):
        with pytest.raises(KvmError) as e:
            await call
        assert e.value.errno == errno.EINVAL
    with pytest.raises(KvmError) as e:
        g.vm.harvest_dirty_ring(0)
    assert e.value.errno == errno.EINVAL
    ring_vm = await logging_guest(make_guest, dirty_ring_size=4096)
    with pytest.raises(KvmError) as e:
        ring_vm.vm.harvest_dirty_ring(3)
    assert e.value.errno == errno.ENOENT


async def test_a_vcpu_whose_ring_is_soft_full_exits_until_reset(make_guest):
    g = await logging_guest(make_guest, touched=range(256), dirty_ring_size=4096)
    result = await g.vcpu.run(AccessBatch.build([(gfn << 12, W, 8, None)
                                                 for gfn in range(256)]))
    assert result.exit.reason.name == "DIRTY_RING_FULL"
    # The fault on page 191 pushed the 192nd entry (the soft limit): the vCPU leaves at
    # its next entry, before that write is executed again.
    assert result.completed == 191
    rest = AccessBatch.build([(gfn << 12, W, 8, None) for gfn in range(191, 256)])
    again = await g.vcpu.run(rest)                          # not reset: may not enter
    assert again.exit.reason.name == "DIRTY_RING_FULL" and again.completed == 0
    assert len(g.vm.harvest_dirty_ring(0)) == 192
    assert await g.vm.reset_dirty_rings() == 192
    done = await g.vcpu.run(rest)                           # room again: the guest enters
    assert done.exit.reason.name == "DONE" and done.completed == 65
    assert len(g.vm.harvest_dirty_ring(0)) == 65            # 191 was write-protected again


# -- the no-lost-dirty-page oracle -----------------------------------------------------------

async def test_the_oracle_accepts_writes_the_harvest_reports(make_guest):
    g = await logging_guest(make_guest)
    san = g.vm.sanitizers
    await run(g.vcpu, W, 2)
    san.guest_wrote(slot0(g.vm), 2)
    assert bits(await g.vm.get_dirty_log(0)) == {2}
    assert san.dirty_pages_checked == 1 and san.dirty_written[0] == set()


async def test_the_oracle_catches_a_write_no_harvest_reports(make_guest):
    g = await logging_guest(make_guest)
    g.vm.sanitizers.guest_wrote(slot0(g.vm), 7)    # as if W had been given back silently
    with pytest.raises(SanitizerViolation) as e:
        await g.vm.get_dirty_log(0)
    assert e.value.oracle == NO_LOST_DIRTY_PAGE and e.value.gfn == 7
    assert g.vm.info().dead


async def test_the_oracle_with_manual_protect_follows_clear(make_guest):
    g = await logging_guest(make_guest, manual_dirty_log_protect=MANUAL)
    slot = slot0(g.vm)
    await run(g.vcpu, W, 3)
    g.vm.sanitizers.guest_wrote(slot, 3)
    assert bits(await g.vm.get_dirty_log(0)) == {3}
    assert await g.vm.clear_dirty_log(0, 0, 64, bitmap_of({3}, 64)) == 1
    await run(g.vcpu, W, 3)                        # faults again and logs
    g.vm.sanitizers.guest_wrote(slot, 3)
    assert bits(await g.vm.get_dirty_log(0)) == {3}
    assert await g.vm.clear_dirty_log(0, 0, 64, bitmap_of({3}, 64)) == 1
    g.vm.sanitizers.guest_wrote(slot, 3)           # a write nothing logged
    with pytest.raises(SanitizerViolation):
        await g.vm.clear_dirty_log(0, 0, 64, bitmap_of({3}, 64))


async def test_the_oracle_follows_ring_harvests_and_resets(make_guest):
    g = await logging_guest(make_guest, dirty_ring_size=4096)
    slot = slot0(g.vm)
    await run(g.vcpu, W, 6)
    g.vm.sanitizers.guest_wrote(slot, 6)
    assert g.vm.harvest_dirty_ring(0) == [DirtyGfn(0, 6)]
    g.vm.sanitizers.guest_wrote(slot, 6)           # harvested, not reset: still covered
    assert await g.vm.reset_dirty_rings() == 1
    g.vm.sanitizers.guest_wrote(slot, 6)           # after the reset nothing logged it
    with pytest.raises(SanitizerViolation) as e:
        g.vm.harvest_dirty_ring(0)
    assert e.value.oracle == NO_LOST_DIRTY_PAGE


async def test_the_oracle_watches_a_slot_only_while_it_logs(make_guest):
    g = await make_guest(Backing.PAGE_4K, MIB)
    g.vm.sanitizers.guest_wrote(slot0(g.vm), 1)    # not logging: nothing to report
    await set_log(g, True)
    assert await g.vm.get_dirty_log(0) == bytes(32)
    g.vm.sanitizers.guest_wrote(slot0(g.vm), 1)
    await set_log(g, False)
    assert g.vm.sanitizers.dirty_written == {}


@pytest.mark.parametrize("knobs", [frozenset(), frozenset({"skip_wrprot_flush"})])
async def test_a_write_through_a_tlb_entry_left_by_a_skipped_flush_is_lost(make_guest,
                                                                           knobs):
    g = await logging_guest(make_guest, debug=knobs)  # the reads filled writable TLB entries
    await run(g.vcpu, W, 3)
    g.vm.sanitizers.guest_wrote(slot0(g.vm), 3)      # what the vCPU reports of the write
    if knobs:
        with pytest.raises(SanitizerViolation) as e:
            await g.vm.get_dirty_log(0)
        assert e.value.oracle == NO_LOST_DIRTY_PAGE and e.value.gfn == 3
    else:
        assert bits(await g.vm.get_dirty_log(0)) == {3}


async def test_real_guest_writes_reach_the_oracle(make_guest):
    g = await logging_guest(make_guest, touched=())
    await run(g.vcpu, W, 1, 2, 300)               # never mapped before: the slow path
    assert g.vm.sanitizers.dirty_written[0] == {1, 2, 300}
    assert bits(await g.vm.get_dirty_log(0)) == {1, 2, 300}


async def test_a_reset_recycles_entries_only_once_their_pages_are_protected(make_guest):
    """KVM_RESET_DIRTY_RINGS: a write made while the reset waits for mmu_lock goes
    through the writable TLB entry the page still has, so the harvested entry must keep
    covering the page until it is write-protected and TLBs are flushed; the first write
    after the reset faults and is logged again."""
    g = await logging_guest(make_guest, dirty_ring_size=4096)
    await run(g.vcpu, W, 6)                        # logged; the TLB now grants W
    assert g.vm.harvest_dirty_ring(0) == [DirtyGfn(0, 6)]
    await g.vm.mmu_lock.acquire_write()
    reset = asyncio.create_task(g.vm.reset_dirty_rings())
    for _ in range(5):
        await asyncio.sleep(0)                     # the reset waits to protect page 6
    taken = g.vcpu.stats()["pf_taken"]
    await run(g.vcpu, W, 6)                        # a TLB hit: no fault, no new entry
    assert g.vcpu.stats()["pf_taken"] == taken and not reset.done()
    g.vm.mmu_lock.release_write()
    assert await reset == 1
    assert g.vm.harvest_dirty_ring(0) == []        # the oracle: that write was covered
    await run(g.vcpu, W, 6)
    assert g.vcpu.stats()["pf_taken"] == taken + 1
    assert g.vm.harvest_dirty_ring(0) == [DirtyGfn(0, 6)]


# -- KVM_ENABLE_CAP on a live VM -------------------------------------------------------------

@pytest.mark.parametrize("cap, flags, args, err", [
    (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 0, [2], errno.EINVAL),     # INITIALLY_SET alone
    (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 0, [4], errno.EINVAL),
    (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 1, [1], errno.EINVAL),     # any flags
    (KVM_CAP_DIRTY_LOG_RING, 0, [3 * 4096], errno.EINVAL),
    (KVM_CAP_DIRTY_LOG_RING, 0, [2048], errno.EINVAL),
    (KVM_CAP_DIRTY_LOG_RING, 0, [2 << 20], errno.E2BIG),
    (KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP, 0, [], errno.EINVAL),     # no ring yet
    (7, 0, [], errno.EINVAL),                                      # not a capability here
    (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 0, [1, 0, 0, 0, 0], errno.EINVAL),   # five args
])
async def test_enable_cap_refuses_what_kvm_refuses_and_changes_nothing(kvm_vm, cap, flags,
                                                                       args, err):
    before = kvm_vm.info()
    with pytest.raises(KvmError) as e:
        await kvm_vm.enable_cap(cap, flags, args)
    assert e.value.errno == err
    assert kvm_vm.info() == before


async def test_manual_protect_enabled_live_takes_effect_at_the_next_get(make_guest):
    g = await logging_guest(make_guest)
    await run(g.vcpu, W, 3)
    await g.vm.enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 0, [MANUAL])
    assert g.vm.info().config.manual_dirty_log_protect == MANUAL
    assert bits(await g.vm.get_dirty_log(0)) == {3}
    assert bits(await g.vm.get_dirty_log(0)) == {3}          # manual: GET does not clear
    await g.vm.enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 0, [0])   # 0 turns it off
    assert bits(await g.vm.get_dirty_log(0)) == {3}
    assert bits(await g.vm.get_dirty_log(0)) == set()


async def test_initially_set_enabled_after_a_slot_logs_leaves_its_bitmap_until_toggled(
        make_guest):
    g = await logging_guest(make_guest)
    await g.vm.enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 0, [MANUAL | INITIALLY_SET])
    assert bits(await g.vm.get_dirty_log(0)) == set()        # the bitmap it had: empty
    await set_log(g, False)
    await set_log(g, True)                                    # a new bitmap: all ones
    assert bits(await g.vm.get_dirty_log(0)) == set(range(1024))


async def test_dirty_ring_is_enabled_once_and_before_the_first_vcpu(make_kvm_vm):
    vm = make_kvm_vm()
    await vm.enable_cap(KVM_CAP_DIRTY_LOG_RING, 0, [8192])
    with pytest.raises(KvmError) as e:
        await vm.enable_cap(KVM_CAP_DIRTY_LOG_RING, 0, [8192])          # once
    assert e.value.errno == errno.EINVAL
    assert vm.create_vcpu(0).dirty_ring.size == 512
    late = make_kvm_vm()
    late.create_vcpu(0)
    with pytest.raises(KvmError) as e:
        await late.enable_cap(KVM_CAP_DIRTY_LOG_RING, 0, [4096])        # a vCPU exists
    assert e.value.errno == errno.EINVAL and late.info().config.dirty_ring_size == 0


async def test_ring_with_bitmap_needs_a_ring_and_no_memslot(make_kvm_vm):
    vm = make_kvm_vm()
    await vm.enable_cap(KVM_CAP_DIRTY_LOG_RING, 0, [4096])
    await vm.enable_cap(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)
    assert vm.info().config.dirty_ring_with_bitmap
    other = make_kvm_vm(dirty_ring_size=4096)
    region = other.mmap(MIB, Backing.PAGE_4K)
    await other.set_user_memory_region(0, 0, 0, MIB, region.hva)
    with pytest.raises(KvmError) as e:
        await other.enable_cap(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)
    assert e.value.errno == errno.EINVAL and not other.info().config.dirty_ring_with_bitmap


@pytest.mark.parametrize("manual", [False, True])
async def test_get_and_clear_flush_after_dropping_mmu_lock(make_guest, manual):
    """kvm_get_dirty_log_protect and kvm_clear_dirty_log_protect: protect under
    mmu_lock, flush once it is dropped (and before the ioctl returns)."""
    g = await logging_guest(make_guest, manual_dirty_log_protect=MANUAL if manual else 0)
    await run(g.vcpu, W, 3)
    flushes_seen = []
    flush = g.vm.flush_remote_tlbs

    def recording_flush() -> None:
        flushes_seen.append(g.vm.mmu_lock.held_for_write())
        flush()

    g.vm.flush_remote_tlbs = recording_flush
    bitmap = await g.vm.get_dirty_log(0)
    if manual:
        assert await g.vm.clear_dirty_log(0, 0, 64, bitmap[:8]) == 1
    assert flushes_seen == [False]
    assert not leaf(g.vm, 3).writable


async def test_after_dirty_ring_full_a_resume_goes_on_with_the_batch(make_guest):
    g = await logging_guest(make_guest, touched=range(256), dirty_ring_size=4096)
    batch = AccessBatch.build([(gfn << 12, W, 8, None) for gfn in range(256)])
    assert (await g.vcpu.run(batch)).exit.reason is ExitReason.DIRTY_RING_FULL
    g.vm.harvest_dirty_ring(0)
    await g.vm.reset_dirty_rings()
    result = await g.vcpu.run()                             # KVM_RUN again, no new batch
    assert (result.exit.reason, result.completed) == (ExitReason.DONE, 256)
