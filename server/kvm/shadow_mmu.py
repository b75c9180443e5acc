"""The legacy (shadow) MMU with TDP: `kvm_mmu_page`s in a hash, rmaps, write-lock faults.

What KVM runs with `tdp_mmu=0` and EPT on: the same SPTE format and hardware walker as the
TDP MMU, other structures and locking (reference §3; docs/legacy-mmu.md):

- every page-table page is a shadow page (`ShadowPage`), found by (gfn, level, as_id) in
  a hash and kept there until zapped; it records the SPTEs that link it (`parent_ptes`, a
  pte_list like an rmap head). `get_child_sp` finds or makes the page under an entry;
  `link` puts it there (dropping a huge leaf that was in the way);
- every present leaf is in the rmap of its gfn and level (rmap.py): added when installed
  (`rmap_add`), removed when dropped. Zaps of gfn ranges, write-protection and aging
  walk the rmaps, not the tables;
- faults hold mmu_lock for write, so SPTE writes under it are plain stores; only the fast
  page fault (cmpxchg, without mmu_lock), the hardware walker (A/D) and lockless aging
  (clearing A, seed 000) change SPTEs beside them;
- a zapped page is unlinked from its parents and children by `prepare_zap` (onto an
  invalid list) and freed by `commit_zap` after the remote TLB flush, which waits for
  vCPUs in a lockless walk (here: a grace period of the read-side sections those walks
  run in). Roots still referenced are only marked invalid, and freed by the last
  `put_root`;
- `zap_all_fast` makes every page obsolete by moving `mmu_valid_gen`, then zaps the
  obsolete pages in batches, yielding mmu_lock between them with its invalid list
  pending.

Invariants: a present leaf SPTE in a linked page is in exactly one rmap entry of its gfn
and level; a present non-leaf SPTE links `children[i]`, whose `parent_ptes` holds it; a
page is freed only after it is unreachable and a flush (and grace period) has passed.
"""

from __future__ import annotations

from array import array
from itertools import compress
from typing import TYPE_CHECKING, Callable

import numpy as np

from . import spte as S
from .errors import VmBugged
from .mmu_internal import (ACCESS_NEEDS, PFERR_ACCESS_MASK, RET_PF_EMULATE, RET_PF_FIXED,
                           RET_PF_SPURIOUS, PageFault, RetPf, fault_spte)
from .mmu_lock import MmuLock
from .mmu_page import MmuPage, PageTables, UseAfterFree
from .nx_huge_pages import PossibleNxHugePages, disallowed_hugepage_adjust, executable
from .rcu import Rcu
from .rmap import PTE_LIST_DESC_BYTES, Rmaps, SlotRmaps, sptep_index, sptep_of
from .rmap_bulk import write_protect_heads
from .rmap_walk import RmapWalk, yield_write_lock
from .spte import MMU_PRESENT, MMU_WRITABLE, NONPRESENT, PRESENT_LARGE, WRITABLE
from .stats import VmStats
from .tdp_mmu import max_mapping_level
from .trace import Tracer
from .types import MAX_HUGEPAGE_LEVEL, PAGE_SIZE, PG_LEVEL_4K, gfn_round_down, \
    LEVEL_SHIFT, pages_per_level

if TYPE_CHECKING:
    from .memslots import Memslot, Memslots
    from .sched import Scheduler

__all__ = ["ShadowMmu", "ShadowPage", "SpteChangeLost", "BATCH_ZAP_PAGES"]

BATCH_ZAP_PAGES = 10        # pages zap_obsolete_pages zaps before it may yield mmu_lock
KVM_MIN_ALLOC_MMU_PAGES = 64   # the least n_max_mmu_pages KVM_SET_NR_MMU_PAGES accepts
KVM_MIN_FREE_MMU_PAGES = 5     # a fault makes room below this many available pages...
KVM_REFILL_PAGES = 25          # ...until this many are


class SpteChangeLost(VmBugged):
    """An SPTE that mmu_lock's holder cleared is present again: someone changed it
    outside mmu_lock, and one of the two changes is lost (KVM's WARN in mmu_spte_set)."""


class ShadowPage(MmuPage):
    """`struct kvm_mmu_page` of a direct (TDP) shadow page: role = (level, as_id)."""

    __slots__ = ("mmu_valid_gen", "parent_ptes")

    def __init__(self, pfn: int, level: int, gfn: int, as_id: int, is_root: bool) -> None:
        super().__init__(pfn, level, gfn, as_id, is_root)
        self.root_refs = 0                    # root_count: vCPUs (and walks) using it
        self.mmu_valid_gen = 0
        self.parent_ptes = array("Q", [0])    # an rmap head: the SPTEs linking this page


class _ShadowPageTables(PageTables):
    def alloc(self, level: int, gfn: int, as_id: int, is_root: bool = False) -> ShadowPage:
        page = ShadowPage(self._pfns.alloc(PG_LEVEL_4K), level, gfn, as_id, is_root)
        self.by_pfn[page.pfn] = page
        return page


class ShadowMmu:
    def __init__(self, *, root_level: int, max_gfn: int, ad_enabled: bool, mmu_lock: MmuLock,
                 rcu: Rcu,
                 stats: VmStats, flush_remote_tlbs: Callable[[], None], tracer: Tracer,
                 sched: "Scheduler", knobs: frozenset[str],
                 memslot_sets: list["Memslots"]) -> None:
        self.root_level, self.ad_enabled = root_level, ad_enabled
        self.mmu_lock, self.rcu, self.stat, self.tracer = mmu_lock, rcu, stats, tracer
        self.flush_remote_tlbs = flush_remote_tlbs
        self.sched, self.knobs, self.memslot_sets = sched, knobs, memslot_sets
        self.clock = sched.clock              # virtual time, or None
        self.sanitizers = None                # set by the VM when its sanitizers are on
        self.tables = _ShadowPageTables()
        self.hash: dict[tuple[int, int, int], list[ShadowPage]] = {}
        self.active: dict[ShadowPage, None] = {}      # active_mmu_pages, oldest first
        self.roots: list[ShadowPage] = []             # roots not yet freed
        self.mmu_valid_gen = 0
        self.rmaps = Rmaps(sched, knobs)
        self.slot_rmaps: dict[tuple[int, int], SlotRmaps] = {}
        self.max_gfn = max_gfn           # the VM's `kvm_mmu_max_gfn()`, inclusive
        self.n_max_mmu_pages: int | None = None   # KVM_SET_NR_MMU_PAGES; None: no limit
        self.nx_huge_pages = False            # VmConfig.nx_huge_pages (nx_huge_pages.py)
        self.possible_nx_huge_pages = PossibleNxHugePages(stats)

    @property
    def bulk(self) -> bool:
        """Whether write-protection takes its bulk path (`rmap_bulk`): when no tracepoint
        wants an event per SPTE."""
        return not self.tracer.on

    def valid_roots(self, as_id: int):
        """The roots of `as_id` that vCPUs may still load (not obsolete)."""
        return (root for root in self.roots if root.as_id == as_id and not self.is_obsolete(root))

    # -- shadow pages ---------------------------------------------------------------

    def is_obsolete(self, sp: ShadowPage) -> bool:
        return sp.invalid or sp.mmu_valid_gen != self.mmu_valid_gen

    def _get_sp(self, gfn: int, level: int, as_id: int, is_root: bool) -> ShadowPage:
        """`kvm_mmu_get_shadow_page`: the valid page of this gfn and role, or a new one."""
        self._charge("sp_hash_lookup")
        bucket = self.hash.setdefault((gfn, level, as_id), [])
        for sp in bucket:
            if not self.is_obsolete(sp):
                return sp
        self._charge("table_alloc")
        sp = self.tables.alloc(level, gfn, as_id, is_root)
        sp.mmu_valid_gen = self.mmu_valid_gen
        bucket.append(sp)
        self.active[sp] = None
        self.stat.mmu_cache_miss += 1
        self.stat.mmu_shadow_pages += 1
        if self.tracer.on:
            self.tracer.emit("kvm_mmu_get_page", gfn=gfn, level=level, as_id=as_id,
                             created=True)
        return sp

    def _charge(self, cost: str, n: int = 1) -> None:
        """Virtual time: the running actor pays `n` of the named cost."""
        if self.clock is not None:
            self.clock.charge(getattr(self.clock.costs, cost) * n)

    def get_root(self, as_id: int) -> ShadowPage:
        """`mmu_alloc_direct_roots`: the valid root of `as_id`, one more reference."""
        self.mmu_lock.assert_held()
        root = self._get_sp(0, self.root_level, as_id, is_root=True)
        if root not in self.roots:
            self.roots.append(root)
        root.root_refs += 1
        return root

    def put_root(self, root: ShadowPage) -> None:
        """`kvm_mmu_free_root`: the last reference to an invalid root frees it."""
        root.root_refs -= 1
        # A root still active is zapped by the zap under way, which sees it unreferenced.
        if root.root_refs == 0 and root.invalid and root not in self.active:
            self.roots.remove(root)
            self._commit_zap([root])

    def get_child_sp(self, parent: ShadowPage, index: int) -> ShadowPage:
        """`kvm_mmu_get_child_sp`: the page for entry `index` of `parent`, which must not
        link one already."""
        if parent.spt[index] & PRESENT_LARGE == MMU_PRESENT:
            raise VmBugged(f"entry {index} of {parent!r} already links a page")
        level = parent.level
        gfn = parent.gfn + index * pages_per_level(level)
        return self._get_sp(gfn, level - 1, parent.as_id, is_root=False)

    async def _link(self, parent: ShadowPage, index: int, child: ShadowPage) -> None:
        """`link_shadow_page`: a huge leaf in the way is dropped (and flushed) first."""
        if S.is_shadow_present(parent.spt[index]):
            await self._drop_spte(parent, index)       # drop_large_spte
            self.flush_remote_tlbs()
        self._spte_set(parent, index, S.make_nonleaf(child.pfn, self.ad_enabled))
        parent.children[index] = child
        await self.rmaps.add(child.parent_ptes, 0, sptep_of(parent.pfn, index))

    def _spte_set(self, sp: ShadowPage, index: int, new: int) -> None:
        """`mmu_spte_set`: only over a non-present SPTE. A present one here means someone
        changed it outside mmu_lock after its holder cleared it: a lost change."""
        old = sp.spt[index]
        if S.is_shadow_present(old):
            raise SpteChangeLost(f"SPTE {old:#x} at entry {index} of {sp!r} became present again "
                           "while mmu_lock was held for write: a change made outside "
                           "mmu_lock was lost")
        sp.spt[index] = new
        self._charge("spte_write")

    # -- rmaps of memslots ----------------------------------------------------------

    def prepare_memslot(self, old: "Memslot | None", new: "Memslot | None") -> None:
        """`kvm_arch_prepare_memory_region`/`_free_memslot`: a created or moved slot gets
        empty rmaps, a flags change keeps its own, a deleted slot's go (every SPTE of it
        was zapped before: its rmaps must be empty)."""
        if old is not None and (new is None or new.base_gfn != old.base_gfn):
            gone = self.slot_rmaps.pop((old.as_id, old.id), None)
            if gone is not None and not gone.empty():
                raise VmBugged(f"slot {old.as_id}:{old.id} goes with SPTEs in its rmaps")
        if new is not None and (new.as_id, new.id) not in self.slot_rmaps:
            self.slot_rmaps[(new.as_id, new.id)] = SlotRmaps(new)

    def _head(self, as_id: int, gfn: int, level: int) -> tuple[array, int]:
        """`gfn_to_rmap`: the head of gfn at `level` in the memslot that holds gfn."""
        slot = self.memslot_sets[as_id].lookup(gfn)
        if slot is None:
            raise VmBugged(f"no memslot holds gfn {gfn:#x} for its rmap")
        rmaps = self.slot_rmaps[(as_id, slot.id)]
        return rmaps.heads[level], rmaps.index(gfn, level)

    def _sptep_table(self, sptep: int) -> ShadowPage:
        table = self.tables.by_pfn.get(sptep >> 12)
        if table is None:
            raise UseAfterFree(f"rmap entry {sptep:#x} points into a freed page table")
        return table

    # -- the fault path (mmu_lock held for write) -------------------------------------

    async def map(self, fault: PageFault, root: ShadowPage) -> RetPf:
        """`direct_map`: walk to the goal level, linking pages, then `mmu_set_spte`."""
        self.mmu_lock.assert_held_write()
        gfn = fault.gfn
        sp, level = root, root.level
        if self.clock is not None:
            costs = self.clock.costs
            self.clock.charge(costs.tdp_walk_level * (level - fault.goal_level + 1) +
                              costs.make_spte)
        while True:
            index = gfn >> LEVEL_SHIFT[level] & 511
            if self.nx_huge_pages:
                disallowed_hugepage_adjust(fault, sp, index, sp.spt[index])
            if level == fault.goal_level:
                break
            if sp.spt[index] & PRESENT_LARGE != MMU_PRESENT:
                child = self.get_child_sp(sp, index)
                await self._link(sp, index, child)
                if fault.huge_page_disallowed:
                    self.possible_nx_huge_pages.account(child, fault.req_level >= level)
            sp = sp.children[index]
            level -= 1
        return await self._set_spte(fault, sp, index)

    async def _set_spte(self, fault: PageFault, sp: ShadowPage, index: int) -> RetPf:
        """`mmu_set_spte`: install the leaf (or MMIO SPTE) and add it to its rmap."""
        old, level = sp.spt[index], sp.level
        needs = ACCESS_NEEDS[fault.error_code & PFERR_ACCESS_MASK]      # is_access_allowed
        if S.is_leaf_present(old, level) and old & needs:
            return RET_PF_SPURIOUS
        slot = fault.slot
        flush = rmapped = False
        if S.is_shadow_present(old):
            if not S.is_last(old, level):
                # A huge leaf replaces a table: the page below is unlinked, not zapped.
                await self._drop_parent_pte(sp.children[index], sp, index)
                flush = True
            elif slot is None or S.spte_to_pfn(old) != fault.pfn:
                await self._drop_spte(sp, index)
                flush = True
            else:
                rmapped = True
        new = fault_spte(fault, level, self.ad_enabled,
                         executable=executable(level, self.nx_huge_pages))
        if new == old:
            return RET_PF_SPURIOUS
        sp.spt[index] = new
        self._charge("spte_write")
        gfn = gfn_round_down(fault.gfn, level)
        if self.tracer.on:
            self.tracer.emit("kvm_mmu_set_spte", gfn=gfn, level=level, old=old, new=new)
        if flush or S.leaf_change_needs_tlb_flush(old, new):
            self.flush_remote_tlbs()
        if slot is None:
            if self.tracer.on:
                self.tracer.emit("mark_mmio_spte", gfn=fault.gfn, gen=fault.generation)
            return RET_PF_EMULATE
        if not rmapped:
            self.stat.account_leaf(level, 1)
            if self.sanitizers is not None:
                self.sanitizers.check_new_mapping(sp.as_id, gfn, level)
            heads, i = self._head(sp.as_id, gfn, level)
            count = await self.rmaps.add(heads, i, sptep_of(sp.pfn, index))
            if count >= self.stat.max_mmu_rmap_size:
                self.stat.max_mmu_rmap_size = count + 1
        return RET_PF_FIXED

    # -- dropping SPTEs -------------------------------------------------------------

    def _clear_leaf(self, sptep: int) -> None:
        """`mmu_spte_clear_track_bits` for an SPTE its rmap entry is leaving with."""
        sp = self._sptep_table(sptep)
        index = sptep_index(sptep)
        old = sp.spt[index]
        sp.spt[index] = NONPRESENT
        self._charge("spte_write")
        if S.is_leaf_present(old, sp.level):
            self.stat.account_leaf(sp.level, -1)
        if self.tracer.on:
            self.tracer.emit("kvm_mmu_set_spte", gfn=sp.gfn + index * pages_per_level(sp.level),
                             level=sp.level, old=old, new=NONPRESENT)

    async def _drop_spte(self, sp: ShadowPage, index: int) -> None:
        """`drop_spte`: clear a leaf, then take it out of its rmap (which may spin while a
        lockless walker holds the head)."""
        sptep = sptep_of(sp.pfn, index)
        old = sp.spt[index]
        self._clear_leaf(sptep)
        if S.is_leaf_present(old, sp.level):
            heads, i = self._head(sp.as_id, sp.gfn + index * pages_per_level(sp.level),
                                  sp.level)
            await self.rmaps.remove(heads, i, sptep)

    async def _drop_parent_pte(self, child: ShadowPage, parent: ShadowPage, index: int) -> None:
        """`drop_parent_pte`: clear the table pointer and forget it in the child."""
        parent.spt[index] = NONPRESENT
        parent.children[index] = None
        await self.rmaps.remove(child.parent_ptes, 0, sptep_of(parent.pfn, index))

    # -- zapping pages: prepare onto an invalid list, commit after the flush -----------

    async def prepare_zap(self, sp: ShadowPage, invalid_list: list[ShadowPage]) -> None:
        """`__kvm_mmu_prepare_zap_page`: unlink the page from its children and parents and
        mark it invalid; an unreferenced page goes onto `invalid_list`, a referenced root
        stays until its last `put_root`."""
        self.mmu_lock.assert_held_write()
        if self.tracer.on:
            self.tracer.emit("kvm_mmu_prepare_zap_page", as_id=sp.as_id, gfn=sp.gfn,
                             level=sp.level)
        self.stat.mmu_shadow_zapped += 1
        spt = sp.spt
        for index in compress(range(len(spt)), [s & MMU_PRESENT for s in spt]):
            if S.is_last(spt[index], sp.level):
                await self._drop_spte(sp, index)
            else:
                await self._drop_parent_pte(sp.children[index], sp, index)
        for sptep in list(self.rmaps.sptes(sp.parent_ptes[0])):
            await self._drop_parent_pte(sp, self._sptep_table(sptep), sptep_index(sptep))
        self.possible_nx_huge_pages.unlink(sp)       # unaccount_nx_huge_page
        sp.invalid = True
        self.hash[(sp.gfn, sp.level, sp.as_id)].remove(sp)
        self.active.pop(sp, None)
        if sp.root_refs:
            return
        if sp.is_root and sp in self.roots:
            self.roots.remove(sp)
        if "free_sp_before_flush" in self.knobs:
            self._free(sp)               # debug knob: before the flush kicks lockless walkers
        else:
            invalid_list.append(sp)

    def _commit_zap(self, invalid_list: list[ShadowPage]) -> None:
        """`kvm_mmu_commit_zap_page`: flush remote TLBs, which waits for vCPUs in lockless
        walks; then free. vmmu's lockless walks run in RCU read-side sections, so the
        pages go after a grace period: the same guarantee."""
        if not invalid_list:
            return
        self.flush_remote_tlbs()
        for sp in invalid_list:
            if not sp.invalid or sp.root_refs:
                raise VmBugged(f"{sp!r} committed while valid or referenced")
            if not sp.freed:
                self.rcu.call_rcu(lambda sp=sp: self._free(sp))

    def _free(self, sp: ShadowPage) -> None:
        self._charge("table_free")
        self.stat.mmu_shadow_pages -= 1
        self.tables.free(sp)

    async def zap_all_fast(self) -> None:
        """`kvm_mmu_zap_all_fast` (mmu_lock held for write): every page becomes obsolete,
        roots are invalid at once (the caller kicks vCPUs to reload), and the obsolete
        pages are zapped, oldest first, yielding the lock between batches."""
        self.mmu_lock.assert_held_write()
        self.mmu_valid_gen += 1
        if self.tracer.on:
            self.tracer.emit("kvm_mmu_zap_all_fast", mmu_valid_gen=self.mmu_valid_gen,
                             used_pages=len(self.active))
        for root in self.roots:
            root.invalid = True
        invalid_list: list[ShadowPage] = []
        batch = 0
        gen = self.mmu_valid_gen
        while True:
            obsolete = [sp for sp in self.active if sp.mmu_valid_gen != gen]
            if not obsolete:
                break
            for sp in obsolete:
                if batch >= BATCH_ZAP_PAGES and await self._cond_resched():
                    # The invalid list stayed pending while the lock was out: its pages
                    # are unlinked, and lockless walkers may still hold them.
                    batch = 0
                    break                 # restart: the list changed while the lock was out
                if sp in self.active:
                    await self.prepare_zap(sp, invalid_list)
                    batch += 1
        self._commit_zap(invalid_list)

    async def _cond_resched(self) -> bool:
        """`cond_resched_rwlock_write`: the time slice may end here (the preemption point,
        mmu_lock still held: lockless walkers run, others queue for the lock); if anyone
        waits for the lock, drop it and let them have it. True if it was dropped."""
        await self.sched.point("shadow.cond_resched")
        if not self.mmu_lock.needbreak():
            return False
        await yield_write_lock(self)
        return True

    # -- the limit on shadow pages, and the shrinker --------------------------------------

    def n_used_mmu_pages(self) -> int:
        """Shadow pages in the hash: zapped ones (on an invalid list, or roots a vCPU still
        holds) do not count, as in KVM."""
        return len(self.active)

    async def zap_oldest_mmu_pages(self, nr_to_zap: int) -> int:
        """`kvm_mmu_zap_oldest_mmu_pages` (mmu_lock held for write): zap pages oldest
        first, skipping roots in use, until `nr_to_zap` are gone; returns how many went."""
        self.mmu_lock.assert_held_write()
        invalid_list: list[ShadowPage] = []
        before = len(self.active)
        for sp in list(self.active):
            if before - len(self.active) >= nr_to_zap:
                break
            if sp in self.active and not sp.root_refs:
                await self.prepare_zap(sp, invalid_list)
        self._commit_zap(invalid_list)
        return before - len(self.active)

    async def make_mmu_pages_available(self) -> None:
        """`make_mmu_pages_available` (a fault, mmu_lock held for write): below
        KVM_MIN_FREE_MMU_PAGES available pages, zap the oldest up to KVM_REFILL_PAGES."""
        if self.n_max_mmu_pages is None:
            return
        avail = self.n_max_mmu_pages - self.n_used_mmu_pages()
        if avail < KVM_MIN_FREE_MMU_PAGES:
            await self.zap_oldest_mmu_pages(KVM_REFILL_PAGES - avail)

    async def change_mmu_pages(self, goal: int) -> None:
        """`kvm_mmu_change_mmu_pages` (mmu_lock held for write): the new limit, zapping
        the oldest pages above it."""
        if self.n_used_mmu_pages() > goal:
            await self.zap_oldest_mmu_pages(self.n_used_mmu_pages() - goal)
        self.n_max_mmu_pages = goal

    async def zap_all(self) -> None:
        """`kvm_mmu_zap_all` (VM destruction, mmu_lock held for write): every page."""
        self.mmu_lock.assert_held_write()
        invalid_list: list[ShadowPage] = []
        for sp in list(self.active):
            if sp in self.active:
                await self.prepare_zap(sp, invalid_list)
        self._commit_zap(invalid_list)

    # -- the NX huge page recovery worker ----------------------------------------------

    async def recover_nx_huge_pages(self, memslot_sets: list["Memslots"], ratio: int) -> int:
        """`kvm_recover_nx_huge_pages` (mmu_lock held for write): take the oldest
        ceil(n / ratio) of the n possible NX huge pages off the list
        (`PossibleNxHugePages.recover`). Each is zapped (`kvm_mmu_prepare_zap_page`), so
        that the next fault that is not a fetch maps its range huge. When a task waits for
        mmu_lock, the zapped pages are committed (flushed) before it is yielded
        (`kvm_mmu_remote_flush_or_zap`). Returns the pages zapped."""
        self.mmu_lock.assert_held_write()
        invalid_list: list[ShadowPage] = []
        zapped = 0
        for sp, zap in self.possible_nx_huge_pages.recover(memslot_sets, ratio):
            if zap:
                await self.prepare_zap(sp, invalid_list)
                zapped += 1
            if self.mmu_lock.needbreak():
                self._commit_zap(invalid_list)
                invalid_list = []
                await yield_write_lock(self)
        self._commit_zap(invalid_list)
        return zapped

    # -- zapping gfn ranges through the rmaps ----------------------------------------

    async def unmap_gfn_range(self, as_id: int, start: int, end: int) -> bool:
        """`kvm_unmap_gfn_range` -> `kvm_zap_rmap` (mmu_lock held for write): every leaf
        SPTE mapping [start, end), found through the rmaps of each level; pages stay. The
        walk yields mmu_lock, flushing first. Returns whether a TLB flush is needed; the
        caller flushes."""
        walk = RmapWalk(self, flush_on_yield="skip_zap_tlb_flush" not in self.knobs)
        for slot in list(self.memslot_sets[as_id]):
            lo, hi = max(start, slot.base_gfn), min(end, slot.end_gfn)
            if lo >= hi:
                continue
            async for heads, _, indices in walk.chunks(slot, lo, hi, PG_LEVEL_4K,
                                                       MAX_HUGEPAGE_LEVEL):
                for i in indices:
                    walk.flush = await self.rmaps.zap_all(heads, i, self._clear_leaf) or \
                        walk.flush
        return walk.flush

    # -- dirty logging through the rmaps (mmu_lock held for write) --------------------

    def _write_protect_head(self, val: int, pt_protect: bool) -> bool:
        """`rmap_write_protect`: clear W (and, for `pt_protect`, MMU-writable) on every SPTE
        of the head. Returns whether a flush is needed."""
        flush = False
        clear = WRITABLE | MMU_WRITABLE if pt_protect else WRITABLE
        for sptep in self.rmaps.sptes(val):
            sp = self._sptep_table(sptep)
            index = sptep_index(sptep)
            old = sp.spt[index]
            new = old & ~clear
            if new != old:                       # spte_write_protect
                sp.spt[index] = new
                self._charge("spte_write")
                flush = True
                if self.tracer.on:
                    self.tracer.emit("kvm_mmu_set_spte", level=sp.level, old=old, new=new,
                                     gfn=sp.gfn + index * pages_per_level(sp.level))
        return flush

    async def slot_remove_write_access(self, slot: "Memslot", start_level: int) -> bool:
        """`kvm_mmu_slot_remove_write_access`: W off every leaf of the slot at or above
        `start_level`; MMU-writable stays, so the fast page fault may give W back. The walk
        yields mmu_lock without flushing, as KVM's: a vCPU that writes through a writable
        translation meanwhile does so before logging begins (the caller flushes before it
        returns)."""
        walk = RmapWalk(self, flush_on_yield=False)
        if self.bulk:
            async for heads, _, lo, hi in walk.spans(slot, slot.base_gfn, slot.end_gfn,
                                                     start_level, MAX_HUGEPAGE_LEVEL):
                walk.flush = write_protect_heads(self, heads, lo, hi, None, False) > 0 or \
                    walk.flush
            return walk.flush
        async for heads, level, indices in walk.chunks(slot, slot.base_gfn, slot.end_gfn,
                                                       start_level, MAX_HUGEPAGE_LEVEL):
            for i in indices:
                walk.flush = self._write_protect_head(heads[i], False) or walk.flush
        return walk.flush

    def write_protect_gfn(self, slot: "Memslot", gfn: int, min_level: int) -> bool:
        """`kvm_mmu_slot_gfn_write_protect`: W and MMU-writable off the leaves that map
        gfn at `min_level` and above, so the next write takes the slow path."""
        self.mmu_lock.assert_held_write()
        rmaps = self.slot_rmaps[(slot.as_id, slot.id)]
        flush = False
        for level in range(min_level, MAX_HUGEPAGE_LEVEL + 1):
            val = rmaps.heads[level][rmaps.index(gfn, level)]
            flush = self._write_protect_head(val, True) or flush
        return flush

    def clear_dirty_pt_masked(self, slot: "Memslot", gfn: int, mask: int) -> int:
        """`kvm_mmu_write_protect_pt_masked`: W off the 4K leaves of `gfn + i` for every
        bit i of `mask`. Returns the heads that had a writable SPTE; the caller flushes."""
        self.mmu_lock.assert_held_write()
        rmaps = self.slot_rmaps[(slot.as_id, slot.id)]
        heads, base = rmaps.heads[PG_LEVEL_4K], rmaps.index(gfn, PG_LEVEL_4K)
        done = 0
        while mask:
            bit = (mask & -mask).bit_length() - 1
            mask &= mask - 1
            done += self._write_protect_head(heads[base + bit], False)
        return done

    def clear_dirty_pages(self, slot: "Memslot", gfn: int, dirty: np.ndarray) -> int:
        """`clear_dirty_pt_masked` in bulk (mmu_lock held for write): W off the 4K leaves
        of `gfn + i` for every true `dirty[i]`. Returns the heads that had a writable
        SPTE, as the masked calls summed; the caller flushes."""
        self.mmu_lock.assert_held_write()
        rmaps = self.slot_rmaps[(slot.as_id, slot.id)]
        lo = rmaps.index(gfn, PG_LEVEL_4K)
        # A bitmap's last word may reach past the slot: those pages have no heads.
        n = min(len(dirty), slot.end_gfn - gfn)
        if dirty[n:].any():
            raise VmBugged(f"dirty pages past the end of slot {slot.as_id}:{slot.id}")
        return write_protect_heads(self, rmaps.heads[PG_LEVEL_4K], lo, lo + n, dirty[:n],
                                   False)

    async def recover_huge_pages(self, slot: "Memslot",
                                 host_mapping_level: Callable[[int], int]) -> int:
        """`kvm_rmap_zap_collapsible_sptes` (mmu_lock held for write; logging went off):
        zap each 4K leaf whose gfn could be mapped huge now, so that the next fault maps
        it huge. Flushes if anything was zapped; returns the leaves zapped."""
        walk = RmapWalk(self, flush_on_yield=True)
        zapped = 0
        async for heads, _, indices in walk.chunks(slot, slot.base_gfn, slot.end_gfn,
                                                   PG_LEVEL_4K, PG_LEVEL_4K):
            for i in indices:
                gfn = slot.base_gfn + i
                if max_mapping_level(slot, gfn, host_mapping_level) == PG_LEVEL_4K:
                    continue
                for sptep in list(self.rmaps.sptes(heads[i])):
                    await self.rmaps.remove(heads, i, sptep)      # kvm_zap_one_rmap_spte
                    self._clear_leaf(sptep)
                    zapped += 1
                    walk.flush = True
        if walk.flush:
            self.flush_remote_tlbs()
        return zapped

    # -- introspection --------------------------------------------------------------

    def walk(self, root: ShadowPage, gfn: int) -> list[tuple[int, int, int, int]]:
        """(level, base gfn, index, spte) of every SPTE on the path to gfn, root first."""
        path = []
        sp, level = root, root.level
        while True:
            index = gfn >> LEVEL_SHIFT[level] & 511
            spte = sp.spt[index]
            path.append((level, gfn_round_down(gfn, level), index, spte))
            if level == PG_LEVEL_4K or spte & PRESENT_LARGE != MMU_PRESENT:
                return path
            sp = sp.children[index]
            level -= 1

    def memory_bytes(self) -> tuple[int, int]:
        """(page-table bytes, rmap bytes): 4 KiB per shadow page; 8 per rmap head, per
        parent_ptes head and per sptep in a descriptor (128-byte descriptors)."""
        tables = len(self.tables) * PAGE_SIZE
        rmaps = sum(r.nbytes() for r in self.slot_rmaps.values()) + 8 * len(self.tables) + \
            PTE_LIST_DESC_BYTES * len(self.rmaps.descs)
        return tables, rmaps
