"""Aging through the legacy MMU's rmaps: with mmu_lock held for write, or without it (seed 000).

`kvm_rmap_age_gfn_range` picks the walk:

- A/D bits on, or `fast_only` (MGLRU asks only what it can learn cheaply): the lockless
  walk, `kvm_rmap_age_gfn_range_lockless`. It takes each non-empty head's lock read-only,
  so no rmap change (an add, a remove, a descriptor freed) happens under it, and walks its
  SPTEs. A young SPTE with A/D bits on loses its Accessed bit by an atomic clear_bit; one
  with A/D off is reported young and left as it is: marking it for access tracking is a
  read-modify-write of the whole SPTE, which outside mmu_lock would race the lock's
  holders. A holder that clears an SPTE (drop_spte) and then waits for the head's lock to
  take it out of the rmap would find the SPTE present again when the ager stores what it
  computed from its older read: a lost change, and a leaf no rmap lists. (The
  `lockless_age_access_track` debug knob makes the lockless walk do it anyway.) The head
  lock is taken where the walk may be preempted inside a head (a point that can switch
  tasks); free-running, a head's walk is one synchronous step and needs none.
- otherwise (A/D off): `__kvm_rmap_age_gfn_range` with mmu_lock held for write, which may
  mark SPTEs for access tracking; the fast page fault restores them on the next access.
  The walk yields mmu_lock between chunks of heads (rmap_walk.py).

Invariant: aging never zaps, never changes an rmap and never flushes a TLB.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import compress
from typing import TYPE_CHECKING, NamedTuple

from . import spte as S
from .memslots import Memslot
from .mmu_page import UseAfterFree
from .rmap import RMAP_MANY, sptep_index
from .rmap_walk import RmapWalk
from .types import MAX_HUGEPAGE_LEVEL, PG_LEVEL_4K, pages_per_level

if TYPE_CHECKING:
    from .shadow_mmu import ShadowMmu

__all__ = ["YoungLeaf", "young_leaves", "age_gfn_ranges"]


class YoungLeaf(NamedTuple):
    gfn: int          # the leaf's first gfn
    level: int


def _heads(mmu: "ShadowMmu", slot: Memslot, first: int, last: int):
    """(heads, index) of every non-empty rmap head of gfns [first, last) of the slot, by
    level from 4K up."""
    rmaps = mmu.slot_rmaps.get((slot.as_id, slot.id))
    for level in range(PG_LEVEL_4K, MAX_HUGEPAGE_LEVEL + 1) if rmaps is not None else ():
        lo, hi = rmaps.span(first, last, level)
        heads = rmaps.heads[level]
        for i in compress(range(lo, hi), heads[lo:hi]):
            yield heads, i, level


def young_leaves(mmu: "ShadowMmu", slot: Memslot, first: int, last: int
                 ) -> Iterator[YoungLeaf]:
    """Every present leaf with Accessed set over gfns [first, last) of the slot. A read of
    the rmaps that changes nothing and never awaits: atomic in vmmu, it needs no lock
    (`kvm_rmap_get`)."""
    rmaps = mmu.rmaps
    for heads, i, level in _heads(mmu, slot, first, last):
        for sptep in rmaps.sptes(heads[i]):
            sp = mmu._sptep_table(sptep)
            spte = sp.spt[sptep_index(sptep)]
            if S.is_leaf_present(spte, level) and S.is_accessed(spte):
                yield YoungLeaf(sp.gfn + sptep_index(sptep) * pages_per_level(level), level)


async def age_gfn_ranges(mmu: "ShadowMmu", ranges: list[tuple[Memslot, int, int]],
                         fast_only: bool) -> bool:
    """`kvm_age_gfn` over each (slot, first, last): was any of it young? Old afterwards,
    except A/D-disabled SPTEs a lockless walk found (reported young, left young)."""
    if mmu.clock is not None:
        mmu.clock.charge(mmu.clock.costs.age_spte * sum(last - first for _, first, last
                                                        in ranges))
    if mmu.ad_enabled or fast_only:
        young = False
        for slot, first, last in ranges:
            young = await _age_lockless(mmu, slot, first, last) or young
        return young
    async with mmu.mmu_lock.write:
        young = False
        walk = RmapWalk(mmu, flush_on_yield=False)        # aging flushes nothing
        for slot, first, last in ranges:
            young = await _age_locked(walk, slot, first, last) or young
        return young


async def _age_locked(walk: RmapWalk, slot: Memslot, first: int, last: int) -> bool:
    """`__kvm_rmap_age_gfn_range` (mmu_lock held for write): `mmu_spte_age` on each
    young leaf; the walk yields mmu_lock."""
    young = False
    async for heads, level, indices in walk.chunks(slot, first, last, PG_LEVEL_4K,
                                                   MAX_HUGEPAGE_LEVEL):
        for i in indices:
            young = _age_head(walk.mmu, heads[i], level, True) or young
    return young


def _age_head(mmu: "ShadowMmu", val: int, level: int, access_track: bool) -> bool:
    """Age the young leaves of one head in one synchronous step: clear Accessed, and mark
    A/D-disabled SPTEs for access tracking only if `access_track`. Was any young?"""
    young = False
    for sptep in mmu.rmaps.sptes(val):
        sp = mmu._sptep_table(sptep)
        index = sptep_index(sptep)
        spte = sp.spt[index]
        if S.is_leaf_present(spte, level) and S.is_accessed(spte):
            young = True
            if access_track or not S.ad_disabled(spte):
                sp.spt[index] = S.mark_for_access_track(spte)
    return young


async def _age_lockless(mmu: "ShadowMmu", slot: Memslot, first: int, last: int) -> bool:
    """`kvm_rmap_age_gfn_range_lockless`: no mmu_lock; each head locked read-only while
    the walk may be preempted in it. Where points cannot switch tasks (free-running), a
    head's walk is one synchronous step: its lock, taken and dropped within it, would
    exclude nobody (no writer holds a head across an await), so it is not taken, and the
    walk costs no coroutine step per head or SPTE."""
    mark = "lockless_age_access_track" in mmu.knobs
    if not mmu.sched.preempts:
        young = False
        for heads, i, level in _heads(mmu, slot, first, last):
            young = _age_head(mmu, heads[i], level, mark) or young
        return young
    rmaps, point = mmu.rmaps, mmu.sched.point
    young = False
    for heads, i, level in _heads(mmu, slot, first, last):
        val = await rmaps.lock_readonly(heads, i)
        many = val & RMAP_MANY
        try:
            for sptep in rmaps.sptes(val):
                sp = mmu._sptep_table(sptep)
                index = sptep_index(sptep)
                spte = sp.spt[index]
                if S.is_leaf_present(spte, level) and S.is_accessed(spte):
                    young = True
                    if mark or not S.ad_disabled(spte):   # else: report young, leave it
                        # Another CPU runs here: a fault, a zap, a writer waiting for
                        # this head.
                        await point("rmap_age.before_clear")
                        _age_spte(sp, index, spte, level)
                if many:
                    # Preempted between two entries of a descriptor chain: the next
                    # read is of the descriptor, which only the head's lock keeps.
                    await point("rmap_age.next_spte")
        finally:
            rmaps.unlock_readonly(heads, i, val)
    return young


def _age_spte(sp, index: int, spte: int, level: int) -> None:
    """The lockless ager's change of a young SPTE it read as `spte` (and was preempted
    since): clear_bit of Accessed, atomic; or, A/D off (only with the knob), the store of
    the access-tracked value computed from that older read."""
    if sp.freed:
        raise UseAfterFree(f"lockless aging wrote freed {sp!r}")
    if not S.ad_disabled(spte):
        current = sp.spt[index]
        if S.is_leaf_present(current, level):
            sp.spt[index] = current & ~S.ACCESSED
    else:
        sp.spt[index] = S.mark_for_access_track(spte)
