"""The bulk SPTE paths (tdp_bulk, and rmap_bulk for the legacy MMU) leave exactly what the
per-SPTE paths leave.

Two VMs get the same random story of guest accesses, dirty logging (enable, GET, CLEAR,
ring resets, disable), aging, zaps and slot deletion; one listens to its tracepoints, so
its MMU takes the per-SPTE paths, the other takes the bulk ones. After every step both
hold the same SPTEs in the same tables (and, on the legacy MMU, the same rmaps), the same
dirty bitmaps and stats, and the calls returned the same values."""

from __future__ import annotations

import random

import numpy as np
import pytest

from vmmu.server.kvm import (KVM_MEM_LOG_DIRTY_PAGES, AccessBatch, AccessKind, Backing, Kvm,
                             VmConfig)
from vmmu.server.kvm import PROT_READ
from vmmu.server.kvm import spte as S
from vmmu.server.kvm.errors import VmBugged
from vmmu.server.kvm.tdp_bulk import TableGroup, fill_small, set_sptes, tables
from vmmu.server.kvm.types import PG_LEVEL_2M, PG_LEVEL_4K, PT_ENTRIES

MIB = 1 << 20
LOG = KVM_MEM_LOG_DIRTY_PAGES
# Slot 0 maps THP memory at gpa 0, slot 1 4K memory right after it: their last and first
# pages share a table, so a walk of one slot must stop at its bounds within a table.
THP_SIZE, SMALL_SIZE = 8 * MIB, 2 * MIB
SLOT0_SIZE = THP_SIZE - 256 * 1024
SMALL_GPA = SLOT0_SIZE


def snapshot(vm) -> dict:
    """Every SPTE of every root (by root, level, gfn and index), the bitmaps, the stats;
    on the legacy MMU every SPTE of every shadow page and the rmap heads."""
    if vm.shadow is not None:
        return shadow_snapshot(vm)
    sptes = {}

    def dump(key, page):
        for i, value in enumerate(page.spt):
            sptes[key + (page.level, page.gfn, i)] = value
        for child in page.children or ():
            if child is not None:
                dump(key, child)

    for n, root in enumerate(vm.tdp.roots):
        dump((n, root.as_id, root.invalid), root)
    stats = vm.stats()
    stats.pop("tdp_mmu_yields")          # the bulk walks yield between tables, not SPTEs
    bitmaps = {slot.id: bytes(slot.dirty_bitmap) for slot in vm.memslot_sets[0].by_id.values()
               if slot.dirty_bitmap is not None}
    return {"sptes": sptes, "stats": stats, "bitmaps": bitmaps, "tables": len(vm.tdp.tables)}


def shadow_snapshot(vm) -> dict:
    """The legacy MMU's pages (by pfn, role and index), rmaps, bitmaps and stats; the
    walks yield where the per-SPTE walks do, so `shadow_mmu_yields` stays in."""
    mmu = vm.shadow
    sptes = {(pfn, page.level, page.gfn, page.as_id, page.invalid, i): value
             for pfn, page in mmu.tables.by_pfn.items() for i, value in enumerate(page.spt)}
    rmaps = {key: [bytes(heads) for heads in r.heads[1:]] for key, r in mmu.slot_rmaps.items()}
    bitmaps = {slot.id: bytes(slot.dirty_bitmap) for slot in vm.memslot_sets[0].by_id.values()
               if slot.dirty_bitmap is not None}
    return {"sptes": sptes, "stats": vm.stats(), "bitmaps": bitmaps, "rmaps": rmaps}


class Twins:
    """The same calls on a per-SPTE VM and a bulk VM, compared after each."""

    def __init__(self, **config) -> None:
        kvm = Kvm()
        self.vms = [kvm.create_vm(VmConfig(name=f"twin-{i}", sanitizers=True, **config))
                    for i in range(2)]
        self.subscription = self.vms[0].tracer.subscribe()
        assert [vm.mmu.bulk for vm in self.vms] == [False, True]

    async def call(self, name: str, *args):
        results = []
        for vm in self.vms:
            result = getattr(vm, name)(*args)
            if hasattr(result, "__await__"):
                result = await result
            results.append(result)
        assert results[0] == results[1], name
        per_spte, bulk = (snapshot(vm) for vm in self.vms)
        assert per_spte["sptes"] == bulk["sptes"], name
        assert per_spte == bulk, name
        return results[1]

    async def run(self, accesses) -> None:
        results = [await vcpu.run(AccessBatch.build(accesses)) for vcpu in self.vcpus]
        assert results[0].completed == results[1].completed
        await self.call("stats")

    async def setup(self) -> None:
        self.regions = [(vm.mmap(THP_SIZE, Backing.THP), vm.mmap(SMALL_SIZE, Backing.PAGE_4K))
                        for vm in self.vms]
        assert self.regions[0][0].hva == self.regions[1][0].hva
        self.thp, self.small = self.regions[1]
        await self.call("set_user_memory_region", 0, 0, 0, SLOT0_SIZE, self.thp.hva)
        await self.call("set_user_memory_region", 1, 0, SMALL_GPA, SMALL_SIZE, self.small.hva)
        self.vcpus = [vm.create_vcpu(0) for vm in self.vms]


def random_accesses(rng: random.Random, n: int):
    # Slot 0's second 2M frame is never touched: the 4K tables a walk meets are not all
    # consecutive.
    gfns = [gfn for gfn in (rng.randrange(SLOT0_SIZE >> 12) for _ in range(n // 2))
            if gfn >> 9 != 1] + \
        [(SMALL_GPA >> 12) + rng.randrange(SMALL_SIZE >> 12) for _ in range(n // 2)]
    rng.shuffle(gfns)
    return [(gfn << 12, rng.choice((AccessKind.READ, AccessKind.WRITE)), 8, None)
            for gfn in gfns]


CONFIGS = [
    dict(),
    dict(ad_bits=False),
    dict(eager_page_split=False),
    dict(manual_dirty_log_protect=1),
    dict(manual_dirty_log_protect=3),
    dict(manual_dirty_log_protect=3, eager_page_split=False),
    dict(tdp_levels=5, fast_page_fault=False),
    dict(dirty_ring_size=1 << 16, dirty_ring_with_bitmap=True),
]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}"
                                                                   for k, v in c.items()))
@pytest.mark.parametrize("mmu", ["tdp", "legacy"])
async def test_bulk_paths_leave_what_the_per_spte_paths_leave(mmu, config, seed):
    rng = random.Random(seed)
    twins = Twins(mmu=mmu, **config)
    await twins.setup()
    await twins.run(random_accesses(rng, 600))
    for slot, gpa, size in ((0, 0, SLOT0_SIZE), (1, SMALL_GPA, SMALL_SIZE)):
        hva = twins.thp.hva if slot == 0 else twins.small.hva
        await twins.call("set_user_memory_region", slot, LOG, gpa, size, hva)
        await twins.run(random_accesses(rng, 100))
    for _ in range(3):
        await twins.run(random_accesses(rng, 400))
        for slot in (0, 1):
            if config.get("manual_dirty_log_protect"):
                pages = (SLOT0_SIZE if slot == 0 else SMALL_SIZE) >> 12
                first = 64 * rng.randrange(pages // 128)
                num = pages - first if rng.random() < 0.5 else 64 * rng.randrange(1, 8)
                mask = rng.getrandbits(num) | rng.getrandbits(num)
                await twins.call("clear_dirty_log", slot, first, num,
                                 mask.to_bytes(8 * ((num + 63) // 64), "little"))
            await twins.call("get_dirty_log", slot)
        if config.get("dirty_ring_size"):
            await twins.call("harvest_dirty_ring", 0)
            await twins.call("reset_dirty_rings")
        await twins.call("young_bitmap", twins.thp.hva, twins.thp.hva + THP_SIZE)
        await twins.call("clear_young", twins.small.hva, twins.small.hva + SMALL_SIZE // 2)
        start = rng.randrange(SLOT0_SIZE >> 12)
        await twins.call("madvise_dontneed", twins.thp.hva + (start << 12),
                         rng.randrange(1, 1024) << 12 if start < 1024 else 4096)
    await twins.call("set_user_memory_region", 0, 0, 0, SLOT0_SIZE, twins.thp.hva)
    await twins.run(random_accesses(rng, 200))
    await twins.call("set_user_memory_region", 1, 0, SMALL_GPA, 0, twins.small.hva)
    await twins.call("munmap", twins.thp.hva, THP_SIZE)


async def test_young_bitmap_agrees_with_test_young_page_by_page(make_guest):
    g = await make_guest(Backing.THP, 8 * MIB)
    rng = random.Random(7)
    await g.vm.mprotect(g.region.hva + 3 * MIB, 4096, PROT_READ)   # a 2M frame at 4K
    await g.vcpu.run(AccessBatch.build(
        [(rng.randrange(8 * MIB) & ~7, AccessKind.READ, 8, None) for _ in range(300)]))
    await g.vm.clear_young(g.region.hva + MIB, g.region.hva + 5 * MIB // 2)
    start, end = g.region.hva + 4096 * 3 + 17, g.region.hva + 7 * MIB + 5
    bitmap = int.from_bytes(g.vm.young_bitmap(start, end), "little")
    pages = range(start & ~0xFFF, end, 4096)
    expected = [g.vm.test_young(hva) for hva in pages]
    assert any(expected) and not all(expected)
    assert [bool(bitmap >> i & 1) for i in range(len(pages))] == expected


@pytest.mark.tdp_only
@pytest.mark.parametrize("level", [PG_LEVEL_2M, PG_LEVEL_2M + 1])
@pytest.mark.parametrize("ad_enabled", [True, False])
@pytest.mark.parametrize("nx_huge_pages", [False, True])
def test_fill_small_makes_each_child_as_make_small_does(kvm_vm, level, ad_enabled,
                                                         nx_huge_pages):
    huge = S.make_leaf(0x40000, level, True, True, ad_enabled,
                       executable=not nx_huge_pages)
    page = kvm_vm.tdp.tables.alloc(level - 1, 0, 0)
    fill_small(page, huge, level, nx_huge_pages)
    assert list(page.spt) == [S.make_small(huge, level, i, nx_huge_pages)
                              for i in range(PT_ENTRIES)]
    # Under the mitigation only 4K children are executable again.
    assert all(S.EXECUTABLE & spte for spte in page.spt) == \
        (not nx_huge_pages or level == PG_LEVEL_2M)


@pytest.mark.tdp_only
async def test_a_bulk_write_keeps_the_rules_of_handle_changed_spte(make_guest):
    """The bulk door's bookkeeping raises where `handle_changed_spte` would: a present
    leaf whose pfn changes, illegal writable bits."""
    g = await make_guest(Backing.PAGE_4K, 2 * MIB)
    await g.vcpu.run(AccessBatch.build([(0, AccessKind.WRITE, 8, None)]))
    vm = g.vm
    root = vm.tdp.roots[0]
    [(page, lo, hi)] = [entry for entry in tables(root, 0, 1) if entry[0].level == PG_LEVEL_4K]
    async with vm.mmu_lock.write:
        group = TableGroup(PG_LEVEL_4K, [(page, lo, hi)])
        moved = group.old.copy()
        moved[0, 0] += np.uint64(1 << 12)
        with pytest.raises(VmBugged, match="changed pfn"):
            set_sptes(vm.tdp, group, moved, False)
        group = TableGroup(PG_LEVEL_4K, [(page, lo, hi)])
        illegal = group.old.copy()
        illegal[0, 0] &= np.uint64(~S.MMU_WRITABLE & ((1 << 64) - 1))
        with pytest.raises(VmBugged, match="illegal writable bits"):
            set_sptes(vm.tdp, group, illegal, False)
