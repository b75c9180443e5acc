"""Lockless aging: clear_young / clear_flush_young / test_young (reference §4.7, seed 000)."""

from __future__ import annotations

import asyncio
import errno

import pytest

from vmmu.server.kvm import PROT_READ
from vmmu.server.kvm import AccessBatch, AccessKind, Backing, ExitReason, KvmError
from vmmu.server.kvm import spte as S
from vmmu.server.kvm.mmu_page import UseAfterFree
from vmmu.server.kvm.sched import POINTS

MIB = 1 << 20
PAGE = 4096
R = AccessKind.READ


async def touch(vcpu, *gpas):
    result = await vcpu.run(AccessBatch.build([(gpa, R, 8, None) for gpa in gpas]))
    assert result.exit.reason is ExitReason.DONE


def leaf(vm, gpa):
    path = vm.walk(gpa)
    assert path[-1].kind == "leaf", path
    return path[-1]


def park_at(vm, monkeypatch, point: str):
    """Make the first task that reaches `point` wait there: (reached, resume) events."""
    assert point in POINTS
    reached, resume = asyncio.Event(), asyncio.Event()
    passthrough = vm.sched.point

    async def parked(name: str) -> None:
        if name == point and not resume.is_set():
            reached.set()
            await resume.wait()
        else:
            await passthrough(name)

    monkeypatch.setattr(vm.sched, "point", parked)
    return reached, resume


@pytest.mark.parametrize("ad_bits", [True, False], ids=["ad", "no-ad"])
async def test_young_after_an_access_old_after_clear_young(make_guest, ad_bits):
    g = await make_guest(Backing.PAGE_4K, 4 * MIB, ad_bits=ad_bits)
    vm, hva = g.vm, g.hva(0x3000)
    assert not vm.test_young(hva)                      # nothing maps it yet
    await touch(g.vcpu, 0x3000)
    before = leaf(vm, 0x3000)
    assert vm.test_young(hva) and before.accessed

    assert await vm.clear_young(hva, hva + PAGE)

    assert not vm.test_young(hva) and not await vm.clear_young(hva, hva + PAGE)
    aged = leaf(vm, 0x3000)
    assert aged.pfn == before.pfn and not aged.accessed
    if ad_bits:
        assert aged.spte == before.spte & ~S.ACCESSED          # only bit 8 went
    else:                                                    # access-tracked: R/X saved
        assert S.is_access_track(aged.spte) and S.is_shadow_present(aged.spte)
        assert not (aged.readable or aged.writable or aged.executable)
        assert S.restore_access_track(aged.spte) & S.RWX == S.READABLE | S.EXECUTABLE


@pytest.mark.parametrize("ad_bits", [True, False], ids=["ad", "no-ad"])
async def test_the_next_access_after_a_flush_makes_the_page_young_again(make_guest, ad_bits):
    g = await make_guest(Backing.PAGE_4K, 4 * MIB, ad_bits=ad_bits)
    vm, vcpu, hva = g.vm, g.vcpu, g.hva(0x3000)
    await touch(vcpu, 0x3000)
    pfn = leaf(vm, 0x3000).pfn
    await vm.clear_young(hva, hva + PAGE)
    faults = vcpu.stats()["pf_fixed"]

    await touch(vcpu, 0x3000)                  # aging flushed nothing: a TLB hit, unseen
    assert not vm.test_young(hva)

    vm.flush_remote_tlbs()
    await touch(vcpu, 0x3000)

    assert vm.test_young(hva) and leaf(vm, 0x3000).pfn == pfn
    restored = leaf(vm, 0x3000)
    assert restored.readable and restored.accessed
    # With A/D on the walker sets A; with A/D off the fault path rebuilds the SPTE.
    assert vcpu.stats()["pf_fixed"] == faults + (0 if ad_bits else 1)


async def test_aging_never_flushes_zaps_or_frees(kvm_guest):
    vm = kvm_guest.vm
    await touch(kvm_guest.vcpu, 0x0, 0x200000)
    stats = vm.stats()
    freed = vm.mmu.tables.freed
    region = kvm_guest.region
    assert await vm.clear_flush_young(region.hva, region.hva + region.size)
    after = vm.stats()
    for name in ("remote_tlb_flush_requests", "pages_4k", "pages_2m", "tdp_mmu_pages",
                 "mmu_invalidate_seq"):
        assert after[name] == stats[name], name
    assert vm.mmu.tables.freed == freed


async def test_aging_takes_no_mmu_lock(kvm_guest):
    vm, hva = kvm_guest.vm, kvm_guest.region.hva
    await touch(kvm_guest.vcpu, 0x0)
    await vm.mmu_lock.acquire_write()          # a zap holds the lock: aging does not wait
    try:
        assert await asyncio.wait_for(vm.clear_young(hva, hva + 4 * MIB), 1)
        assert not vm.test_young(hva)
    finally:
        vm.mmu_lock.release_write()


async def test_young_bitmap_has_a_bit_per_page_lsb_first(make_guest):
    g = await make_guest(Backing.THP, 4 * MIB)
    vm, hva = g.vm, g.region.hva
    await vm.mprotect(hva + 0x1FF000, PAGE, PROT_READ)   # so the first frame maps 4K
    await touch(g.vcpu, 0x0, 0x2000, 0x9000, 0x200000)         # the second frame maps 2M

    bitmap = vm.young_bitmap(hva, hva + 4 * MIB)

    assert len(bitmap) == 1024 // 8
    assert bitmap[0] == 0b0000_0101 and bitmap[1] == 0b0000_0010
    assert not any(bitmap[2:64])
    assert bitmap[64:] == b"\xff" * 64                         # the young 2M leaf
    assert vm.young_bitmap(hva + 0x2100, hva + 0x2101) == b"\x01"
    await vm.clear_young(hva + 0x200000, hva + 0x201000)      # ages the whole 2M leaf
    assert not any(vm.young_bitmap(hva, hva + 4 * MIB)[64:])


async def test_aging_outside_every_memslot_is_not_young(kvm_vm):
    region = kvm_vm.mmap(2 * MIB, Backing.PAGE_4K)
    assert not await kvm_vm.clear_young(region.hva, region.hva + 2 * MIB)
    assert kvm_vm.young_bitmap(region.hva, region.hva + 16 * PAGE) == bytes(2)


@pytest.mark.parametrize("start, end, code", [(0x2000, 0x2000, errno.EINVAL),
                                              (0x3000, 0x2000, errno.EINVAL),
                                              (0, 1 << 47, errno.E2BIG)])
async def test_bad_aging_ranges(kvm_vm, start, end, code):
    with pytest.raises(KvmError) as err:
        kvm_vm.young_bitmap(start, end)
    assert err.value.errno == code
    if code == errno.EINVAL:
        with pytest.raises(KvmError):
            await kvm_vm.clear_young(start, end)


@pytest.mark.tdp_only          # the TDP MMU's lockless walk (rmap aging: test_shadow_mmu.py)
@pytest.mark.parametrize("ad_bits", [True, False], ids=["ad", "no-ad"])
async def test_aging_never_revives_an_spte_zapped_between_read_and_clear(make_guest,
                                                                         monkeypatch, ad_bits):
    """The read and the clear are two steps: a zap in between must win (the fetch-and
    finds no present leaf, the cmpxchg fails)."""
    g = await make_guest(Backing.PAGE_4K, 4 * MIB, ad_bits=ad_bits)
    vm, hva = g.vm, g.hva(0x1000)
    await touch(g.vcpu, 0x1000)
    reached, resume = park_at(vm, monkeypatch, "age.before_clear")
    aging = asyncio.create_task(vm.clear_young(hva, hva + PAGE))
    await reached.wait()

    await vm.madvise_dontneed(hva, PAGE)                       # the zap, while aging waits
    resume.set()

    assert await aging                                           # it was young when read
    assert vm.walk(0x1000)[-1].kind == "non-present"
    assert vm.walk(0x1000)[-1].spte == S.NONPRESENT


@pytest.mark.tdp_only          # the TDP MMU's lockless walk (rmap aging: test_shadow_mmu.py)
async def test_rcu_keeps_the_tables_aging_reads_while_a_memslot_delete_frees_them(
        kvm_guest, monkeypatch):
    vm, hva = kvm_guest.vm, kvm_guest.region.hva
    await touch(kvm_guest.vcpu, 0x0, 0x1000)
    freed = vm.mmu.tables.freed
    reached, resume = park_at(vm, monkeypatch, "age.before_clear")
    aging = asyncio.create_task(vm.clear_young(hva, hva + 4 * MIB))
    await reached.wait()

    await vm.set_user_memory_region(0, 0, 0, 0, 0)             # delete: every table goes
    assert vm.mmu.tables.freed == freed                         # ...after the grace period
    resume.set()

    assert await aging and not vm.info().dead
    assert vm.mmu.tables.freed > freed


@pytest.mark.tdp_only          # the TDP MMU's lockless walk (rmap aging: test_shadow_mmu.py)
@pytest.mark.parametrize("knob", ["aging_without_rcu", "free_tables_immediately"])
async def test_without_the_grace_period_aging_reads_a_freed_table(make_guest, monkeypatch,
                                                                  knob):
    g = await make_guest(Backing.PAGE_4K, 4 * MIB, debug=frozenset({knob}))
    vm, hva = g.vm, g.region.hva
    await touch(g.vcpu, 0x0, 0x1000)
    reached, resume = park_at(vm, monkeypatch, "age.before_clear")
    aging = asyncio.create_task(vm.clear_young(hva, hva + 4 * MIB))
    await reached.wait()

    await vm.set_user_memory_region(0, 0, 0, 0, 0)
    resume.set()

    with pytest.raises(UseAfterFree):
        await aging
    assert vm.info().dead


@pytest.mark.tdp_only          # the TDP MMU's lockless walk (rmap aging: test_shadow_mmu.py)
async def test_aging_emits_its_tracepoints(kvm_guest):
    vm, hva = kvm_guest.vm, kvm_guest.region.hva
    await touch(kvm_guest.vcpu, 0x5000)
    sub = vm.tracer.subscribe(frozenset({"kvm_age_hva", "kvm_test_age_hva",
                                         "kvm_tdp_mmu_spte_changed"}))
    vm.test_young(hva + 0x5000)
    await vm.clear_young(hva, hva + 4 * MIB)
    events = [await sub.get() for _ in range(3)]
    sub.close()
    assert [(e.event, e.fields.get("young")) for e in events] == [
        ("kvm_test_age_hva", True), ("kvm_tdp_mmu_spte_changed", None),
        ("kvm_age_hva", True)]
    changed = events[1].fields
    assert changed["old"] & ~changed["new"] == S.ACCESSED and changed["level"] == 2
