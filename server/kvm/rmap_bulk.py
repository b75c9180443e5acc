"""Bulk write-protection of the legacy MMU: the SPTEs of many rmap heads at a time.

`rmap_write_protect` visits a head's SPTEs one by one; for dirty logging (GET/CLEAR, ring
resets, enabling logging on a slot) that is one turn of a Python loop per page. Here the
heads of a span are read as one numpy array (the slot's `array('Q')`, no copy), the
heads that hold a single SPTE are decoded to (table, index) all at once, grouped by table,
and each table's SPTEs are tested and written with a few array operations on the
shadow page's own `array('Q')` (tdp_bulk.sptes: the same memory). The per-SPTE path's
rules hold:

- the same bits go: W only (`spte_write_protect`), or W and MMU-writable for
  `pt_protect`; host-writable always stays. An SPTE changes only if one of them was set,
  and only then does it count toward the flush decision;
- the return value is the per-SPTE path's: the number of heads whose SPTEs changed
  (`rmap_write_protect`'s flush, summed);
- a head that holds a descriptor chain (`RMAP_MANY`) goes through the per-SPTE path
  (`ShadowMmu._write_protect_head`): with TDP a gfn has one SPTE per address space but
  while `zap_all_fast` is under way, so such heads are rare; the lock bit of a head is
  ignored, as `kvm_rmap_get` does under mmu_lock held for write;
- an rmap entry into a freed table raises `UseAfterFree`, as `_sptep_table` does;
- virtual time pays `spte_write` per SPTE changed, as the per-SPTE path does.

The caller holds mmu_lock for write and makes no await while a span is written; yields
stay where `RmapWalk` puts them (between spans, which end where a per-chunk walk would
yield). With tracing on, `kvm_mmu_set_spte` wants an event per SPTE: the legacy MMU then
takes its per-SPTE path (`ShadowMmu.bulk`). Either path leaves the same SPTEs and stats.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .rmap import RMAP_LOCKED, RMAP_MANY
from .spte import MMU_WRITABLE, WRITABLE
from .tdp_bulk import sptes

if TYPE_CHECKING:
    from array import array

    from .shadow_mmu import ShadowMmu

__all__ = ["write_protect_heads"]

_U64 = np.uint64
_MANY = _U64(RMAP_MANY)
_NOT_LOCKED = _U64(((1 << 64) - 1) & ~RMAP_LOCKED)
_TWELVE, _THREE, _INDEX = _U64(12), _U64(3), _U64(511)


def write_protect_heads(mmu: "ShadowMmu", heads: "array", lo: int, hi: int,
                        where: np.ndarray | None, pt_protect: bool) -> int:
    """`rmap_write_protect` of the heads [lo, hi) of `heads` (those with a true `where[i -
    lo]`, or all): W (and MMU-writable for `pt_protect`) off their SPTEs. Returns the
    heads that had an SPTE to change."""
    values = np.frombuffer(heads, dtype=_U64)[lo:hi] & _NOT_LOCKED
    if where is not None:
        values = values[where]
    values = values[values != 0]
    if not len(values):
        return 0
    many = (values & _MANY) != 0
    done = 0
    if many.any():
        for val in values[many].tolist():
            done += mmu._write_protect_head(val, pt_protect)
        values = values[~many]
        if not len(values):
            return done
    values.sort()                          # by table, then index
    pfns = values >> _TWELVE
    indices = ((values >> _THREE) & _INDEX).astype(np.intp)
    bounds = np.flatnonzero(pfns[1:] != pfns[:-1]) + 1
    clear = _U64(WRITABLE | MMU_WRITABLE if pt_protect else WRITABLE)
    keep = ~clear
    changed = 0
    starts = [0] + bounds.tolist()
    ends = bounds.tolist() + [len(values)]
    for start, end, pfn in zip(starts, ends, pfns[starts].tolist()):
        spt = sptes(mmu._sptep_table(pfn << 12))
        index = indices[start:end]
        old = spt[index]
        hit = (old & clear) != 0
        if hit.any():
            index = index[hit]
            spt[index] = old[hit] & keep
            changed += len(index)
    mmu._charge("spte_write", changed)
    return done + changed
