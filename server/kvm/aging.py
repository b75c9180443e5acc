"""Aging: the MMU notifier's clear_young, clear_flush_young and test_young for the TDP MMU.

Reclaim asks whether the guest used a range of host memory lately (is it "young"?) and
restarts the clock. The answer is in the Accessed bits of the present leaf SPTEs that map
the range (reference §4.7); non-leaf Accessed bits say nothing and are ignored. The hva
range reaches gfns through the memslots that overlap it (`kvm_handle_hva_range`), and the
walk covers the valid roots of each slot's address space.

Aging is lockless (seed 000): it takes no mmu_lock at all. Page tables stay readable
because the walk runs inside an RCU read-side section: a table a concurrent zap unlinks is
freed only after the walk leaves. Aging only makes changes a concurrent writer may undo
or lose: with A/D bits on it clears bit 8 with an atomic fetch-and; with A/D off it turns
the SPTE into its access-tracked form with a compare-and-exchange, and leaves the SPTE
alone if that fails (whoever changed it made it young anyway). The next access restores
an access-tracked SPTE through the fault path, at the same pfn.

The `aging_lock` policy (seed 000's comparison) takes mmu_lock for read or for write around
the walk instead; in virtual time the walk charges `age_spte` per page of each range.

Invariant: aging never zaps, never frees a table and never flushes a TLB. A stale TLB
entry only hides later accesses from aging, and reclaim tolerates such false negatives.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from . import rmap_aging
from . import spte as S
from .errors import KvmError, einval
from .memslots import Memslot
from .tdp_bulk import TableGroup, accessed, leaf_present, tables
from .tdp_iter import TdpIter
from .types import PAGE_SHIFT, PG_LEVEL_4K, pages_per_level


if TYPE_CHECKING:
    from .vm import Vm

__all__ = ["clear_young", "clear_flush_young", "test_young", "young_bitmap",
           "MAX_BITMAP_PAGES"]

MAX_BITMAP_PAGES = 1 << 25       # 128 GiB of hva per bitmap: 4 MiB of bits


async def clear_young(vm: "Vm", start: int, end: int, fast_only: bool = False) -> bool:
    """`kvm_age_gfn` over hva [start, end): was any of it young? It is old afterwards.
    The legacy MMU ages through its rmaps (rmap_aging.py), where `fast_only` matters;
    the TDP MMU's aging is lockless anyway."""
    _check_range(start, end)
    if vm.shadow is not None:
        young = await rmap_aging.age_gfn_ranges(vm.shadow, _gfn_ranges(vm, start, end),
                                                fast_only)
        if vm.tracer.on:
            vm.tracer.emit("kvm_age_hva", start=start, end=end, young=young)
        return young
    young = False
    policy = vm.config.aging_lock
    lock = vm.mmu_lock
    if policy != "none":
        await (lock.acquire_read() if policy == "read" else lock.acquire_write())
    try:
        with _read_side(vm):
            for slot, first, last in _gfn_ranges(vm, start, end):
                for it in _young_leaves(vm, slot, first, last):
                    young = True
                    # A concurrent zap may unlink and free this table here: only RCU
                    # keeps the next read of it safe.
                    await vm.sched.point("age.before_clear")
                    _age_spte(vm, it)
                if vm.clock is not None:
                    vm.clock.charge(vm.clock.costs.age_spte * (last - first))
    finally:
        if policy == "read":
            lock.release_read()
        elif policy == "write":
            lock.release_write()
    if vm.tracer.on:
        vm.tracer.emit("kvm_age_hva", start=start, end=end, young=young)
    return young


async def clear_flush_young(vm: "Vm", start: int, end: int, fast_only: bool = False) -> bool:
    """x86 selects KVM_ELIDE_TLB_FLUSH_IF_YOUNG: the same as `clear_young`, no flush."""
    return await clear_young(vm, start, end, fast_only)


def test_young(vm: "Vm", hva: int) -> bool:
    """`kvm_test_age_gfn` for the page at hva; changes nothing, so nothing can interleave."""
    young = any(True for slot, first, last in _gfn_ranges(vm, hva, hva + 1)
                for _ in _young_leaves(vm, slot, first, last))
    if vm.tracer.on:
        vm.tracer.emit("kvm_test_age_hva", start=hva, end=hva + 1, young=young)
    return young


def young_bitmap(vm: "Vm", start: int, end: int) -> bytes:
    """test_young for each 4K page that hva [start, end) touches: bit i (LSB first) is the
    page at `(start & ~0xfff) + i * 4096`. A young huge leaf makes all its pages young.
    Read a table at a time (`tdp_bulk`); like test_young, it changes nothing."""
    _check_range(start, end)
    first_page = start >> PAGE_SHIFT
    npages = ((end - 1) >> PAGE_SHIFT) + 1 - first_page
    if npages > MAX_BITMAP_PAGES:
        raise KvmError(errno.E2BIG, f"{npages} pages are more than {MAX_BITMAP_PAGES} "
                       "in one bitmap")
    young = np.zeros(npages, np.bool_)
    for slot, first, last in _gfn_ranges(vm, start, end):
        # The bitmap's index of gfn g of this slot is g + shift.
        shift = (slot.gfn_to_hva(first) >> PAGE_SHIFT) - first_page - first
        if vm.shadow is not None:            # the legacy MMU: its young leaves, one by one
            for leaf in _young_leaves(vm, slot, first, last):
                step = pages_per_level(leaf.level)
                young[max(leaf.gfn, first) + shift:min(leaf.gfn + step, last) + shift] = True
            continue
        for root in vm.tdp.valid_roots(slot.as_id):
            for group in TableGroup.by_level(list(tables(root, first, last))):
                old = group.old
                hits = group.inside & leaf_present(old, group.level) & accessed(old)
                gfns = group.gfns()[hits]
                if group.level == PG_LEVEL_4K:
                    young[gfns + shift] = True
                    continue
                step = pages_per_level(group.level)
                for gfn in gfns.tolist():
                    young[max(gfn, first) + shift:min(gfn + step, last) + shift] = True
    bits = np.packbits(young, bitorder="little").tobytes()
    if vm.tracer.on:
        vm.tracer.emit("kvm_test_age_hva", start=start, end=end, young=bool(young.any()))
    return bits


# -- the walk ------------------------------------------------------------------------

def _check_range(start: int, end: int) -> None:
    if not 0 <= start < end:
        raise einval(f"[{start:#x}, {end:#x}) is not a non-empty hva range")


def _read_side(vm: "Vm") -> contextlib.AbstractContextManager:
    if "aging_without_rcu" in vm.knobs:
        return contextlib.nullcontext()
    return vm.rcu.read_lock()


def _gfn_ranges(vm: "Vm", start: int, end: int) -> list[tuple[Memslot, int, int]]:
    """The dispatcher's view: each memslot overlapping the hva range, with its gfns.
    A list, read once: KVM holds SRCU, so the memslots it walks are the ones it found."""
    return [hit for slots in vm.memslot_sets for hit in slots.in_hva_range(start, end)]


def _young_leaves(vm: "Vm", slot: Memslot, first: int, last: int) -> Iterator[TdpIter]:
    """Every present leaf with Accessed set over gfns [first, last) of the slot, in the
    valid roots of its address space; `it.old_spte` is the value found. (The legacy MMU
    finds them in its rmaps: `YoungLeaf`s, with the same `gfn` and `level`.)"""
    if vm.shadow is not None:
        yield from rmap_aging.young_leaves(vm.shadow, slot, first, last)
        return
    for root in vm.tdp.valid_roots(slot.as_id):
        for it in TdpIter(root, first, last):
            if S.is_leaf_present(it.old_spte, it.level) and S.is_accessed(it.old_spte):
                yield it


def _age_spte(vm: "Vm", it: TdpIter) -> None:
    """`kvm_tdp_mmu_age_spte`: synchronous, so each write below is atomic."""
    old = it.old_spte
    current = it.read()                   # UseAfterFree if the table went meanwhile
    if not S.ad_disabled(old):
        if not S.is_leaf_present(current, it.level):
            return                        # zapped meanwhile: bit 8 is no Accessed bit now
        new = current & ~S.ACCESSED       # fetch-and: a D bit set meanwhile survives
    else:
        new = S.mark_for_access_track(old)
        if current != old:
            return                        # the cmpxchg failed: leave it, it is young
    it.table.spt[it.index] = new
    it.old_spte = new
    if vm.tracer.on:
        vm.tracer.emit("kvm_tdp_mmu_spte_changed", as_id=it.table.as_id, gfn=it.gfn,
                       level=it.level, old=current, new=new)
