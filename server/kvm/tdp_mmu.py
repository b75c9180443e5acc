"""The TDP MMU: roots of EPT page tables and every change made to their SPTEs.

Two doors write an SPTE: `set_spte_atomic` (mmu_lock held for read: compare-and-exchange
against the iterator's snapshot; the fault's 4K install, which walks without an iterator,
goes through the same compare-and-exchange, `_cmpxchg`) and `iter_set_spte` (mmu_lock held
for write). A door that writes an entry above 4K records in the page's `children` the table
the entry now links (or None), in the same step. Both end in `handle_changed_spte`, the one place that keeps the
books: page counts, teardown of an unlinked table, the present-leaf-pfn-never-changes
invariant. A table unlinked from a tree is frozen entry by entry and freed after an RCU
grace period. Functions that may need a TLB flush return `flush` and leave it to the
caller, who flushes before dropping mmu_lock.

Policies (VmConfig, the designs seeds 001 and 002 compare): `table_free` "write_section"
puts a table unlinked under the read lock on `disconnected`, freed once the shared section
that unlinked it is over, inside a short write-side critical section (`free_disconnected`);
`zap_leafs_only` off makes the notifier's zap take a table whose whole span lies in the
range, tables and all, as KVM did before leaf-only zaps; `nx_huge_pages` makes no huge
leaf executable and keeps the tables a fetch linked from becoming huge again until the
recovery worker zaps them (nx_huge_pages.py). In virtual time SPTE writes, table
allocations and frees charge the cost table.
"""

from __future__ import annotations

import asyncio
from array import array
from collections.abc import Iterator
from typing import TYPE_CHECKING, Callable

import numpy as np

from . import spte as S
from . import tdp_bulk
from .spte import (BASE_ADDR_MASK, FROZEN, LEAF_BITS, MMU_PRESENT, MMU_WRITABLE,
                   NONPRESENT, PRESENT_LARGE, WRITABLE, check_writable_invariants)
from .errors import VmBugged
from .mmu_internal import (ACCESS_NEEDS, PFERR_ACCESS_MASK, RET_PF_EMULATE, RET_PF_FIXED,
                           RET_PF_RETRY, RET_PF_SPURIOUS, PageFault, RetPf, fault_spte)
from .mmu_lock import MmuLock
from .mmu_page import MmuPage, PageTables
from .nx_huge_pages import PossibleNxHugePages, disallowed_hugepage_adjust, executable
from .rcu import Rcu
from .resched import Timeslice
from .stats import VmStats
from .tdp_bulk import (TableGroup, leaf_present, set_sptes, shadow_present, tables,
                       walk_tables, writable, write_protected, zapped)
from .tdp_iter import TdpIter, last_spte
from .trace import Tracer
from .types import (MAX_HUGEPAGE_LEVEL, PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K, PT_ENTRIES,
                    pages_per_level)

if TYPE_CHECKING:
    from .memslots import Memslot, Memslots

_NONPRESENT_TABLE = array("Q", [NONPRESENT]) * PT_ENTRIES
_FROZEN_TABLE = array("Q", [FROZEN]) * PT_ENTRIES

__all__ = ["TdpMmu", "max_mapping_level"]


class TdpMmu:
    def __init__(self, *, root_level: int, max_gfn: int, ad_enabled: bool, mmu_lock: MmuLock,
                 rcu: Rcu, stats: VmStats, flush_remote_tlbs: Callable[[], None],
                 tracer: Tracer) -> None:
        self.root_level, self.ad_enabled = root_level, ad_enabled
        self.mmu_lock, self.rcu, self.stat, self.tracer = mmu_lock, rcu, stats, tracer
        self.flush_remote_tlbs = flush_remote_tlbs
        self.tables = PageTables()
        self.roots: list[MmuPage] = []
        self.sanitizers = None           # set by the VM when its sanitizers are on
        self.sched = None                # the VM's preemption points
        self.knobs: frozenset[str] = frozenset()
        self.max_gfn = max_gfn           # the VM's `kvm_mmu_max_gfn()`, inclusive
        self.clock = None                # the VM's virtual clock, if it has one
        self.free_in_write_section = False
        self.zap_leafs_only = True
        self.faults_shared = True            # fault_lock "read"
        self.disconnected: list[MmuPage] = []    # table_free "write_section": to free
        self.nx_huge_pages = False
        self.possible_nx_huge_pages = PossibleNxHugePages(stats)

    @property
    def bulk(self) -> bool:
        """Whether operations over many SPTEs take their bulk paths (`tdp_bulk`): when
        no tracepoint wants an event per SPTE."""
        return not self.tracer.on

    def policy(self, config) -> None:
        """Take the VM's MMU policies (VmConfig: fault_lock, table_free, zap_leafs_only,
        nx_huge_pages)."""
        self.free_in_write_section = config.table_free == "write_section"
        self.zap_leafs_only = config.zap_leafs_only
        self.nx_huge_pages = config.nx_huge_pages
        self.faults_shared = config.fault_lock == "read"

    # -- roots --------------------------------------------------------------------

    def get_root(self, as_id: int) -> MmuPage:
        """A valid root for a vCPU in `as_id`, shared with every vCPU of the same role."""
        self.mmu_lock.assert_held()
        for root in self.valid_roots(as_id):
            root.root_refs += 1
            return root
        root = self.tables.alloc(self.root_level, 0, as_id, is_root=True)
        self.roots.append(root)
        self.stat.tdp_mmu_pages += 1
        return root

    def valid_roots(self, as_id: int) -> Iterator[MmuPage]:
        """The roots of `as_id` a walk may use (`for_each_valid_tdp_mmu_root`): each one's
        `invalid` is read when its turn comes, so a root invalidated while the caller
        walked an earlier one (it may yield) is skipped. The one definition of a valid
        root: faults, dirty logging, aging and the EPT walk all pick roots through it."""
        for root in list(self.roots):
            if root.as_id == as_id and not root.invalid:
                yield root

    def put_root(self, root: MmuPage) -> None:
        root.root_refs -= 1
        if root.root_refs == 0:
            if not root.invalid:
                raise VmBugged(f"last reference to valid root {root!r} dropped")
            if self.sanitizers is not None:
                self.sanitizers.check_root_freed(root)
            self.roots.remove(root)
            self.stat.tdp_mmu_pages -= 1
            self.rcu.call_rcu(lambda: self.tables.free(root))

    def invalidate_all_roots(self) -> list[MmuPage]:
        """Mark every valid root invalid; vCPUs must load fresh roots (and flush)."""
        self.mmu_lock.assert_held_write()
        fresh = [root for root in self.roots if not root.invalid]
        for root in fresh:
            root.invalid = True
        return fresh

    async def zap_invalidated_roots(self, roots: list[MmuPage]) -> None:
        """Zap whole roots marked invalid, then drop the TDP MMU's own reference."""
        self.mmu_lock.assert_held()
        for root in roots:
            await self.zap_root(root, shared=not self.mmu_lock.held_for_write())
            self.put_root(root)

    async def teardown(self, roots: list[MmuPage]) -> None:
        """`kvm_mmu_uninit_tdp_mmu` at VM destruction: zap `roots` (just invalidated) and
        drop the TDP MMU's reference to them. A vCPU inside KVM_RUN keeps its reference
        until it leaves: its fault finds the root invalid and empty, and retries.

        When they are all the roots there are, in bulk: a table at a time instead of an
        SPTE at a time, since a sparsely mapped VM has hundreds of empty entries for each
        present one. Each table is frozen whole (a lockless walker still inside its RCU
        section sees FROZEN and retries, as after a zap) and freed after a grace period;
        no leaf is left, so the leaf counts are zero. Between tables the walk lets other
        tasks run when its timeslice is used up; mmu_lock stays held, as nothing of this
        VM may take it again."""
        self.mmu_lock.assert_held_write()
        if len(self.roots) != len(roots):          # another root is being zapped: its way
            await self.zap_invalidated_roots(roots)
            return
        timeslice = Timeslice(self.sched)
        for root in roots:
            tables = [child for child in root.children if child is not None]
            for page in tables:                     # grows as it goes: every table, once
                if page.children is not None:
                    tables.extend(child for child in page.children if child is not None)
            root.spt[:] = _NONPRESENT_TABLE
            root.children[:] = [None] * PT_ENTRIES
            for page in reversed(tables):           # bottom level first, as zap_root goes
                self._free_unlinked(page)
                if timeslice.need_resched():
                    await timeslice.cond_resched()
            self.put_root(root)
        self.stat.pages_4k = self.stat.pages_2m = self.stat.pages_1g = 0

    def _free_unlinked(self, page: MmuPage) -> None:
        """Freeze a table no tree links any more and free it after a grace period."""
        if self.tracer.on:
            self.tracer.emit("kvm_mmu_prepare_zap_page", as_id=page.as_id, gfn=page.gfn,
                             level=page.level)
        self.stat.tdp_mmu_pages -= 1
        self.possible_nx_huge_pages.unlink(page)
        page.spt[:] = _FROZEN_TABLE
        if "free_tables_immediately" in self.knobs:
            self.tables.free(page)          # debug knob: no grace period for lockless walkers
        else:
            self.rcu.call_rcu(lambda: self.tables.free(page))

    # -- the two doors ------------------------------------------------------------

    def set_spte_atomic(self, it: TdpIter, new: int) -> bool:
        """cmpxchg against `it.old_spte`; on failure refresh the snapshot and say so. For
        mmu_lock held for read; held for write only by faults under fault_lock "write"."""
        self.mmu_lock.assert_held_read() if self.faults_shared else self.mmu_lock.assert_held()
        old = it.old_spte
        if old == FROZEN or it.yielded:
            raise VmBugged("atomic SPTE write from a frozen or stale snapshot")
        if not self._cmpxchg(it.table, it.index, it.level, it.gfn, old, new):
            it.old_spte = it.table.spt[it.index]
            return False
        it.old_spte = new
        return True

    def _cmpxchg(self, table: MmuPage, i: int, level: int, gfn: int, old: int,
                 new: int) -> bool:
        """`set_spte_atomic`'s write, for a snapshot `old` of entry i of `table` (at
        `level`, mapping from `gfn`) that is not FROZEN: the door for iterators, and the
        fault's install at 4K, whose walk needs no iterator (`map`)."""
        spt = table.spt
        if spt[i] != old:
            return False
        spt[i] = new
        if level > PG_LEVEL_4K:
            self._record_child(table, i, new)
        clock = self.clock
        if clock is not None:
            clock.charge(clock.costs.spte_cmpxchg)
        self.handle_changed_spte(table.as_id, gfn, old, new, level, True)
        return True

    def iter_set_spte(self, it: TdpIter, new: int) -> None:
        """Exclusive write (mmu_lock held for write): an exchange, so no Dirty bit is lost."""
        self.mmu_lock.assert_held_write()
        table, i, level = it.table, it.index, it.level
        spt = table.spt
        old = spt[i]
        spt[i] = new
        if level > PG_LEVEL_4K:
            self._record_child(table, i, new)
        if self.clock is not None:
            self.clock.charge(self.clock.costs.spte_write)
        self.handle_changed_spte(table.as_id, it.gfn, old, new, level, shared=False)
        it.old_spte = new

    def _record_child(self, table: MmuPage, i: int, new: int) -> None:
        """Entry i of a table above 4K now holds `new`: record the table it links, or
        that it links none, in `children` (`spte_to_child_pt`, done once per link)."""
        table.children[i] = self.tables.child(S.spte_to_pfn(new)) \
            if new & PRESENT_LARGE == MMU_PRESENT else None

    def handle_changed_spte(self, as_id: int, gfn: int, old: int, new: int, level: int,
                            shared: bool) -> None:
        leaf = LEAF_BITS[level]                 # `is_leaf_present`, spelled out
        was_leaf, is_leaf = old & leaf == leaf, new & leaf == leaf
        if is_leaf:
            if was_leaf and (old ^ new) & BASE_ADDR_MASK:
                raise VmBugged(f"present leaf for gfn {gfn:#x} changed pfn "
                               f"{S.spte_to_pfn(old):#x} -> {S.spte_to_pfn(new):#x} without an "
                               "invalidation")
            if not check_writable_invariants(new):
                raise VmBugged(f"illegal writable bits in SPTE {new:#x} for gfn {gfn:#x}")
        if self.tracer.on:
            self.tracer.emit("kvm_tdp_mmu_spte_changed", as_id=as_id, gfn=gfn, level=level,
                             old=old, new=new)
        if was_leaf != is_leaf:
            if is_leaf and self.sanitizers is not None:
                self.sanitizers.check_new_mapping(as_id, gfn, level)
            self.stat.account_leaf(level, 1 if is_leaf else -1)
        if old & MMU_PRESENT and not was_leaf and (is_leaf or not new & MMU_PRESENT):
            self.handle_removed_pt(self.tables.child(S.spte_to_pfn(old)), shared)

    def handle_removed_pt(self, page: MmuPage, shared: bool) -> None:
        """Tear down an unlinked table: freeze every entry, free the page after RCU."""
        if self.tracer.on:
            self.tracer.emit("kvm_mmu_prepare_zap_page", as_id=page.as_id, gfn=page.gfn,
                             level=page.level)
        self.stat.tdp_mmu_pages -= 1
        self.possible_nx_huge_pages.unlink(page)
        if self.bulk:
            tdp_bulk.remove_pt(self, page, shared)
            self._free_removed_pt(page, shared)
            return
        step = pages_per_level(page.level)
        spt = page.spt
        for i in range(PT_ENTRIES):
            old = spt[i]
            if S.is_frozen(old):
                raise VmBugged(f"entry {i} of unlinked {page!r} is already frozen")
            if not shared and not old & MMU_PRESENT:
                continue
            spt[i] = FROZEN
            self.handle_changed_spte(page.as_id, page.gfn + i * step, old, FROZEN,
                                     page.level, shared)
        self._free_removed_pt(page, shared)

    def _free_removed_pt(self, page: MmuPage, shared: bool) -> None:
        if "free_tables_immediately" in self.knobs:
            self._free(page)                # debug knob: no grace period for lockless walkers
        elif self.free_in_write_section:
            if shared:
                self.disconnected.append(page)   # freed when the shared section is over
            else:
                self._free(page)            # exclusive: no holder of mmu_lock reads it
        else:
            self.rcu.call_rcu(lambda: self._free(page))

    def _free(self, page: MmuPage) -> None:
        if self.clock is not None:
            self.clock.charge(self.clock.costs.table_free)
        self.tables.free(page)

    async def free_disconnected(self) -> None:
        """table_free "write_section": after a shared section that unlinked tables, wait
        out every other holder of mmu_lock in a short write-side critical section; then
        no one who could have reached them holds the lock, and vCPUs flushed their TLBs
        when they were unlinked. Called with mmu_lock not held."""
        if not self.disconnected:
            return
        async with self.mmu_lock.write:
            pages, self.disconnected = self.disconnected, []
        for page in pages:
            self._free(page)

    # -- the fault path's walk (mmu_lock held for read) -----------------------------

    def map(self, fault: PageFault, root: MmuPage) -> RetPf:
        """`kvm_tdp_mmu_map`: walk to the goal level, linking or splitting tables."""
        if self.faults_shared:
            self.mmu_lock.assert_held_read()
        else:
            self.mmu_lock.assert_held_write()
        goal = fault.goal_level
        clock = self.clock
        if clock is not None:
            costs = clock.costs
            clock.charge(costs.tdp_walk_level * (root.level - goal + 1) + costs.make_spte)
        token = self.rcu.enter()
        try:
            if goal == PG_LEVEL_4K:
                # The usual fault: its tables are all linked, and its 4K SPTE is what to
                # set. `last_spte` finds it without an iterator (nothing here awaits, so
                # the path is the one the iterator would step down); a table to link or
                # a FROZEN entry on the way takes the iterator's walk below.
                gfn = fault.gfn
                table, index, level, old = last_spte(root, gfn)
                if level == PG_LEVEL_4K and old != FROZEN:
                    return self._map_target_level(fault, table, index, level, gfn, old)
            # The range is one gfn, so the walk only ever steps down (as far as it can).
            it = TdpIter(root, fault.gfn, fault.gfn + 1, goal)
            it.step_down(far=True)
            while True:
                old = it.old_spte
                if old == FROZEN:
                    return RET_PF_RETRY
                if it.level == goal:
                    if not (self.nx_huge_pages and disallowed_hugepage_adjust(
                            fault, it.table, it.index, old)):
                        return self._map_target_level(fault, it.table, it.index, it.level,
                                                      it.gfn, old)
                    goal = it.min_level = fault.goal_level
                    it.step_down(far=True)
                    continue
                # Not present, or a huge leaf above the goal: link a table in its place.
                sp = self.tables.alloc(it.level - 1, it.gfn, root.as_id)
                if clock is not None:
                    clock.charge(clock.costs.table_alloc)
                sp.nx_huge_page_disallowed = fault.huge_page_disallowed
                huge = S.is_leaf_present(old, it.level)
                if huge:
                    tdp_bulk.fill_small(sp, old, it.level, self.nx_huge_pages)
                if not self.set_spte_atomic(it, S.make_nonleaf(sp.pfn, self.ad_enabled)):
                    self.tables.free(sp)
                    return RET_PF_RETRY
                self.stat.tdp_mmu_pages += 1
                if huge:
                    self.stat.account_leaf(it.level - 1, PT_ENTRIES)
                if fault.huge_page_disallowed and fault.req_level >= it.level:
                    self.possible_nx_huge_pages.track(sp)
                if not it.step_down(far=True):
                    return RET_PF_RETRY
        finally:
            self.rcu.exit(token)

    def _map_target_level(self, fault: PageFault, table: MmuPage, index: int, level: int,
                          gfn: int, old: int) -> RetPf:
        """Install the fault's SPTE at entry `index` of `table`, read as `old` (not
        FROZEN), which maps from `gfn` at the goal level."""
        needs = ACCESS_NEEDS[fault.error_code & PFERR_ACCESS_MASK]      # is_access_allowed
        leaf = LEAF_BITS[level]                 # `is_leaf_present`, spelled out
        if old & leaf == leaf and old & needs:
            return RET_PF_SPURIOUS
        slot = fault.slot
        new = fault_spte(fault, level, self.ad_enabled,
                         executable=executable(level, self.nx_huge_pages))
        if new == old:
            return RET_PF_SPURIOUS
        if not self._cmpxchg(table, index, level, gfn, old, new):
            return RET_PF_RETRY
        if old & MMU_PRESENT and not S.is_last(old, level):
            self.flush_remote_tlbs()          # a table was replaced by a huge leaf
        if slot is None:
            if self.tracer.on:
                self.tracer.emit("mark_mmio_spte", gfn=fault.gfn, gen=fault.generation)
            return RET_PF_EMULATE
        return RET_PF_FIXED

    # -- zaps ---------------------------------------------------------------------

    async def zap_leafs(self, root: MmuPage, start: int, end: int, flush: bool = False) -> bool:
        """Leaf-only zap of [start, end) (mmu_lock held for write): tables stay, and a huge
        page only partly inside the range goes whole. May yield the lock; returns whether
        zaps since the last flush still need one."""
        self.mmu_lock.assert_held_write()
        end = min(end, self.max_gfn + 1)
        leafs_only = self.zap_leafs_only
        if self.bulk and leafs_only:
            def zap(group: TableGroup) -> bool:
                old = group.old
                new = zapped(old, group.inside & leaf_present(old, group.level))
                return set_sptes(self, group, new, False) > 0 and not root.invalid

            with _YieldingWalk(self, shared=False) as walk:
                return await walk_tables(walk, root, start, end, zap, flush=flush,
                                         flush_on_yield=True)
        with _YieldingWalk(self, shared=False) as walk:
            for it in TdpIter(root, start, end):
                if walk.need_resched(it):
                    await walk.cond_resched(it, flush)
                    flush = False
                    continue
                if not S.is_leaf_present(it.old_spte, it.level):
                    # Before leaf-only zaps: a table wholly inside the range goes too.
                    if leafs_only or not it.old_spte & MMU_PRESENT or it.gfn < start or \
                            it.gfn + pages_per_level(it.level) > end:
                        continue
                self.iter_set_spte(it, NONPRESENT)
                flush = flush or not root.invalid
        return flush

    async def unmap_gfn_range(self, as_id: int, start: int, end: int) -> bool:
        """The MMU notifier's zap: valid and invalid roots of the address space."""
        flush = False
        for root in [r for r in self.roots if r.as_id == as_id]:
            root.root_refs += 1              # the root must outlive a yield
            try:
                flush = await self.zap_leafs(root, start, end, flush)
            finally:
                self.put_root(root)
        return flush

    async def zap_root(self, root: MmuPage, shared: bool) -> None:
        """Zap everything under a root, bottom level first, so each pass stays short."""
        if shared:
            self.mmu_lock.assert_held_read()
        else:
            self.mmu_lock.assert_held_write()
        with _YieldingWalk(self, shared) as walk:
            for zap_level in (PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G, root.level):
                if self.bulk:
                    def zap(group: TableGroup) -> bool:
                        if group.level != zap_level:
                            return False
                        old = group.old
                        new = zapped(old, group.inside & shadow_present(old))
                        return set_sptes(self, group, new, shared) > 0

                    await walk_tables(walk, root, 0, self.max_gfn + 1, zap, zap_level)
                    continue
                for it in TdpIter(root, 0, self.max_gfn + 1, zap_level):
                    if walk.need_resched(it):
                        await walk.cond_resched(it, False)
                        continue
                    if not it.old_spte & MMU_PRESENT or it.level > zap_level:
                        continue
                    if shared:
                        while not self.set_spte_atomic(it, NONPRESENT):
                            if not it.old_spte & MMU_PRESENT:
                                break
                    else:
                        self.iter_set_spte(it, NONPRESENT)

    # -- introspection ------------------------------------------------------------

    def walk(self, root: MmuPage, gfn: int) -> list[tuple[int, int, int, int]]:
        """(level, base gfn, index, spte) of every SPTE on the path to gfn, root first."""
        with self.rcu.read_lock():
            return [(it.level, it.gfn, it.index, it.old_spte)
                    for it in TdpIter(root, gfn, gfn + 1)]

    # -- dirty logging: write-protection, eager split, huge page recovery -----------

    def _each_valid_root(self, as_id: int) -> Iterator[MmuPage]:
        """`for_each_valid_tdp_mmu_root_yield_safe`: `valid_roots`, each referenced while
        the caller walks it (a walk that yields may see it invalidated, never freed)."""
        for root in self.valid_roots(as_id):
            root.root_refs += 1
            try:
                yield root
            finally:
                self.put_root(root)

    async def wrprot_slot(self, slot: "Memslot", min_level: int) -> bool:
        """`kvm_tdp_mmu_wrprot_slot` (mmu_lock held for read): clear W on every present
        leaf of the slot at or above `min_level`. MMU-writable stays, so the fast page
        fault may give W back (and mark the page dirty). Returns whether a TLB flush is
        needed; the caller flushes."""
        self.mmu_lock.assert_held_read()
        flush = False

        def wrprot(group: TableGroup) -> bool:
            old = group.old
            protect = group.inside & leaf_present(old, group.level) & writable(old)
            return set_sptes(self, group, write_protected(old, protect), True) > 0

        for root in self._each_valid_root(slot.as_id):
            with _YieldingWalk(self, shared=True) as walk:
                if self.bulk:
                    if await walk_tables(walk, root, slot.base_gfn, slot.end_gfn, wrprot,
                                         min_level):
                        flush = True
                    continue
                for it in TdpIter(root, slot.base_gfn, slot.end_gfn, min_level):
                    if walk.need_resched(it):
                        await walk.cond_resched(it, False)
                        continue
                    while S.is_leaf_present(it.old_spte, it.level) and \
                            S.is_writable(it.old_spte):
                        if self.set_spte_atomic(it, it.old_spte & ~WRITABLE):
                            flush = True
                            break
        return flush

    def clear_dirty_pt_masked(self, slot: "Memslot", gfn: int, mask: int) -> int:
        """`kvm_tdp_mmu_clear_dirty_pt_masked` in write-protect mode (no PML; mmu_lock held
        for write): clear W on the 4K leaf of `gfn + i` for every bit i of `mask`; huge
        leaves are left alone. Returns the SPTEs write-protected; the caller flushes."""
        self.mmu_lock.assert_held_write()
        done = 0
        first = gfn + (mask & -mask).bit_length() - 1
        with self.rcu.read_lock():
            for root in self.valid_roots(slot.as_id):
                left = mask
                for it in TdpIter(root, first, gfn + 64):
                    if not left:
                        break
                    if it.level != PG_LEVEL_4K or not S.is_leaf_present(it.old_spte, it.level):
                        continue
                    bit = 1 << (it.gfn - gfn)
                    if not left & bit:
                        continue
                    left &= ~bit
                    if S.is_writable(it.old_spte):
                        self.iter_set_spte(it, it.old_spte & ~WRITABLE)
                        done += 1
        return done

    def clear_dirty_pages(self, slot: "Memslot", gfn: int, dirty: np.ndarray) -> int:
        """`clear_dirty_pt_masked` in bulk (mmu_lock held for write): clear W on the 4K
        leaf of `gfn + i` for every true `dirty[i]`. Returns the SPTEs write-protected."""
        self.mmu_lock.assert_held_write()
        done = 0
        with self.rcu.read_lock():
            roots = list(self.valid_roots(slot.as_id))
            if not roots:
                return 0
            # `dirty` with a table's worth of False either side: every 4K table that
            # reaches the range reads its 512 flags from `padded`, no bounds to check.
            padded = np.zeros(len(dirty) + 2 * PT_ENTRIES, np.bool_)
            padded[PT_ENTRIES:PT_ENTRIES + len(dirty)] = dirty
            for root in roots:
                leaf_tables = [entry for entry in tables(root, gfn, gfn + len(dirty))
                               if entry[0].level == PG_LEVEL_4K]
                for group in TableGroup.chunks(PG_LEVEL_4K, leaf_tables):
                    first = [page.gfn - gfn + PT_ENTRIES for page in group.pages]
                    if first[-1] - first[0] == PT_ENTRIES * (len(first) - 1):
                        # Consecutive tables (the usual case): one slice of `padded`.
                        flags = padded[first[0]:first[-1] + PT_ENTRIES]
                        flags = flags.reshape(-1, PT_ENTRIES)
                    else:
                        flags = padded[np.array(first)[:, None] + _COLUMNS]
                    old = group.old
                    protect = flags & leaf_present(old, PG_LEVEL_4K) & writable(old)
                    done += set_sptes(self, group, write_protected(old, protect), False)
        return done

    def write_protect_gfn(self, slot: "Memslot", gfn: int, min_level: int) -> bool:
        """`kvm_tdp_mmu_write_protect_gfn` (mmu_lock held for write): clear W and
        MMU-writable on the leaf at or above `min_level` that maps gfn, so that the next
        write takes the slow path. Returns whether anything changed; the caller flushes."""
        self.mmu_lock.assert_held_write()
        changed = False
        with self.rcu.read_lock():
            for root in self.valid_roots(slot.as_id):
                for it in TdpIter(root, gfn, gfn + 1, min_level):
                    if not S.is_leaf_present(it.old_spte, it.level):
                        continue
                    new = it.old_spte & ~(WRITABLE | MMU_WRITABLE)
                    if new != it.old_spte:
                        self.iter_set_spte(it, new)
                        changed = True
                    break
        return changed

    async def try_split_huge_pages(self, slot: "Memslot", start: int, end: int,
                                   target_level: int) -> int:
        """`kvm_tdp_mmu_try_split_huge_pages` (mmu_lock held for read): eager page
        splitting of [start, end) in the slot's address space down to `target_level`. The
        walk visits a new table before its entries, so a 1G leaf ends as 4K leaves too.
        Children keep the huge leaf's bits: no flush. Returns the huge leaves split."""
        self.mmu_lock.assert_held_read()
        split = 0
        for root in self._each_valid_root(slot.as_id):
            with _YieldingWalk(self, shared=True) as walk:
                for it in TdpIter(root, start, end, target_level + 1):
                    if walk.need_resched(it):
                        await walk.cond_resched(it, False)
                        continue
                    split += self._split_huge_leaf(it, root.as_id, shared=True)
        return split

    def split_huge_pages_locked(self, slot: "Memslot", start: int, end: int,
                                target_level: int) -> int:
        """The same with mmu_lock held for write, for the short ranges of a masked
        re-protection (64 pages at most): it never yields."""
        self.mmu_lock.assert_held_write()
        split = 0
        with self.rcu.read_lock():
            for root in self.valid_roots(slot.as_id):
                for it in TdpIter(root, start, end, target_level + 1):
                    split += self._split_huge_leaf(it, root.as_id, shared=False)
        return split

    def _split_huge_leaf(self, it: TdpIter, as_id: int, shared: bool) -> int:
        """`tdp_mmu_split_huge_page`: link a table of 512 children in place of the huge
        leaf at `it`. 1 if split, 0 if `it` holds no huge leaf (any more)."""
        while it.level > PG_LEVEL_4K and S.is_leaf_present(it.old_spte, it.level):
            huge = it.old_spte
            sp = self.tables.alloc(it.level - 1, it.gfn, as_id)
            tdp_bulk.fill_small(sp, huge, it.level, self.nx_huge_pages)
            table = S.make_nonleaf(sp.pfn, self.ad_enabled)
            if not shared:
                self.iter_set_spte(it, table)
            elif not self.set_spte_atomic(it, table):
                self.tables.free(sp)             # another task changed it: look again
                continue
            self.stat.tdp_mmu_pages += 1
            self.stat.account_leaf(it.level - 1, PT_ENTRIES)
            if self.tracer.on:
                self.tracer.emit("kvm_mmu_split_huge_page", gfn=it.gfn, level=it.level)
            return 1
        return 0

    async def recover_huge_pages(self, slot: "Memslot",
                                 host_mapping_level: Callable[[int], int]) -> int:
        """`kvm_tdp_mmu_recover_huge_pages` (mmu_lock held for read; dirty logging was
        turned off): a table at 2M or 1G whose range starts inside the slot, at a level
        `max_mapping_level` allows, is replaced by a huge leaf made from any leaf below
        it; `handle_changed_spte` tears the table down. Flushes TLBs if anything changed;
        returns the huge leaves made."""
        self.mmu_lock.assert_held_read()
        start, end = slot.base_gfn, slot.end_gfn
        made = 0
        for root in self._each_valid_root(slot.as_id):
            flush = False
            with _YieldingWalk(self, shared=True) as walk:
                for it in TdpIter(root, start, end, PG_LEVEL_2M):
                    if walk.need_resched(it):
                        await walk.cond_resched(it, flush)
                        flush = False
                        continue
                    while it.level <= MAX_HUGEPAGE_LEVEL and start <= it.gfn < end and \
                            S.is_shadow_present(it.old_spte) and \
                            not S.is_last(it.old_spte, it.level) and \
                            max_mapping_level(slot, it.gfn, host_mapping_level) >= it.level:
                        huge = self._make_huge_spte(it)
                        if huge is None:
                            break
                        if self.set_spte_atomic(it, huge):
                            flush = True
                            made += 1
                            break
            if flush:
                self.flush_remote_tlbs()
        return made

    def _make_huge_spte(self, it: TdpIter) -> int | None:
        """`kvm_tdp_mmu_make_huge_spte`: a huge leaf at `it.level` from the first present
        leaf under the table at `it`; None if the table maps nothing."""
        child = self.tables.child(S.spte_to_pfn(it.old_spte))
        for sub in TdpIter(child, it.gfn, it.gfn + pages_per_level(it.level)):
            if S.is_leaf_present(sub.old_spte, sub.level):
                huge = S.make_huge(sub.old_spte, it.level)
                return S.make_nonexecutable(huge) if self.nx_huge_pages else huge
        return None

    # -- the NX huge page recovery worker ----------------------------------------------

    async def recover_nx_huge_pages(self, memslot_sets: "list[Memslots]", ratio: int) -> int:
        """`kvm_recover_nx_huge_pages` (mmu_lock held for write): take the oldest
        ceil(n / ratio) of the n possible NX huge pages off the list
        (`PossibleNxHugePages.recover`). Each is zapped (the entry that links it), so that
        the next fault that is not a fetch maps its range huge. Yields mmu_lock when a task
        waits for it, flushing first. Returns the tables zapped."""
        self.mmu_lock.assert_held_write()
        zapped = 0
        flush = False
        with _YieldingWalk(self, shared=False) as walk:
            for sp, zap in self.possible_nx_huge_pages.recover(memslot_sets, ratio):
                if zap:
                    self._zap_sp(sp)
                    flush = True
                    zapped += 1
                if walk.need_resched_bulk():
                    await walk.cond_resched(None, flush)
                    flush = False
        if flush:
            self.flush_remote_tlbs()
        return zapped

    def _zap_sp(self, sp: MmuPage) -> None:
        """`kvm_tdp_mmu_zap_sp`: zap the entry that links `sp`; the teardown of `sp`
        takes it off the list. A table is linked from one entry of one root."""
        for root in self.roots:
            if root.as_id != sp.as_id:
                continue
            it = TdpIter(root, sp.gfn, sp.gfn + 1, sp.level + 1)
            it.step_down(far=True)
            if it.level == sp.level + 1 and it.old_spte & PRESENT_LARGE == MMU_PRESENT and \
                    it.table.children[it.index] is sp:
                self.iter_set_spte(it, NONPRESENT)
                return
        raise VmBugged(f"possible NX huge page {sp!r} is linked from no root")


def max_mapping_level(slot: "Memslot", gfn: int, host_mapping_level: Callable[[int], int]
                      ) -> int:
    """`kvm_mmu_max_mapping_level`: the largest leaf the memslot's lpage rules and the host
    mapping of gfn's hva allow."""
    level = slot.max_lpage_level(gfn, MAX_HUGEPAGE_LEVEL)
    if level == PG_LEVEL_4K:
        return level
    return min(level, host_mapping_level(slot.gfn_to_hva(gfn)))

_COLUMNS = np.arange(PT_ENTRIES)

YIELD_BATCH = 4096          # SPTEs a walk may visit before it yields unasked (need_resched)


class _YieldingWalk:
    """A long walk under mmu_lock inside an RCU read-side section, which yields both the
    way `tdp_mmu_iter_cond_resched` does (`need_resched`, then `cond_resched`)."""

    def __init__(self, mmu: TdpMmu, shared: bool) -> None:
        self.mmu, self.shared = mmu, shared
        self.visited = 0
        self.token = 0

    def __enter__(self) -> "_YieldingWalk":
        self.token = self.mmu.rcu.enter()
        return self

    def __exit__(self, *exc) -> None:
        self.mmu.rcu.exit(self.token)

    def need_resched(self, it: TdpIter) -> bool:
        """Yield now? Only after forward progress, and only when a task waits for the lock
        or the walk has visited a batch of SPTEs."""
        self.visited += 1
        if it.next_last_level_gfn == it.yielded_gfn:
            return False
        return self.need_resched_bulk()

    def need_resched_bulk(self) -> bool:
        """The same between two tables of a bulk walk, which always made progress."""
        return self.visited >= YIELD_BATCH or self.mmu.mmu_lock.needbreak()

    async def cond_resched(self, it: TdpIter | None, flush: bool) -> None:
        """Flush if needed, drop RCU and the lock, let others run, retake them; the walk
        restarts from the root at `it.next_last_level_gfn`."""
        mmu = self.mmu
        lock = mmu.mmu_lock
        if flush and "skip_zap_tlb_flush" not in mmu.knobs:
            mmu.flush_remote_tlbs()
        mmu.rcu.exit(self.token)
        if self.shared:
            lock.release_read()
        else:
            lock.release_write()
        try:
            await mmu.sched.point("tdp.cond_resched")
            await asyncio.sleep(0)
        finally:
            if self.shared:
                await lock.acquire_read()
            else:
                await lock.acquire_write()
            self.token = mmu.rcu.enter()
        if it is not None:
            it.mark_yielded()
        self.visited = 0
        mmu.stat.tdp_mmu_yields += 1
