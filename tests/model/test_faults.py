"""Faults map at the level the slot, the lpage rules and the host allow (reference §2.8)."""

from __future__ import annotations

import pytest

from vmmu.server.kvm import (KVM_MEM_LOG_DIRTY_PAGES, AccessBatch, AccessKind, Backing,
                             ExitReason)
from vmmu.server.kvm import spte as S

MIB, GIB = 1 << 20, 1 << 30
R, W, X = AccessKind.READ, AccessKind.WRITE, AccessKind.EXEC


async def touch(vcpu, *gpas, kind=R):
    result = await vcpu.run(AccessBatch.build([(gpa, kind, 8, None) for gpa in gpas]))
    assert result.exit.reason is ExitReason.DONE
    return result


def pages(vm):
    stats = vm.stats()
    return stats["pages_4k"], stats["pages_2m"], stats["pages_1g"]


def leaf(vm, gpa):
    path = vm.walk(gpa)
    assert path[-1].kind == "leaf"
    return path[-1]


async def test_4k_backing_maps_4k_leaves(make_guest):
    g = await make_guest(Backing.PAGE_4K, 4 * MIB)
    await touch(g.vcpu, 0x0, 0x1000, 0x1008, 0x200000)
    assert pages(g.vm) == (3, 0, 0)
    assert [(s.level, s.kind, s.large) for s in g.vm.walk(0x1000)] == [
        (4, "table", False), (3, "table", False), (2, "table", False), (1, "leaf", False)]
    assert g.vcpu.stats()["pf_fixed"] == 3


async def test_thp_backing_maps_2m(make_guest):
    g = await make_guest(Backing.THP, 4 * MIB)
    await touch(g.vcpu, 0x0, 0x1000, 0x1FF000, 0x200000)
    assert pages(g.vm) == (0, 2, 0)
    assert g.vcpu.stats()["pf_fixed"] == 2
    assert [(s.level, s.kind, s.large) for s in g.vm.walk(0x1FF000)] == [
        (4, "table", False), (3, "table", False), (2, "leaf", True)]


async def test_hugetlb_1g_backing_maps_1g(make_guest):
    g = await make_guest(Backing.HUGETLB_1G, GIB, gpa=GIB)
    await touch(g.vcpu, GIB, GIB + 0x12345000, 2 * GIB - 8)
    assert pages(g.vm) == (0, 0, 1)
    assert g.vcpu.stats()["pf_fixed"] == 1
    path = g.vm.walk(GIB + 0x12345000)
    assert [(s.level, s.kind, s.large) for s in path] == [(4, "table", False),
                                                          (3, "leaf", True)]
    assert path[-1].gfn == GIB >> 12 and path[-1].pfn % (1 << 18) == 0


async def test_huge_leaf_pfn_is_the_host_frame(make_guest):
    g = await make_guest(Backing.THP, 4 * MIB)
    await g.vm.write_hva(g.region.hva + 0x3000, b"thp!")
    await touch(g.vcpu, 0x3000)
    result = await g.vcpu.run(AccessBatch.build([(0x3000, R, 4, b"")]))
    assert result.read_data == b"thp!"
    assert leaf(g.vm, 0x3000).pfn % 512 == 0


async def test_gpa_and_hva_misaligned_to_each_other_maps_4k_only(kvm_vm):
    region = kvm_vm.mmap(8 * MIB, Backing.THP)
    await kvm_vm.set_user_memory_region(0, 0, 0, 4 * MIB, region.hva + 0x1000)
    vcpu = kvm_vm.create_vcpu(0)
    await touch(vcpu, 0x0, 0x200000, 0x3FF000)
    assert pages(kvm_vm) == (3, 0, 0)


async def test_slot_edges_off_a_2m_boundary_map_4k_and_the_middle_2m(kvm_vm):
    region = kvm_vm.mmap(8 * MIB, Backing.THP)
    await kvm_vm.set_user_memory_region(0, 0, 1 * MIB, 6 * MIB, region.hva + 1 * MIB)
    vcpu = kvm_vm.create_vcpu(0)
    await touch(vcpu, 1 * MIB)                                 # first frame, partial
    assert leaf(kvm_vm, 1 * MIB).level == 1
    await touch(vcpu, 2 * MIB, 5 * MIB)                        # two whole frames
    assert leaf(kvm_vm, 2 * MIB).level == 2 and leaf(kvm_vm, 5 * MIB).level == 2
    await touch(vcpu, 7 * MIB - 0x1000)                        # last frame, partial
    assert leaf(kvm_vm, 7 * MIB - 0x1000).level == 1
    assert pages(kvm_vm) == (2, 2, 0)


async def test_a_1g_slot_not_ending_on_1g_maps_2m(kvm_vm):
    region = kvm_vm.mmap(GIB, Backing.HUGETLB_1G)
    await kvm_vm.set_user_memory_region(0, 0, GIB, GIB - 2 * MIB, region.hva)
    vcpu = kvm_vm.create_vcpu(0)
    await touch(vcpu, GIB)
    assert pages(kvm_vm) == (0, 1, 0)


async def test_dirty_logging_slot_maps_4k_only(make_guest):
    g = await make_guest(Backing.THP, 4 * MIB, flags=KVM_MEM_LOG_DIRTY_PAGES)
    await touch(g.vcpu, 0x0, 0x200000, kind=W)
    assert pages(g.vm) == (2, 0, 0)


async def test_5_level_ept_walks_5_levels(make_guest):
    g = await make_guest(Backing.PAGE_4K, 2 * MIB, gpa=1 << 50, tdp_levels=5)
    await touch(g.vcpu, (1 << 50) + 0x1000)
    path = g.vm.walk((1 << 50) + 0x1000)
    assert [(s.level, s.kind) for s in path] == [
        (5, "table"), (4, "table"), (3, "table"), (2, "table"), (1, "leaf")]
    assert path[0].index == 4 and path[-1].gfn == ((1 << 50) + 0x1000) >> 12


async def test_the_first_fault_loads_a_root_and_the_walk_starts_there(kvm_vm):
    assert kvm_vm.walk(0) == []
    region = kvm_vm.mmap(2 * MIB, Backing.PAGE_4K)
    await kvm_vm.set_user_memory_region(0, 0, 0, 2 * MIB, region.hva)
    vcpu = kvm_vm.create_vcpu(0)
    await touch(vcpu, 0x5000)
    path = kvm_vm.walk(0x7000)                         # same tables, entry not yet mapped
    assert [s.kind for s in path] == ["table", "table", "table", "non-present"]
    assert path[-1].spte == S.NONPRESENT and path[-1].index == 7


async def test_tables_have_full_permissions_and_leaves_carry_the_pfn(kvm_guest):
    await touch(kvm_guest.vcpu, 0x1000, kind=W)
    *tables, last = kvm_guest.vm.walk(0x1000)
    for t in tables:
        assert t.readable and t.writable and t.executable and not t.large
        assert not (t.host_writable or t.mmu_writable)
    assert last.readable and last.writable and last.executable
    assert last.host_writable and last.mmu_writable


async def test_read_of_a_writable_host_page_maps_it_writable(kvm_guest):
    """KVM asks for a writable pfn opportunistically, so the later write does not fault
    (the host has written the page: it is no zero page)."""
    await kvm_guest.vm.write_hva(kvm_guest.hva(0x1000), b"host")
    await touch(kvm_guest.vcpu, 0x1000)
    assert leaf(kvm_guest.vm, 0x1000).writable
    before = kvm_guest.vcpu.stats()["pf_taken"]
    await touch(kvm_guest.vcpu, 0x1000, kind=W)
    assert kvm_guest.vcpu.stats()["pf_taken"] == before


def clear_leaf_bits(vm, gpa, bits):
    """Age the leaf mapping gpa by hand, and flush the TLBs so the walker sees it."""
    page = next(r for r in vm.mmu.roots if not r.invalid)
    while True:
        index = (gpa >> (12 + 9 * (page.level - 1))) & 511
        spte = page.spt[index]
        if S.is_last(spte, page.level):
            page.spt[index] = spte & ~bits
            break
        page = vm.mmu.tables.child(S.spte_to_pfn(spte))
    vm.flush_remote_tlbs()


@pytest.mark.parametrize("backing", [Backing.PAGE_4K, Backing.THP])
async def test_ad_bits_the_walker_sets_accessed_on_read_and_dirty_on_write(make_guest,
                                                                          backing):
    g = await make_guest(backing, 4 * MIB)
    await touch(g.vcpu, 0x3000, kind=W)
    first = leaf(g.vm, 0x3000)
    assert first.accessed and first.dirty                  # preset at creation
    clear_leaf_bits(g.vm, 0x3000, S.ACCESSED | S.DIRTY)
    assert not leaf(g.vm, 0x3000).accessed

    await touch(g.vcpu, 0x3000)
    read = leaf(g.vm, 0x3000)
    assert read.accessed and not read.dirty

    await touch(g.vcpu, 0x3000, kind=W)
    assert leaf(g.vm, 0x3000).dirty
    assert g.vcpu.stats()["pf_taken"] == 1                 # A and D cost no fault


async def test_ad_bits_a_clean_entry_does_not_let_writes_skip_the_walk(make_guest):
    """A read through a clean leaf must not cache W: the first write has to set D."""
    g = await make_guest(Backing.PAGE_4K, 2 * MIB)
    await touch(g.vcpu, 0x3000, kind=W)
    clear_leaf_bits(g.vm, 0x3000, S.DIRTY)
    await touch(g.vcpu, 0x3000, 0x3000)                    # fills the TLB for reads
    assert not leaf(g.vm, 0x3000).dirty
    await touch(g.vcpu, 0x3000, kind=W)
    assert leaf(g.vm, 0x3000).dirty


async def test_without_ad_bits_nothing_sets_a_or_d(make_guest):
    g = await make_guest(Backing.PAGE_4K, 2 * MIB, ad_bits=False)
    await touch(g.vcpu, 0x3000, kind=W)
    info = leaf(g.vm, 0x3000)
    assert S.ad_disabled(info.spte)
    assert info.writable and not info.dirty                # no hardware D to preset
    assert info.accessed                                   # KVM's software Accessed (6.13+)
    assert all(S.ad_disabled(s.spte) for s in g.vm.walk(0x3000))
    assert not any(s.accessed for s in g.vm.walk(0x3000)[:-1])

    clear_leaf_bits(g.vm, 0x3000, S.ACCESSED)
    await touch(g.vcpu, 0x3000)
    await touch(g.vcpu, 0x3000, kind=W)
    after = leaf(g.vm, 0x3000)
    assert not after.accessed and not after.dirty          # the walker set nothing


async def test_exec_fetch_maps_and_hits(kvm_guest):
    await touch(kvm_guest.vcpu, 0x2000, kind=X)
    assert leaf(kvm_guest.vm, 0x2000).executable
    stats = kvm_guest.vcpu.stats()
    await touch(kvm_guest.vcpu, 0x2000, 0x2008, kind=X)
    assert kvm_guest.vcpu.stats()["pf_taken"] == stats["pf_taken"]
