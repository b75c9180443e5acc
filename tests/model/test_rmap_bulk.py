"""The legacy MMU's bulk write-protection (rmap_bulk) against `rmap_write_protect` head by
head, on heads of every shape, and the bulk slot walk's yields against the per-chunk
walk's. (The random story over whole VMs is tests/model/test_tdp_bulk.py.)"""

from __future__ import annotations

import asyncio
import random
from array import array
from collections import Counter

import numpy as np
import pytest

from vmmu.server.kvm import KVM_MEM_LOG_DIRTY_PAGES, AccessBatch, AccessKind, Backing
from vmmu.server.kvm import spte as S
from vmmu.server.kvm.errors import VmBugged
from vmmu.server.kvm.mmu_page import UseAfterFree
from vmmu.server.kvm.rmap import RMAP_LOCKED, RMAP_MANY, sptep_of
from vmmu.server.kvm.rmap_bulk import write_protect_heads
from vmmu.server.kvm.types import PG_LEVEL_4K, PT_ENTRIES

MIB = 1 << 20
HEADS = 300
# The writable bits a leaf may carry (host-writable, MMU-writable, W): 111, 110, 100, 000.
W_BITS = (S.HOST_WRITABLE | S.MMU_WRITABLE | S.WRITABLE, S.HOST_WRITABLE | S.MMU_WRITABLE,
          S.HOST_WRITABLE, 0)


@pytest.fixture
def mmu() -> str:
    """Every test here is about the legacy MMU."""
    return "legacy"


async def heads_of_every_shape(mmu, rng: random.Random):
    """Two shadow pages of leaves with random writable bits, and heads over them: empty,
    one SPTE, chains of descriptors (up to 40 SPTEs), some locked by a lockless walker."""
    mmu.tables.alloc(PG_LEVEL_4K, 0, 0)      # pfn 0: its first sptep would read as empty
    pages = [mmu.tables.alloc(PG_LEVEL_4K, n * PT_ENTRIES, 0) for n in range(2)]
    spteps = [sptep_of(page.pfn, i) for page in pages for i in range(PT_ENTRIES)]
    for page in pages:
        for i in range(PT_ENTRIES):
            leaf = S.make_leaf(0x1000 + i, PG_LEVEL_4K, True, True, True)
            page.spt[i] = leaf & ~W_BITS[0] | rng.choice(W_BITS)
    rng.shuffle(spteps)
    heads = array("Q", bytes(8 * HEADS))
    for i in range(HEADS):
        for _ in range(rng.choice((0, 1, 1, 1, 2, 15, 40))):
            if spteps:
                await mmu.rmaps.add(heads, i, spteps.pop())
        if heads[i] and rng.random() < 0.1:
            heads[i] |= RMAP_LOCKED
    assert any(h & RMAP_MANY for h in heads) and any(not h & RMAP_MANY for h in heads if h)
    return pages, heads


@pytest.mark.parametrize("pt_protect", [False, True])
@pytest.mark.parametrize("seed", range(4))
async def test_bulk_write_protect_does_what_rmap_write_protect_does_head_by_head(
        make_kvm_vm, pt_protect, seed):
    """Same SPTEs after (W, and MMU-writable for pt_protect, off; host-writable kept), the
    same count of heads that changed (the flush decision), the same virtual-time charges,
    and the heads themselves untouched."""
    rng = random.Random(seed)
    mmu = make_kvm_vm().shadow
    pages, heads = await heads_of_every_shape(mmu, rng)
    where = np.array([rng.random() < 0.7 for _ in range(HEADS - 20)])
    before = [array("Q", page.spt) for page in pages]
    saved_heads = array("Q", heads)
    charges: Counter = Counter()
    mmu._charge = lambda cost, n=1: charges.update({cost: n})

    expected = sum(mmu._write_protect_head(heads[10 + i], pt_protect)
                   for i in np.flatnonzero(where).tolist())
    expected_sptes = [list(page.spt) for page in pages]
    expected_charges = Counter(charges)
    assert expected and expected_sptes != [list(b) for b in before]
    for page, old in zip(pages, before):
        page.spt[:] = old
    charges.clear()

    assert write_protect_heads(mmu, heads, 10, HEADS - 10, where, pt_protect) == expected
    assert [list(page.spt) for page in pages] == expected_sptes
    assert charges == expected_charges
    assert heads == saved_heads
    for page in pages:
        for spte in page.spt:
            assert spte & S.HOST_WRITABLE or not spte & S.MMU_WRITABLE


async def test_bulk_write_protect_through_a_freed_table_is_a_use_after_free(make_kvm_vm):
    mmu = make_kvm_vm().shadow
    pages, heads = await heads_of_every_shape(mmu, random.Random(1))
    single = array("Q", [h for h in heads if h and not h & RMAP_MANY])   # the bulk part
    assert any(h >> 12 == pages[1].pfn for h in single)
    mmu.tables.free(pages[1])
    with pytest.raises(UseAfterFree):
        write_protect_heads(mmu, single, 0, len(single), None, False)
    with pytest.raises(UseAfterFree):
        write_protect_heads(mmu, heads, 0, HEADS, None, False)


async def _protect_slot_with_a_waiter(make_guest, bulk: bool):
    """Enable-logging's slot walk over 48 MiB of written 4K pages while a reader waits for
    mmu_lock: (the walk's flush decision, its yields, the writable SPTEs the reader saw)."""
    g = await make_guest(Backing.PAGE_4K, 48 * MIB)
    vm = g.vm
    if not bulk:
        vm.tracer.subscribe()
    assert vm.shadow.bulk == bulk
    await g.vcpu.run(AccessBatch.build((gpa, AccessKind.WRITE, 8, None)
                                       for gpa in range(0, 48 * MIB, 4096)))
    seen = []

    def writable() -> int:
        return sum(S.is_leaf_present(spte, PG_LEVEL_4K) and bool(spte & S.WRITABLE)
                   for page in vm.shadow.tables.by_pfn.values() if page.level == PG_LEVEL_4K
                   for spte in page.spt)

    async def reader():
        async with vm.mmu_lock.read:
            seen.append(writable())

    yields = vm.stats()["shadow_mmu_yields"]
    async with vm.mmu_lock.write:
        task = asyncio.ensure_future(reader())
        await asyncio.sleep(0)
        assert vm.mmu_lock.needbreak()
        slot = vm.memslot_sets[0].by_id[0]
        flush = await vm.shadow.slot_remove_write_access(slot, PG_LEVEL_4K)
    await task
    return flush, vm.stats()["shadow_mmu_yields"] - yields, seen, writable()


async def test_the_bulk_slot_walk_yields_where_the_per_chunk_walk_does(make_guest):
    per_chunk = await _protect_slot_with_a_waiter(make_guest, bulk=False)
    bulk = await _protect_slot_with_a_waiter(make_guest, bulk=True)
    assert bulk == per_chunk
    flush, yields, seen, left = bulk
    # The waiter got the lock after the first chunk; the batch made the walk yield more.
    assert flush and yields > 1 and 0 < seen[0] < 48 * MIB // 4096 and left == 0


async def test_a_bitmap_past_the_slot_is_a_bug_unless_its_tail_is_clear(make_guest):
    """The last word of a bitmap may reach past the slot's end; a set bit there is a bug."""
    g = await make_guest(Backing.PAGE_4K, 4 * MIB - 3 * 4096)
    await g.vcpu.run(AccessBatch.build((gpa, AccessKind.WRITE, 8, None)
                                       for gpa in range(0, g.size, 4096)))
    slot = g.vm.memslot_sets[0].by_id[0]
    dirty = np.zeros(slot.npages + 3, np.bool_)
    dirty[-4] = True                                   # the slot's last page
    async with g.vm.mmu_lock.write:
        assert g.vm.shadow.clear_dirty_pages(slot, slot.base_gfn, dirty) == 1
        assert g.vm.shadow.clear_dirty_pages(slot, slot.base_gfn, dirty) == 0
        dirty[-1] = True
        with pytest.raises(VmBugged, match="past the end"):
            g.vm.shadow.clear_dirty_pages(slot, slot.base_gfn, dirty)


async def test_with_tracing_on_write_protection_takes_the_per_spte_path_and_traces_it(
        make_guest):
    g = await make_guest(Backing.PAGE_4K, 4 * MIB)
    await g.vcpu.run(AccessBatch.build([(7 * 4096, AccessKind.WRITE, 8, None)]))
    sub = g.vm.tracer.subscribe(frozenset({"kvm_mmu_set_spte"}))
    assert not g.vm.shadow.bulk
    await g.vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 4 * MIB, g.region.hva)
    sub.close()
    events = []
    while (event := await sub.get()) is not None:
        events.append(event)
    [event] = events
    assert (event.fields["gfn"], event.fields["level"]) == (7, PG_LEVEL_4K)
    assert event.fields["old"] & ~event.fields["new"] == S.WRITABLE
