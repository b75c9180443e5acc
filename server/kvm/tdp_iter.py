"""The TDP iterator: one cursor for every walk of a root's SPTEs over [start, end).

Walk order, as `next()` does it:
  1. if the walk yielded (dropped mmu_lock), restart from the root at `next_last_level_gfn`;
  2. step down into the child of a present non-leaf SPTE, if above `min_level`
     (re-reading the SPTE first: another task may have changed it);
  3. otherwise step to the next SPTE of the same table;
  4. otherwise step up and try 3 again; above the root the walk ends.
The walk also ends when `gfn` reaches `end`. `old_spte` is the snapshot every
compare-and-exchange is made against.
"""

from __future__ import annotations

from .errors import VmBugged
from .mmu_page import MmuPage, UseAfterFree
from .spte import MMU_PRESENT, NONPRESENT, PRESENT_LARGE
from .types import LEVEL_SHIFT, PG_LEVEL_4K, PT_ENTRIES, pages_per_level

__all__ = ["TdpIter", "last_spte"]

# `level_shift` by level, and the mask of an index into a table.
_SHIFT = LEVEL_SHIFT
_INDEX_MASK = PT_ENTRIES - 1


class TdpIter:
    __slots__ = ("root", "root_level", "min_level", "end", "next_last_level_gfn",
                 "yielded_gfn", "pt_path", "table", "level", "gfn", "index", "old_spte",
                 "valid", "yielded")

    def __init__(self, root: MmuPage, start: int, end: int,
                 min_level: int = PG_LEVEL_4K) -> None:
        self.root = root
        level = self.root_level = root.level
        self.min_level, self.end = min_level, end
        path = self.pt_path = [None] * (level + 1)    # the table at each level, by level
        path[level] = root
        self.next_last_level_gfn = start
        self._restart()

    def __iter__(self):
        while self.valid and self.gfn < self.end:
            yield self
            self.next()

    # -- position -----------------------------------------------------------------

    def _restart(self) -> None:
        # `table` is the table at `level` (pt_path[level]).
        self.yielded = False
        gfn = self.yielded_gfn = self.next_last_level_gfn
        level = self.level = self.root_level
        self.table = self.root
        shift = _SHIFT[level]
        self.gfn = gfn >> shift << shift
        self.index = (gfn >> shift) & _INDEX_MASK
        self.old_spte = self.read()
        self.valid = True

    @staticmethod
    def _round(gfn: int, level: int) -> int:
        return gfn & ~((1 << ((level - 1) * 9)) - 1)

    def read(self) -> int:
        """Re-read the current SPTE (another task may have written it)."""
        page, index = self.table, self.index
        if page.freed:
            raise UseAfterFree(f"read of freed {page!r} at index {index}")
        return page.spt[index]

    # -- movement -----------------------------------------------------------------

    def next(self) -> None:
        if self.yielded:
            self._restart()
            return
        if self.step_down():
            return
        while not self._step_side():
            if not self._step_up():
                self.valid = False
                return

    def step_down(self, far: bool = False) -> bool:
        """Step into the child table of a present non-leaf SPTE here, above `min_level`.

        The SPTE is re-read first (another task may have changed it); each child entry is
        read as the step lands on it. With `far`, go on stepping down while present tables
        lead and `min_level` allows: a walk of one gfn (the fault's map) only ever steps
        down, and takes all its steps in one call. False if it did not step at all."""
        level = self.level
        if level == self.min_level:
            return False
        spte = self.read()
        last = self.min_level if far else level - 1
        path, gfn = self.pt_path, self.next_last_level_gfn
        table, index, child = self.table, self.index, None
        # min_level is PG_LEVEL_4K at the lowest, so no step starts from a 4K SPTE.
        while spte & PRESENT_LARGE == MMU_PRESENT:          # a present non-leaf
            child = table.children[index]
            if child is None:
                raise VmBugged(f"SPTE {spte:#x} links no recorded table")
            level -= 1
            path[level] = table = child
            index = (gfn >> _SHIFT[level]) & _INDEX_MASK
            spte = child.spt[index]
            if level == last:
                break
        if child is None:
            self.old_spte = spte
            return False
        shift = _SHIFT[level]
        self.level, self.table, self.old_spte = level, child, spte
        self.gfn, self.index = gfn >> shift << shift, index
        return True

    def _step_side(self) -> bool:
        index = self.index
        if index == _INDEX_MASK:
            return False
        self.gfn = self.next_last_level_gfn = self.gfn + (1 << _SHIFT[self.level])
        self.index = index + 1
        self.old_spte = self.read()
        return True

    def _step_up(self) -> bool:
        if self.level == self.root_level:
            return False
        self.level += 1
        self.table = self.pt_path[self.level]
        self.gfn = self._round(self.gfn, self.level)
        self.index = (self.gfn >> _SHIFT[self.level]) & _INDEX_MASK
        return True

    def mark_yielded(self) -> None:
        """After dropping mmu_lock: the snapshot is stale, the next step restarts."""
        self.yielded = True


# By root level (4 or 5, VmConfig.tdp_levels): the first gfn the root's tables do not reach.
# A VM's `max_gfn` is below it (2^36 - 1 under 4 levels; under 5, 2^40 - 1: the host's
# 52-bit MAXPHYADDR), so this bound only keeps a stray gfn from wrapping.
_GFN_REACH = {root_level: pages_per_level(root_level + 1) for root_level in (4, 5)}


def last_spte(root: MmuPage, gfn: int) -> tuple[MmuPage, int, int, int]:
    """(table, index, level, spte) of the last SPTE on the way to gfn: the leaf, or the
    first SPTE that is not present (NONPRESENT, at index -1 of the root, for a gfn beyond
    the root's reach).

    `kvm_tdp_mmu_fast_pf_get_last_sptep`: the iterator's walk over [gfn, gfn + 1) cut to
    its one path, for the lockless callers that only want the leaf.

    Above the leaf it steps by `children`, reading only the SPTE it stops at. The walk
    never awaits, so every table it passes is linked from the root at that moment, and in
    a linked table the doors keep `children[i]` set exactly when SPTE i is a present
    non-leaf: the path is the one the SPTEs give. A freed root (the caller holds it) or a
    freed table at the end (a table freed while linked: a bug) is a use after free.

    The steps are spelled out, a 5-level root's first: every fault the fast path fixes
    walks here, and a loop over the levels costs it about a quarter more."""
    if root.freed:
        raise UseAfterFree(f"read of freed {root!r}")
    level = root.level
    if gfn >= _GFN_REACH[level]:
        # No SPTE maps gfn (its indices would wrap onto a low gfn's), as the hardware
        # walker finds none.
        return root, -1, level, NONPRESENT
    table = root
    if level == 5:
        index = gfn >> 36
        table = root.children[index]
        if table is None:                          # a huge leaf, or not present
            return root, index, 5, root.spt[index]
    index = gfn >> 27 & _INDEX_MASK
    child = table.children[index]
    if child is None:
        return table, index, 4, table.spt[index]
    table = child
    index = gfn >> 18 & _INDEX_MASK
    child = table.children[index]
    if child is None:
        return table, index, 3, table.spt[index]
    table = child
    index = gfn >> 9 & _INDEX_MASK
    child = table.children[index]
    if child is None:
        return table, index, 2, table.spt[index]
    if child.freed:
        raise UseAfterFree(f"SPTE walk reached freed {child!r}")
    index = gfn & _INDEX_MASK
    return child, index, PG_LEVEL_4K, child.spt[index]
