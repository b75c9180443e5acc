"""The legacy MMU: rmaps with their lock bit, shadow pages in the hash, zaps committed after
the flush, dirty logging and aging through the rmaps; and the same guest on both MMUs."""

from __future__ import annotations

import asyncio
import random

import pytest

from vmmu.server.kvm import (KVM_MEM_LOG_DIRTY_PAGES, AccessBatch, AccessKind, Backing, Kvm,
                             KvmError, VmBugged, VmConfig)
from vmmu.server.kvm import spte as S
from vmmu.server.kvm.mmu_page import UseAfterFree
from vmmu.server.kvm.rmap import PTE_LIST_EXT, RMAP_LOCKED, RMAP_MANY, Rmaps, sptep_of
from vmmu.server.kvm.sched import Scheduler
from vmmu.server.kvm.types import PAGE_SIZE, PG_LEVEL_2M, PG_LEVEL_4K, pages_per_level

MIB = 1 << 20
R, W = AccessKind.READ, AccessKind.WRITE


def run(vcpu, kind, *gfns):
    return vcpu.run(AccessBatch.build((g * PAGE_SIZE, kind, 8, None) for g in gfns))


@pytest.fixture
def mmu() -> str:
    """This module's VMs run the legacy MMU only."""
    return "legacy"


def legacy_guest(make_guest, backing=Backing.PAGE_4K, size=4 * MIB, **config):
    return make_guest(backing, size, **config)


def check_rmaps(vm) -> int:
    """The legacy MMU's invariant: every present leaf of a live shadow page is in exactly
    one rmap entry, of its gfn and level, and every rmap entry is such a leaf. Returns
    the leaves."""
    mmu = vm.shadow
    leaves = {}
    for sp in mmu.tables.by_pfn.values():
        for i, spte in enumerate(sp.spt):
            if S.is_leaf_present(spte, sp.level):
                leaves[sptep_of(sp.pfn, i)] = (sp.gfn + i * pages_per_level(sp.level), sp.level)
    entries = []
    for (as_id, _), rmaps in mmu.slot_rmaps.items():
        for level in (1, 2, 3):
            for i, val in enumerate(rmaps.heads[level]):
                assert not val & RMAP_LOCKED
                for sptep in mmu.rmaps.sptes(val):
                    gfn, lvl = leaves[sptep]
                    assert lvl == level and rmaps.index(gfn, level) == i
                    entries.append(sptep)
    assert sorted(entries) == sorted(leaves)
    return len(leaves)


# -- rmap heads, their lock and their descriptors ----------------------------------------

def rmaps(knobs=frozenset()) -> Rmaps:
    return Rmaps(Scheduler(None), frozenset(knobs))


async def test_a_head_holds_one_sptep_then_a_chain_of_descriptors_and_shrinks_back():
    from array import array
    r, heads = rmaps(), array("Q", [0])
    spteps = [sptep_of(0x1000 + n, n % 512) for n in range(2 * PTE_LIST_EXT + 2)]
    assert await r.add(heads, 0, spteps[0]) == 0
    assert heads[0] == spteps[0]                       # one SPTE: the head is its address
    for n, sptep in enumerate(spteps[1:], start=1):
        assert await r.add(heads, 0, sptep) == n
    assert heads[0] & RMAP_MANY and r.count(heads[0]) == len(spteps)
    assert len(r.descs) == 3                           # 14 + 14 + 2
    assert sorted(r.sptes(heads[0])) == sorted(spteps)
    for sptep in random.Random(0).sample(spteps, len(spteps)):
        await r.remove(heads, 0, sptep)
    assert heads[0] == 0 and len(r.descs) == 0 and r.descs.freed == r.descs.allocated
    with pytest.raises(VmBugged):
        await r.remove(heads, 0, spteps[0])


async def test_a_writer_spins_while_a_lockless_walker_holds_the_head():
    from array import array
    r, heads, log = rmaps(), array("Q", [0]), []
    await r.add(heads, 0, sptep_of(0x1000, 1))

    async def walker():
        val = await r.lock_readonly(heads, 0)
        assert heads[0] == val | RMAP_LOCKED
        log.append("walker locked")
        for _ in range(3):
            await asyncio.sleep(0)
        log.append("walker done")
        r.unlock_readonly(heads, 0, val)

    async def writer():
        await asyncio.sleep(0)
        await r.add(heads, 0, sptep_of(0x1000, 2))
        log.append("writer added")

    await asyncio.gather(walker(), writer())
    assert log == ["walker locked", "walker done", "writer added"] and r.spins > 0
    assert r.count(heads[0]) == 2 and not heads[0] & RMAP_LOCKED


async def test_an_empty_head_is_not_locked_and_a_change_under_the_lock_is_a_bug():
    from array import array
    r, heads = rmaps(), array("Q", [0])
    assert await r.lock_readonly(heads, 0) == 0 and heads[0] == 0
    r.unlock_readonly(heads, 0, 0)
    await r.add(heads, 0, sptep_of(0x1000, 1))
    val = await r.lock_readonly(heads, 0)
    heads[0] = 8 | RMAP_LOCKED                          # someone wrote it without the lock
    with pytest.raises(VmBugged, match="changed under its read-only lock"):
        r.unlock_readonly(heads, 0, val)


async def test_a_walker_past_a_freed_descriptor_is_a_use_after_free():
    """What the read-only lock prevents: the entries move and the head descriptor is
    freed while a walk is inside it."""
    from array import array
    r, heads = rmaps(), array("Q", [0])
    spteps = [sptep_of(0x1000, n) for n in range(PTE_LIST_EXT + 1)]
    for sptep in spteps:
        await r.add(heads, 0, sptep)
    walk = r.sptes(heads[0])
    assert next(walk) == spteps[-1]                     # the head descriptor holds one
    await r.remove(heads, 0, spteps[-1])                # ... which empties and frees it
    with pytest.raises(UseAfterFree, match="pte_list_desc"):
        next(walk)


# -- shadow pages ---------------------------------------------------------------------------

async def test_shadow_pages_are_found_by_gfn_and_role_and_know_their_parent(make_guest):
    g = await legacy_guest(make_guest)
    await run(g.vcpu, R, 0, 1, 512)
    mmu = g.vm.shadow
    assert g.vm.stats()["mmu_shadow_pages"] == 5        # root, 1G, 2M, two 4K tables
    for gfn in (0, 512):
        (sp,) = mmu.hash[(gfn, PG_LEVEL_4K, 0)]
        (parent,) = mmu.hash[(0, PG_LEVEL_2M, 0)]
        index = gfn >> 9
        assert list(mmu.rmaps.sptes(sp.parent_ptes[0])) == [sptep_of(parent.pfn, index)]
        assert parent.children[index] is sp
        with pytest.raises(VmBugged, match="already links"):
            mmu.get_child_sp(parent, index)
    assert check_rmaps(g.vm) == 3


async def test_a_zapped_page_is_freed_after_the_flush_and_the_lockless_walkers(make_guest):
    g = await legacy_guest(make_guest)
    await run(g.vcpu, R, 0, 700)
    mmu, before = g.vm.shadow, g.vm.stats()["remote_tlb_flush_requests"]
    below_root = [mmu.tables.child(s.pfn) for s in g.vm.walk(0) if s.kind == "table"][1:]
    with g.vm.rcu.read_lock():                          # a fast page fault is walking
        await g.vm.set_user_memory_region(0, 0, 0, 0, 0)
        assert g.vm.stats()["remote_tlb_flush_requests"] > before
        assert not any(sp.freed for sp in below_root) and all(sp.invalid for sp in below_root)
    assert all(sp.freed for sp in below_root)
    assert g.vcpu.root.invalid and not g.vcpu.root.freed      # the vCPU still holds it
    assert g.vm.stats()["mmu_shadow_zapped"] == 5


async def test_with_the_knob_a_zapped_page_is_freed_under_a_lockless_walker(make_guest):
    g = await legacy_guest(make_guest, debug=frozenset({"free_sp_before_flush"}))
    await run(g.vcpu, R, 0)
    sp = g.vm.shadow.tables.child(g.vm.walk(0)[-2].pfn)
    with g.vm.rcu.read_lock():
        await g.vm.set_user_memory_region(0, 0, 0, 0, 0)
        assert sp.freed


async def test_zap_all_fast_makes_every_page_obsolete_and_vcpus_load_a_new_root(make_guest):
    g = await legacy_guest(make_guest, size=2 * MIB)
    other = g.vm.mmap(2 * MIB, Backing.PAGE_4K)
    await g.vm.set_user_memory_region(1, 0, 8 * MIB, 2 * MIB, other.hva)
    await g.vm.write_hva(g.region.hva + 0x5000, b"survives")
    await run(g.vcpu, R, 5, 2048)
    old_root = g.vcpu.root
    await g.vm.set_user_memory_region(1, 0, 0, 0, 0)           # zap_all_fast
    assert old_root.invalid and g.vm.shadow.active == {} and check_rmaps(g.vm) == 0
    result = await g.vcpu.run(AccessBatch.build([(0x5000, R, 8, b"")]))
    assert result.read_data == b"survives" and g.vcpu.root is not old_root
    assert old_root.freed                                      # its last reference went
    assert g.vm.shadow.mmu_valid_gen == 1 and check_rmaps(g.vm) == 1


async def test_the_notifier_zaps_leaves_through_the_rmaps_and_keeps_the_pages(make_guest):
    g = await legacy_guest(make_guest)
    await run(g.vcpu, W, *range(8))
    pages = g.vm.stats()["mmu_shadow_pages"]
    await g.vm.migrate_pages(g.region.hva + 2 * PAGE_SIZE, 3 * PAGE_SIZE)
    assert [g.vm.walk(gfn << 12)[-1].kind for gfn in range(8)] == \
        ["leaf"] * 2 + ["non-present"] * 3 + ["leaf"] * 3
    assert g.vm.stats()["mmu_shadow_pages"] == pages and check_rmaps(g.vm) == 5


# -- dirty logging through the rmaps ----------------------------------------------------------

async def test_logging_write_protects_huge_leaves_and_a_write_maps_4k_in_their_place(
        make_guest):
    """No eager split on the legacy MMU (KVM splits eagerly in the TDP MMU only)."""
    g = await legacy_guest(make_guest, Backing.THP)
    await run(g.vcpu, W, 0, 512)
    await g.vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 4 * MIB, g.region.hva)
    huge = g.vm.walk(512 << 12)[-1]
    assert huge.large and not huge.writable and huge.mmu_writable
    assert await g.vm.get_dirty_log(0) == bytes(128)

    await run(g.vcpu, W, 515)                   # the slow path drops the huge leaf
    leaf = g.vm.walk(515 << 12)[-1]
    assert leaf.level == 1 and leaf.writable and leaf.pfn == huge.pfn + 3
    assert g.vm.walk(516 << 12)[-1].kind == "non-present"
    log = await g.vm.get_dirty_log(0)
    assert [i for i in range(1024) if log[i >> 3] >> (i & 7) & 1] == [515]
    assert not g.vm.walk(515 << 12)[-1].writable and check_rmaps(g.vm) == 2

    await g.vm.set_user_memory_region(0, 0, 0, 4 * MIB, g.region.hva)
    assert g.vm.walk(515 << 12)[-1].kind == "non-present"   # zapped: it may be huge again
    await run(g.vcpu, R, 515)
    assert g.vm.walk(515 << 12)[-1].large


async def test_clear_with_initially_set_protects_the_huge_leaves_at_the_ends(make_guest):
    g = await legacy_guest(make_guest, Backing.THP, manual_dirty_log_protect=3)
    await run(g.vcpu, W, 0, 512)
    await g.vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 4 * MIB, g.region.hva)
    assert g.vm.walk(0)[-1].writable                             # nothing protected yet
    assert await g.vm.clear_dirty_log(0, 64, 64, b"\xff" * 8) == 64
    huge = g.vm.walk(64 << 12)[-1]
    assert huge.large and not huge.writable and not huge.mmu_writable
    assert g.vm.walk(512 << 12)[-1].writable
    await run(g.vcpu, W, 100)
    assert g.vm.walk(100 << 12)[-1].level == 1


# -- aging ------------------------------------------------------------------------------------

async def test_with_ad_bits_aging_is_lockless_and_clears_accessed(make_guest):
    g = await legacy_guest(make_guest)
    await run(g.vcpu, R, 3)
    writes = g.vm.mmu_lock.statistics().write_acquisitions
    assert await g.vm.clear_young(g.region.hva, g.region.hva + g.size)
    assert g.vm.mmu_lock.statistics().write_acquisitions == writes
    assert not g.vm.walk(0x3000)[-1].accessed and not g.vm.test_young(g.region.hva + 0x3000)


async def test_ad_bits_off_fast_only_reports_young_and_leaves_the_spte(make_guest):
    g = await legacy_guest(make_guest, ad_bits=False)
    await run(g.vcpu, R, 3)
    spte = g.vm.walk(0x3000)[-1].spte
    writes = g.vm.mmu_lock.statistics().write_acquisitions
    for _ in range(2):
        assert await g.vm.clear_young(g.region.hva, g.region.hva + g.size, fast_only=True)
    assert g.vm.walk(0x3000)[-1].spte == spte
    assert g.vm.mmu_lock.statistics().write_acquisitions == writes

    assert await g.vm.clear_young(g.region.hva, g.region.hva + g.size)   # the write lock
    assert g.vm.mmu_lock.statistics().write_acquisitions == writes + 1
    assert S.is_access_track(g.vm.walk(0x3000)[-1].spte)
    assert not await g.vm.clear_young(g.region.hva, g.region.hva + g.size)
    fast = g.vcpu.stats()["pf_fast"]
    g.vm.flush_remote_tlbs()                                 # aging leaves the TLB alone
    await run(g.vcpu, R, 3)                                  # the fast path restores it
    assert g.vcpu.stats()["pf_fast"] == fast + 1
    assert g.vm.walk(0x3000)[-1].spte == spte & ~S.WRITABLE    # W comes back on a write


# -- memory -----------------------------------------------------------------------------------

async def test_a_mapped_4k_page_costs_8_bytes_of_spte_and_8_of_rmap(make_guest):
    g = await legacy_guest(make_guest, size=8 * MIB)
    await run(g.vcpu, R, *range(2048))
    tables, rmaps = g.vm.shadow.memory_bytes()
    assert tables == (4 + 3) * PAGE_SIZE                     # 4 leaf tables, 2M, 1G, root
    assert rmaps == 8 * (2048 + 4 + 1) + 8 * 7              # heads by level, parent_ptes


# -- the same guest on both MMUs --------------------------------------------------------------

async def _workload(mmu: str, backing: Backing, seed: int) -> list:
    """A seeded mix of guest writes and reads, host migrations and swap-outs, dirty-log
    harvests and memslot changes; returns everything the guest and userspace saw."""
    rng = random.Random(seed)
    kvm = Kvm()
    vm = kvm.create_vm(VmConfig(mmu=mmu, max_vcpus=1, name=f"{mmu}-{seed}"))
    size, npages = 4 * MIB, 1024
    region = vm.mmap(size, backing)
    await vm.set_user_memory_region(0, 0, 0, size, region.hva)
    vcpu = vm.create_vcpu(0)
    seen = []
    logging = False
    for step in range(40):
        op = rng.randrange(8)
        gfns = rng.sample(range(npages), 12)
        if op <= 2:
            result = await vcpu.run(AccessBatch.build(
                (g * PAGE_SIZE + 8, W, 8, (step * 4096 + g).to_bytes(8, "little"))
                for g in gfns))
            seen.append(("write", result.completed, result.exit.reason))
        elif op <= 4:
            result = await vcpu.run(AccessBatch.build((g * PAGE_SIZE + 8, R, 8, b"")
                                                      for g in gfns))
            seen.append(("read", result.read_data))
        elif op == 5:
            g = rng.randrange(npages)
            await (vm.migrate_pages if rng.random() < 0.5 else vm.swap_out)(
                region.hva + g * PAGE_SIZE, PAGE_SIZE)
        elif op == 6:
            logging = not logging
            await vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES if logging else 0, 0,
                                            size, region.hva)
        elif logging:
            seen.append(("dirty", await vm.get_dirty_log(0)))
    seen.append(("memory", await vm.read_hva(region.hva, size)))
    if mmu == "legacy":
        check_rmaps(vm)
    await kvm.shutdown()
    return seen


@pytest.mark.parametrize("seed", range(4))
async def test_tdp_and_legacy_give_the_same_results_and_dirty_logs(seed):
    tdp = await _workload("tdp", Backing.PAGE_4K, seed)
    legacy = await _workload("legacy", Backing.PAGE_4K, seed)
    assert any(entry[0] == "dirty" for entry in tdp)             # the workload harvests
    assert legacy == tdp


@pytest.mark.parametrize("seed", range(4))
async def test_on_huge_pages_legacy_logs_what_tdp_logs_and_the_pages_a_dropped_leaf_refaults(
        seed):
    """The same guest-visible results; the dirty logs differ as KVM's do: the TDP MMU
    splits a protected huge leaf into read-only 4K leaves, the legacy MMU drops it, and a
    read of a neighbour then maps it writable (KVM maps writable where the host allows)
    and logs it. So legacy's log holds TDP's and more."""
    tdp = await _workload("tdp", Backing.THP, seed)
    legacy = await _workload("legacy", Backing.THP, seed)
    assert [e for e in legacy if e[0] != "dirty"] == [e for e in tdp if e[0] != "dirty"]
    logs = [(t[1], l[1]) for t, l in zip(tdp, legacy) if t[0] == "dirty"]
    assert logs and len(logs) == sum(e[0] == "dirty" for e in legacy)
    for tdp_log, legacy_log in logs:
        assert all(t & ~l == 0 for t, l in zip(tdp_log, legacy_log))


async def test_the_legacy_mmu_emits_its_tracepoints(make_guest):
    g = await legacy_guest(make_guest)
    sub = g.vm.tracer.subscribe(frozenset({"kvm_mmu_get_page", "kvm_mmu_set_spte",
                                           "kvm_mmu_zap_all_fast",
                                           "kvm_mmu_prepare_zap_page"}))
    await run(g.vcpu, R, 7)
    await g.vm.set_user_memory_region(0, 0, 0, 0, 0)
    sub.close()
    events = []
    while (event := await sub.get()) is not None:       # what was buffered, then None
        events.append(event)
    names = [e.event for e in events]
    assert names[:5] == ["kvm_mmu_get_page"] * 4 + ["kvm_mmu_set_spte"]
    assert [e.fields["level"] for e in events[:4]] == [4, 3, 2, 1]
    assert events[4].fields["gfn"] == 7 and events[4].fields["old"] == S.NONPRESENT
    assert names[5] == "kvm_mmu_zap_all_fast" and names.count("kvm_mmu_prepare_zap_page") == 4


# -- the limit on shadow pages and the shrinker (kvm_mmu_zap_oldest_mmu_pages) ----------

SPREAD_PAGES = 2 * MIB // PAGE_SIZE            # one 4K shadow page per 2 MiB touched


async def test_faults_beyond_nr_mmu_pages_zap_the_oldest_and_the_guest_keeps_its_data(
        make_guest):
    g = await legacy_guest(make_guest, size=256 * MIB)       # 128 4K shadow pages' worth
    await g.vm.set_nr_mmu_pages(64)
    gfns = range(0, 128 * SPREAD_PAGES, SPREAD_PAGES)
    most = 0
    for gfn in gfns:
        await g.vcpu.run(AccessBatch.build([(gfn * PAGE_SIZE, W, 8,
                                             gfn.to_bytes(8, "little"))]))
        most = max(most, g.vm.shadow.n_used_mmu_pages())
    assert most <= 64
    assert g.vm.stats()["mmu_shadow_zapped"] > 0
    check_rmaps(g.vm)
    result = await g.vcpu.run(AccessBatch.build((gfn * PAGE_SIZE, R, 8, b"") for gfn in gfns))
    assert result.read_data == b"".join(gfn.to_bytes(8, "little") for gfn in gfns)
    assert g.vm.shadow.n_used_mmu_pages() <= 64


async def test_set_nr_mmu_pages_zaps_above_the_limit_and_refuses_less_than_64(make_guest):
    g = await legacy_guest(make_guest, size=256 * MIB)
    await run(g.vcpu, R, *range(0, 100 * SPREAD_PAGES, SPREAD_PAGES))
    assert g.vm.shadow.n_used_mmu_pages() == 103                # root, 1G, 2M, 100 4K
    with pytest.raises(KvmError, match="below 64"):
        await g.vm.set_nr_mmu_pages(63)
    assert g.vm.shadow.n_used_mmu_pages() == 103 and g.vm.shadow.n_max_mmu_pages is None
    await g.vm.set_nr_mmu_pages(80)
    assert g.vm.shadow.n_used_mmu_pages() <= 80 and g.vm.shadow.n_max_mmu_pages == 80
    check_rmaps(g.vm)


async def test_the_shrinker_zaps_the_oldest_pages_but_not_a_root_in_use(make_guest):
    g = await legacy_guest(make_guest, size=64 * MIB)
    await run(g.vcpu, R, *range(0, 16 * SPREAD_PAGES, SPREAD_PAGES))
    oldest = list(g.vm.shadow.active)[:11]                      # the root first
    assert oldest[0] is g.vcpu.root
    assert await g.vm.mmu_shrink_scan(10) == 10
    assert not g.vcpu.root.invalid
    # The 1G and 2M pages went first, and their children with them (unlinked, not zapped)
    assert all(sp.invalid for sp in oldest[1:])
    assert g.vm.shadow.n_used_mmu_pages() == 19 - 10
    check_rmaps(g.vm)
    result = await run(g.vcpu, R, *range(0, 16 * SPREAD_PAGES, SPREAD_PAGES))
    assert result.completed == 16


async def test_the_tdp_mmu_tables_are_not_the_shrinkers():
    vm = Kvm().create_vm(VmConfig(mmu="tdp"))
    region = vm.mmap(4 * MIB, Backing.PAGE_4K)
    await vm.set_user_memory_region(0, 0, 0, 4 * MIB, region.hva)
    await run(vm.create_vcpu(0), R, 0, 600)
    await vm.set_nr_mmu_pages(64)
    assert await vm.mmu_shrink_scan(100) == 0
    assert vm.stat.pages_4k == 2
