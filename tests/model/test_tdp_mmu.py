"""The TDP MMU's SPTE doors: linking, splitting, replacing tables, and the invariants."""

from __future__ import annotations

import pytest

from vmmu.server.kvm import (KVM_MEM_LOG_DIRTY_PAGES, AccessBatch, AccessKind, Backing,
                             ExitReason, VmBugged)
from vmmu.server.kvm import spte as S
from vmmu.server.kvm.mmu_internal import PFERR_USER_MASK, PageFault, RetPf
from vmmu.server.kvm.mmu_lock import LockAssertion
from vmmu.server.kvm.tdp_iter import TdpIter
from vmmu.server.kvm.types import PG_LEVEL_2M, PG_LEVEL_4K

MIB = 1 << 20
R, W = AccessKind.READ, AccessKind.WRITE
pytestmark = pytest.mark.tdp_only


async def touch(vcpu, *gpas):
    result = await vcpu.run(AccessBatch.build([(gpa, R, 8, None) for gpa in gpas]))
    assert result.exit.reason is ExitReason.DONE


async def test_a_huge_fault_replaces_a_table_flushes_and_frees_it(make_guest):
    """The host split the THP (KVM refaulted at 4K), then collapsed it: the invalidation
    zapped the 4K leaves but kept their table, and the next fault maps the 2M frame whole
    in its place."""
    g = await make_guest(Backing.THP, 4 * MIB)
    vm, vcpu = g.vm, g.vcpu
    await vcpu.run(AccessBatch.build([(0x1000, W, 4, b"keep")]))
    await vm.thp_split(g.region.hva)
    await touch(vcpu, 0x1000)
    assert vm.walk(0x1000)[-1].level == PG_LEVEL_4K
    await vm.thp_collapse(g.region.hva)
    table_pfn = vm.walk(0x2000)[-2].pfn
    before = vm.stats()

    await touch(vcpu, 0x2000)

    leaf = vm.walk(0x1000)[-1]
    assert (leaf.level, leaf.kind, leaf.large) == (PG_LEVEL_2M, "leaf", True)
    after = vm.stats()
    assert (after["pages_4k"], after["pages_2m"]) == (0, 1)
    assert after["remote_tlb_flush"] == before["remote_tlb_flush"] + 1
    assert after["tdp_mmu_pages"] == before["tdp_mmu_pages"] - 1
    assert table_pfn not in vm.tdp.tables.by_pfn                 # freed (no reader held it)
    result = await vcpu.run(AccessBatch.build([(0x1000, R, 4, b"")]))
    assert result.read_data == b"keep"                           # same host frame


async def test_splitting_a_huge_leaf_keeps_every_translation(kvm_guest):
    vm, vcpu = kvm_guest.vm, kvm_guest.vcpu
    await touch(vcpu, 0x0)
    huge = vm.walk(0x0)[-1]
    assert huge.level == PG_LEVEL_2M
    flushes = vm.stats()["remote_tlb_flush"]

    fault = PageFault(0x5000, PFERR_USER_MASK)
    fault.slot = vm.memslot_sets[0].lookup(5)
    fault.pfn, fault.map_writable, fault.goal_level = huge.pfn + 5, True, PG_LEVEL_4K
    async with vm.mmu_lock.read:
        assert vm.tdp.map(fault, vcpu.root) is RetPf.SPURIOUS        # the split child fits

    stats = vm.stats()
    assert (stats["pages_4k"], stats["pages_2m"]) == (512, 0)
    assert stats["remote_tlb_flush"] == flushes                      # a split needs no flush
    for gfn in (0, 5, 511):
        child = vm.walk(gfn << 12)[-1]
        assert (child.level, child.pfn, child.large) == (PG_LEVEL_4K, huge.pfn + gfn, False)
        assert child.spte & ~S.BASE_ADDR_MASK == huge.spte & ~(S.BASE_ADDR_MASK | S.LARGE)


async def test_a_present_leaf_never_changes_pfn_in_place(kvm_guest):
    vm = kvm_guest.vm
    old = S.make_leaf(0x1000, PG_LEVEL_4K, host_writable=True, writable=True, ad_enabled=True)
    new = S.make_leaf(0x2000, PG_LEVEL_4K, host_writable=True, writable=True, ad_enabled=True)
    with pytest.raises(VmBugged, match="changed pfn"):
        vm.tdp.handle_changed_spte(0, 7, old, new, PG_LEVEL_4K, shared=False)


async def test_an_illegal_writable_combination_is_a_bug(kvm_guest):
    bad = S.make_leaf(0x1000, PG_LEVEL_4K, host_writable=True, writable=True,
                      ad_enabled=True) & ~S.MMU_WRITABLE
    with pytest.raises(VmBugged, match="illegal writable"):
        kvm_guest.vm.tdp.handle_changed_spte(0, 7, S.NONPRESENT, bad, PG_LEVEL_4K,
                                             shared=False)


async def test_atomic_write_fails_on_a_stale_snapshot_and_refreshes_it(kvm_guest):
    vm, vcpu = kvm_guest.vm, kvm_guest.vcpu
    await touch(vcpu, 0x0)
    it = next(i for i in TdpIter(vcpu.root, 0, 1) if i.level == PG_LEVEL_2M)
    current = it.old_spte
    it.old_spte = S.NONPRESENT                            # a snapshot taken before the fault
    async with vm.mmu_lock.read:
        assert not vm.tdp.set_spte_atomic(it, S.NONPRESENT)
        assert it.old_spte == current and vm.walk(0)[-1].spte == current
        assert vm.tdp.set_spte_atomic(it, S.NONPRESENT)   # with the fresh value it succeeds
    assert vm.stats()["pages_2m"] == 0


async def test_the_doors_check_their_lock(kvm_guest):
    vm, vcpu = kvm_guest.vm, kvm_guest.vcpu
    await touch(vcpu, 0x0)
    it = next(iter(TdpIter(vcpu.root, 0, 1)))
    with pytest.raises(LockAssertion):
        vm.tdp.set_spte_atomic(it, it.old_spte)
    async with vm.mmu_lock.read:
        with pytest.raises(LockAssertion):
            vm.tdp.iter_set_spte(it, it.old_spte)
        with pytest.raises(LockAssertion):
            await vm.tdp.zap_leafs(vcpu.root, 0, 512)


async def test_leaf_zap_asks_for_a_flush_only_in_a_valid_root(kvm_guest):
    vm, vcpu = kvm_guest.vm, kvm_guest.vcpu
    await touch(vcpu, 0x0, 0x200000)
    async with vm.mmu_lock.write:
        assert await vm.tdp.zap_leafs(vcpu.root, 0, 1)              # the 2M leaf over gfn 0
        assert not await vm.tdp.zap_leafs(vcpu.root, 0, 1)          # nothing left to zap
        vcpu.root.invalid = True
        assert not await vm.tdp.zap_leafs(vcpu.root, 0x200, 0x201)  # invalid root: reload flushes
        vcpu.root.invalid = False
    assert vm.stats()["pages_2m"] == 0
    assert [s.kind for s in vm.walk(0x200000)] == ["table", "table", "non-present"]


async def test_destroy_frees_every_table(kvm_guest):
    vm, vcpu = kvm_guest.vm, kvm_guest.vcpu
    await touch(vcpu, 0x0, 0x200000)
    await vm.destroy()
    assert len(vm.tdp.tables) == 0 and vm.tdp.roots == []
    assert vm.stats()["tdp_mmu_pages"] == 0 and vm.stats()["pages_2m"] == 0


def assert_children_match_sptes(vm) -> int:
    """Every table reachable from a root above 4K records, for each entry, the table its
    present non-leaf SPTE links and None for any other SPTE; a 4K-level table records no
    children. Returns the tables checked."""
    tables, checked = vm.tdp.tables, 0
    pending = [root for root in vm.tdp.roots if not root.freed]
    while pending:
        page = pending.pop()
        checked += 1
        if page.level == PG_LEVEL_4K:
            assert page.children is None, page
            continue
        for i, spte in enumerate(page.spt):
            if S.is_shadow_present(spte) and not S.is_leaf_present(spte, page.level):
                child = tables.by_pfn[S.spte_to_pfn(spte)]
                assert page.children[i] is child, (page, i)
                pending.append(child)
            else:
                assert page.children[i] is None, (page, i, hex(spte))
    return checked


async def test_each_table_records_the_children_its_sptes_link(make_guest):
    """Through links, a huge leaf replacing a table, eager splits, collapses and zaps, the
    `children` the walkers follow match what the SPTEs link."""
    g = await make_guest(Backing.THP, 8 * MIB)
    vm, vcpu = g.vm, g.vcpu
    gpas = range(0, 8 * MIB, 0x1000)
    await touch(vcpu, *gpas)                                   # 2M leaves
    assert assert_children_match_sptes(vm) == 3
    await vm.thp_split(g.region.hva)
    await touch(vcpu, 0x1000)                                  # a 4K table linked
    assert vm.walk(0x1000)[-1].level == PG_LEVEL_4K
    assert assert_children_match_sptes(vm) == 4
    await vm.thp_collapse(g.region.hva)
    await touch(vcpu, 0x2000)                                  # a 2M leaf replaces it
    assert vm.walk(0x1000)[-1].level == PG_LEVEL_2M
    assert assert_children_match_sptes(vm) == 3
    await vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 8 * MIB, g.region.hva)
    assert assert_children_match_sptes(vm) == 7                # split eagerly: 4 tables
    await vm.set_user_memory_region(0, 0, 0, 8 * MIB, g.region.hva)
    await touch(vcpu, *gpas)
    assert assert_children_match_sptes(vm) >= 3
    await vm.set_user_memory_region(0, 0, 0, 0, g.region.hva)  # delete: zap everything
    assert assert_children_match_sptes(vm) == 1


async def test_walkers_report_a_present_table_pointer_with_no_recorded_child(kvm_guest):
    """A broken `children` (a model bug) is a VmBugged for the iterator and for the
    hardware walker, not a crash of another kind."""
    vm, vcpu = kvm_guest.vm, kvm_guest.vcpu
    await touch(vcpu, 0x0)
    root = vcpu.root
    assert root.children[0] is not None
    root.children[0] = None
    with pytest.raises(VmBugged, match="links no recorded table"):
        list(TdpIter(root, 0, 1))
    vcpu.flush_tlb()
    with pytest.raises(VmBugged, match="no recorded table"):
        vcpu._tlb_fill(0x0, vcpu._batch.ops[0])
