"""Bulk SPTE operations of the TDP MMU: the entries of a whole table at a time.

A page-table page's `array('Q')` seen as a numpy array (`sptes`: the same memory, no copy)
lets an operation that changes many SPTEs the same way (clear W for dirty logging, zap
the leaves of a range, freeze an unlinked table) test and write a table's entries in a
few array operations instead of one turn of a Python loop each. The per-SPTE paths' rules
hold here too:

- every write goes through one bulk door, `set_sptes`, whose bookkeeping
  (`handle_changed_sptes`) does for each SPTE it changed what `handle_changed_spte` does
  for one: the present-leaf-pfn-never-changes and writable-bit invariants, the leaf
  counts, the sanitizers' new-mapping check, and the teardown of an unlinked table;
- the locking contract is the per-SPTE path's: with mmu_lock held for read a write must
  be atomic, and a table's update here is synchronous (no await), so it is.

Tracepoints are per SPTE: with tracing on, the TDP MMU takes its per-SPTE paths, which
emit them (`TdpMmu.bulk` says which). Either path leaves the same SPTEs, bitmaps and
stats (`tdp_mmu_yields` aside: the bulk walks yield between tables).

`tables` walks the tables holding the SPTEs of a gfn range, a table before its children,
by `children`; `walk_tables` does so under mmu_lock and yields it between tables as the
per-SPTE walks do (a walk that yielded starts again from the root after the last table
it finished).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from .errors import VmBugged
from .mmu_page import MmuPage, UseAfterFree
from .spte import (ACCESSED, BASE_ADDR_MASK, FROZEN, HOST_WRITABLE, LARGE, LEAF_BITS,
                   MMU_PRESENT, MMU_WRITABLE, NONPRESENT, PRESENT_LARGE, WRITABLE,
                   make_executable)
from .types import PG_LEVEL_4K, PT_ENTRIES, level_shift, pages_per_level

if TYPE_CHECKING:
    from .tdp_mmu import TdpMmu, _YieldingWalk

__all__ = ["sptes", "leaf_present", "shadow_present", "writable", "accessed",
           "write_protected", "zapped", "bits_to_pages", "TableGroup", "tables", "walk_tables",
           "set_sptes", "handle_changed_sptes", "remove_pt", "fill_small"]

_U64 = np.uint64
_ALL = (1 << 64) - 1
_PRESENT = _U64(MMU_PRESENT)
_NONPRESENT = _U64(NONPRESENT)
_W = _U64(WRITABLE)
_NOT_W = _U64(_ALL & ~WRITABLE)
_ACCESSED = _U64(ACCESSED)
_PRESENT_LARGE = _U64(PRESENT_LARGE)
_BASE = _U64(BASE_ADDR_MASK)
_W_BITS = _U64(HOST_WRITABLE | MMU_WRITABLE | WRITABLE)
# check_writable_invariants' legal (host, mmu, W) combinations: 111, 110, 100, 000.
_LEGAL_W = tuple(_U64(bits) for bits in (HOST_WRITABLE | MMU_WRITABLE | WRITABLE,
                                         HOST_WRITABLE | MMU_WRITABLE, HOST_WRITABLE, 0))
_LEAF = (None,) + tuple(_U64(bits) for bits in LEAF_BITS[1:])
_FROZEN = _U64(FROZEN)
# By child level: entry i of a table made from a huge leaf maps pfn + i * pages_per_level,
# as bits 12-51 of an SPTE (make_small's pfn, for all 512 children at once).
_CHILD_PFNS = (None,) + tuple(
    (np.arange(PT_ENTRIES, dtype=_U64) * _U64(pages_per_level(level))) << _U64(12)
    for level in range(1, 5))


def sptes(page: MmuPage) -> np.ndarray:
    """The page's 512 SPTEs as uint64, sharing the page's memory."""
    if page.freed:
        raise UseAfterFree(f"read of freed {page!r}")
    return np.frombuffer(page.spt, dtype=_U64)


def leaf_present(values: np.ndarray, level: int) -> np.ndarray:
    """`is_leaf_present` of each SPTE at `level`."""
    bits = _LEAF[level]
    return (values & bits) == bits


def shadow_present(values: np.ndarray) -> np.ndarray:
    """`is_shadow_present` of each SPTE."""
    return (values & _PRESENT) != 0


def writable(values: np.ndarray) -> np.ndarray:
    """`is_writable` of each SPTE."""
    return (values & _W) != 0


def accessed(values: np.ndarray) -> np.ndarray:
    """`is_accessed` of each SPTE."""
    return (values & _ACCESSED) != 0


def write_protected(values: np.ndarray, where: np.ndarray) -> np.ndarray:
    """The SPTEs with W cleared where `where` holds (MMU-writable stays)."""
    return np.where(where, values & _NOT_W, values)


def zapped(values: np.ndarray, where: np.ndarray) -> np.ndarray:
    """The SPTEs made NONPRESENT where `where` holds."""
    return np.where(where, _NONPRESENT, values)


def bits_to_pages(words: np.ndarray) -> np.ndarray:
    """A bitmap of 64-bit words (bit i of word j: page 64j + i) as one bool per page."""
    return np.unpackbits(words.astype("<u8", copy=False).view(np.uint8),
                         bitorder="little").view(np.bool_)


# Tables one array operation covers at most: temporaries of 64 KiB stay in the cache and
# in malloc's heap (larger ones are fresh mmaps, whose page faults cost more than the work).
CHUNK_TABLES = 16


class TableGroup:
    """Tables of one level from a walk, read in one step: `old[r]` holds the SPTEs of
    `pages[r]` when the group was made, `inside[r]` marks the entries the walk's range
    reaches. The caller holds mmu_lock (or RCU) and makes no await until it is done."""

    __slots__ = ("level", "pages", "old", "inside")
    _COLUMNS = np.arange(PT_ENTRIES)

    def __init__(self, level: int, batch: list[tuple[MmuPage, int, int]]) -> None:
        self.level = level
        self.pages = [page for page, _, _ in batch]
        for page in self.pages:
            if page.freed:
                raise UseAfterFree(f"read of freed {page!r}")
        joined = b"".join([page.spt for page in self.pages])
        self.old = np.frombuffer(joined, dtype=_U64).reshape(len(batch), PT_ENTRIES)
        bounds = np.array([(lo, hi) for _, lo, hi in batch]).reshape(len(batch), 2)
        self.inside = (self._COLUMNS >= bounds[:, :1]) & (self._COLUMNS < bounds[:, 1:])

    def gfns(self) -> np.ndarray:
        """The first gfn each entry maps."""
        base = np.array([page.gfn for page in self.pages], dtype=np.int64)
        return base[:, None] + self._COLUMNS * pages_per_level(self.level)

    @staticmethod
    def chunks(level: int, batch: list[tuple[MmuPage, int, int]]) -> Iterator["TableGroup"]:
        """Groups of at most CHUNK_TABLES of the batch's tables, all at `level`."""
        for i in range(0, len(batch), CHUNK_TABLES):
            yield TableGroup(level, batch[i:i + CHUNK_TABLES])

    @staticmethod
    def by_level(batch: list[tuple[MmuPage, int, int]]) -> list["TableGroup"]:
        levels: dict[int, list[tuple[MmuPage, int, int]]] = {}
        for entry in batch:
            levels.setdefault(entry[0].level, []).append(entry)
        return [TableGroup(level, entries) for level, entries in sorted(levels.items())]


# -- the walk -----------------------------------------------------------------------------

def tables(root: MmuPage, start: int, end: int, min_level: int = PG_LEVEL_4K
           ) -> Iterator[tuple[MmuPage, int, int]]:
    """(table, lo, hi) for every table at `min_level` or above that holds an SPTE of gfns
    [start, end), a table before its children: entries [lo, hi) of it do. Synchronous:
    the caller holds mmu_lock or RCU across each step."""
    def visit(page: MmuPage) -> Iterator[tuple[MmuPage, int, int]]:
        shift = level_shift(page.level)
        lo = max(start - page.gfn, 0) >> shift
        hi = min(((end - 1 - page.gfn) >> shift) + 1, PT_ENTRIES)
        yield page, lo, hi
        if page.level > min_level:
            children = page.children
            for i in range(lo, hi):
                child = children[i]
                if child is not None:
                    yield from visit(child)

    if root.freed:
        raise UseAfterFree(f"walk of freed {root!r}")
    if start < end:
        yield from visit(root)


async def walk_tables(walk: "_YieldingWalk", root: MmuPage, start: int, end: int,
                      visit: Callable[[TableGroup], bool], min_level: int = PG_LEVEL_4K,
                      flush: bool = False, flush_on_yield: bool = False) -> bool:
    """Call `visit(group)` for the tables `tables` gives, grouped by level, under the
    walk's mmu_lock, a batch at a time: a batch ends after a table at `min_level` when a
    task waits for the lock or the walk visited `YIELD_BATCH` SPTEs since it last yielded
    (`need_resched`, asked between tables); then the walk yields the lock and walks again
    from the next gfn. `visit` says whether it changed an SPTE. Returns whether any did;
    with `flush_on_yield`, only since the last yield, which flushed them (as `zap_leafs`
    does)."""
    gfn = start
    while gfn < end:
        batch: list[tuple[MmuPage, int, int]] = []
        resume = end
        for entry in tables(root, gfn, end, min_level):
            batch.append(entry)
            page, lo, hi = entry
            walk.visited += hi - lo
            if page.level == min_level and walk.need_resched_bulk():
                resume = page.gfn + (hi << level_shift(page.level))
                break
        for group in TableGroup.by_level(batch):
            if visit(group):
                flush = True
        if resume >= end:
            break
        await walk.cond_resched(None, flush and flush_on_yield)
        if flush_on_yield:
            flush = False
        gfn = resume
    return flush


# -- the bulk door and its bookkeeping -----------------------------------------------------

def set_sptes(mmu: "TdpMmu", group: TableGroup, new: np.ndarray, shared: bool) -> int:
    """The tables of `group` hold `new` from now on, in the same synchronous step that
    read `group.old` (mmu_lock held for read when `shared`, for write otherwise): the bulk
    `set_spte_atomic` / `iter_set_spte`, for writes that link no table. Returns the SPTEs
    changed."""
    if shared:
        mmu.mmu_lock.assert_held_read()
    else:
        mmu.mmu_lock.assert_held_write()
    changed = group.old != new
    rows = np.flatnonzero(changed.any(axis=1))
    if not rows.size:
        return 0
    if len(rows) == len(group.pages) and changed.all():
        old_values, new_values = group.old.ravel(), new.ravel()
    else:
        old_values, new_values = group.old[changed], new[changed]
    if (old_values == _FROZEN).any():
        raise VmBugged(f"bulk SPTE write over a frozen entry at level {group.level}")
    _write(mmu, group, rows, changed, new, shared)
    clock = mmu.clock
    if clock is not None:                    # in virtual time: what one at a time costs
        clock.charge(len(old_values) *
                     (clock.costs.spte_cmpxchg if shared else clock.costs.spte_write))
    handle_changed_sptes(mmu, group, changed, old_values, new_values, shared)
    return len(old_values)


def _write(mmu: "TdpMmu", group: TableGroup, rows: np.ndarray, changed: np.ndarray,
           new: np.ndarray, shared: bool) -> None:
    if group.level > PG_LEVEL_4K:
        if ((new[changed] & _PRESENT_LARGE) == _PRESENT).any():
            raise VmBugged(f"a bulk write at level {group.level} would link a table")
        unlinked = changed & ((group.old & _PRESENT_LARGE) == _PRESENT)
        for r, i in zip(*(axis.tolist() for axis in np.nonzero(unlinked))):
            group.pages[r].children[i] = None   # `_record_child` of a non-table SPTE
    pages = group.pages
    for r in rows.tolist():
        # The whole table in one copy; its unchanged entries get the values they hold.
        memoryview(pages[r].spt).cast("B")[:] = new[r].view(np.uint8)


def handle_changed_sptes(mmu: "TdpMmu", group: TableGroup, changed: np.ndarray,
                         old: np.ndarray, new: np.ndarray, shared: bool) -> None:
    """`handle_changed_spte` for the entries `changed` of a group's tables, which went
    from `old` to `new` (tracing is off: the bulk paths run only then)."""
    level = group.level
    bits = _LEAF[level]
    is_leaf = (new & bits) == bits
    if not ((old ^ new) & (_BASE | bits)).any():
        # No entry became or stopped being a present leaf, none moved to another pfn:
        # of the bookkeeping only the check of the writable bits applies.
        _check_writable(group, changed, new, is_leaf)
        return
    was_leaf = (old & bits) == bits
    if is_leaf.any():
        moved = was_leaf & is_leaf & (((old ^ new) & _BASE) != 0)
        if moved.any():
            k = int(moved.argmax())
            mmu.handle_changed_spte(group.pages[0].as_id, _gfn(group, changed, k),
                                    int(old[k]), int(new[k]), level, shared)  # raises
        _check_writable(group, changed, new, is_leaf)
    appeared = is_leaf & ~was_leaf
    delta = int(np.count_nonzero(appeared)) - int(np.count_nonzero(was_leaf & ~is_leaf))
    if mmu.sanitizers is not None and appeared.any():
        gfns = group.gfns()[changed]
        for k in np.flatnonzero(appeared).tolist():
            mmu.sanitizers.check_new_mapping(group.pages[0].as_id, int(gfns[k]), level)
    if delta:
        mmu.stat.account_leaf(level, delta)
    if level > PG_LEVEL_4K:
        unlinked = ((old & _PRESENT_LARGE) == _PRESENT) & (is_leaf | ((new & _PRESENT) == 0))
        for spte in old[unlinked].tolist():
            mmu.handle_removed_pt(mmu.tables.child((spte & BASE_ADDR_MASK) >> 12), shared)


def _check_writable(group: TableGroup, changed: np.ndarray, new: np.ndarray,
                    is_leaf: np.ndarray) -> None:
    """`check_writable_invariants` of every new present leaf."""
    wbits = new & _W_BITS
    legal = (wbits == _LEGAL_W[0]) | (wbits == _LEGAL_W[1]) | (wbits == _LEGAL_W[2]) \
        | (wbits == _LEGAL_W[3])
    illegal = is_leaf & ~legal
    if illegal.any():
        k = int(illegal.argmax())
        raise VmBugged(f"illegal writable bits in SPTE {int(new[k]):#x} for gfn "
                       f"{_gfn(group, changed, k):#x}")


def _gfn(group: TableGroup, changed: np.ndarray, k: int) -> int:
    """The gfn of the k-th changed entry."""
    return int(group.gfns()[changed][k])


def remove_pt(mmu: "TdpMmu", page: MmuPage, shared: bool) -> None:
    """`handle_removed_pt`'s freeze of an unlinked table, in bulk: every entry (under the
    read lock, where a lockless writer may still race) or every present one becomes
    FROZEN, with the bookkeeping of each."""
    group = TableGroup(page.level, [(page, 0, PT_ENTRIES)])
    old = group.old
    frozen = old == _FROZEN
    if frozen.any():
        raise VmBugged(f"entry {int(frozen.argmax(axis=None))} of unlinked {page!r} is "
                       "already frozen")
    freeze = group.inside if shared else shadow_present(old)
    new = np.where(freeze, _FROZEN, old)
    changed = old != new
    rows = np.flatnonzero(changed.any(axis=1))
    if rows.size:
        _write(mmu, group, rows, changed, new, shared)
        handle_changed_sptes(mmu, group, changed, old[changed], new[changed], shared)


def fill_small(page: MmuPage, huge: int, huge_level: int, nx_huge_pages: bool) -> None:
    """The 512 entries of a table made from the huge leaf `huge` (`make_small` of each).
    Under the NX huge page mitigation 4K children are executable again
    (`make_small_spte`: the mitigation applies to huge leaves only)."""
    child_level = huge_level - 1
    bits = huge & ~BASE_ADDR_MASK
    if child_level == PG_LEVEL_4K:
        bits &= ~LARGE
        if nx_huge_pages:
            bits = make_executable(bits)
    frame = _U64(huge & BASE_ADDR_MASK)
    values = sptes(page)
    np.bitwise_or(_CHILD_PFNS[child_level] + frame, _U64(bits), out=values)
