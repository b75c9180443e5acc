"""Reverse maps (rmaps) of the legacy MMU: for each gfn and level of a memslot, the SPTEs
that map it, with a lock bit in the head (seed 000).

An rmap head is one 64-bit word, `kvm_rmap_head.val`, kept in an `array('Q')` per slot and
level (8 bytes per gfn at 4K, as in KVM):

    0                      empty
    sptep                  one SPTE (bit 0 clear)
    desc | RMAP_MANY       a chain of `pte_list_desc`s (bit 0 set)
    ... | RMAP_LOCKED      bit 1: the head is locked

An sptep is the address of the SPTE: its table's pfn << 12 | index << 3, 8-byte aligned
as in KVM, so the head's two low bits are free. A descriptor holds up to PTE_LIST_EXT
spteps and the address of the next one; the head always points at the one that is not
full (`spte_count`), the others behind it are (their SPTEs are counted by `tail_count`).

Locking. Whoever changes an rmap (`pte_list_add`, `pte_list_remove`, zapping every SPTE of
a head) holds mmu_lock for write *and* the head's lock (`kvm_rmap_lock`: a compare-and-
exchange that sets RMAP_LOCKED, spinning while another holds it). Walkers that hold
mmu_lock for write and change no rmap read the head without the lock (`kvm_rmap_get`).
A lockless walker (aging without mmu_lock) takes `lock_readonly`: the same bit, so that
no writer reshapes the list under it, and an empty head is not locked at all (nothing
can be added to it without mmu_lock, which the walker does not hold and does not need).

The rule that keeps lockless walkers safe: a descriptor is freed only by the holder of
its head's lock, and a lockless walker holds that lock while it reads descriptors. So a
descriptor is freed at once (KVM's kmem_cache_free, no RCU); a freed one is poisoned, and
a walker that reads it gets `UseAfterFree` (the sanitizer). The `rmap_walk_without_lock`
debug knob makes the lockless walk skip the lock, which that rule then no longer covers.

Every synchronous step here is atomic (the event loop); only the spin awaits.
"""

from __future__ import annotations

import asyncio
from array import array
from typing import TYPE_CHECKING, Iterator

from .errors import VmBugged
from .mmu_page import UseAfterFree
from .types import MAX_HUGEPAGE_LEVEL, PG_LEVEL_4K, level_shift

if TYPE_CHECKING:
    from .memslots import Memslot
    from .sched import Scheduler

__all__ = ["RMAP_MANY", "RMAP_LOCKED", "PTE_LIST_EXT", "PTE_LIST_DESC_BYTES", "PteListDesc",
           "DescPool", "SlotRmaps", "Rmaps", "sptep_of", "sptep_table_pfn", "sptep_index"]

RMAP_MANY = 1 << 0
RMAP_LOCKED = 1 << 1
PTE_LIST_EXT = 14                 # spteps in one descriptor: the struct is 128 bytes
PTE_LIST_DESC_BYTES = 8 + 4 + 4 + 8 * PTE_LIST_EXT
_DESC_ALIGN = 128


def sptep_of(table_pfn: int, index: int) -> int:
    """The address of SPTE `index` of the table at `table_pfn`."""
    return table_pfn << 12 | index << 3


def sptep_table_pfn(sptep: int) -> int:
    return sptep >> 12


def sptep_index(sptep: int) -> int:
    return sptep >> 3 & 511


class PteListDesc:
    """`struct pte_list_desc`: `more` is the address of the next (full) descriptor, 0 at
    the end of the chain."""

    __slots__ = ("addr", "more", "spte_count", "tail_count", "sptes", "freed")

    def __init__(self, addr: int) -> None:
        self.addr = addr
        self.more = 0
        self.spte_count = 0
        self.tail_count = 0
        self.sptes = [0] * PTE_LIST_EXT
        self.freed = False

    def check(self) -> "PteListDesc":
        if self.freed:
            raise UseAfterFree(f"read of freed pte_list_desc {self.addr:#x}")
        return self


class DescPool:
    """The descriptor cache: addresses handed out and taken back (a freed address is
    reused, as slab reuses objects), descriptors looked up by address."""

    def __init__(self) -> None:
        self.by_addr: dict[int, PteListDesc] = {}
        self._free: list[int] = []
        self._next = _DESC_ALIGN
        self.allocated = 0
        self.freed = 0

    def alloc(self) -> PteListDesc:
        if self._free:
            addr = self._free.pop()
        else:
            addr, self._next = self._next, self._next + _DESC_ALIGN
        desc = self.by_addr[addr] = PteListDesc(addr)
        self.allocated += 1
        return desc

    def free(self, desc: PteListDesc) -> None:
        if desc.freed:
            raise VmBugged(f"pte_list_desc {desc.addr:#x} freed twice")
        desc.freed = True
        desc.sptes = None               # poisoned: a reader fails before it reads a sptep
        del self.by_addr[desc.addr]
        self._free.append(desc.addr)
        self.freed += 1

    def get(self, val: int) -> PteListDesc:
        """The descriptor a head (or `more`) points at."""
        desc = self.by_addr.get(val & ~(RMAP_MANY | RMAP_LOCKED))
        if desc is None:
            raise UseAfterFree(f"rmap points at {val:#x}, which is no pte_list_desc")
        return desc

    def __len__(self) -> int:
        return len(self.by_addr)


class SlotRmaps:
    """`slot->arch.rmap`: one array of heads per level, 4K up to 1G."""

    __slots__ = ("base_gfn", "heads")

    def __init__(self, slot: "Memslot") -> None:
        self.base_gfn = slot.base_gfn
        self.heads: list[array | None] = [None]
        for level in range(PG_LEVEL_4K, MAX_HUGEPAGE_LEVEL + 1):
            shift = level_shift(level)
            n = ((slot.end_gfn - 1) >> shift) - (slot.base_gfn >> shift) + 1
            self.heads.append(array("Q", bytes(8 * n)))

    def index(self, gfn: int, level: int) -> int:
        """`gfn_to_index`: the head of gfn at `level` in this slot's array."""
        shift = level_shift(level)
        return (gfn >> shift) - (self.base_gfn >> shift)

    def span(self, first: int, last: int, level: int) -> tuple[int, int]:
        """The indices [lo, hi) of the heads of gfns [first, last) at `level`."""
        return self.index(first, level), self.index(last - 1, level) + 1

    def nbytes(self) -> int:
        return sum(len(h) * h.itemsize for h in self.heads[1:])

    def empty(self) -> bool:
        return not any(any(h) for h in self.heads[1:])


class Rmaps:
    """The operations on rmap heads: a head is (its array, its index)."""

    def __init__(self, sched: "Scheduler", knobs: frozenset[str]) -> None:
        self.descs = DescPool()
        self.sched = sched
        self.knobs = knobs
        self.spins = 0               # times a locker found the head locked and waited

    # -- the lock (kvm_rmap_lock / _unlock / _lock_readonly / _unlock_readonly) -----------

    async def lock(self, heads: array, i: int) -> int:
        """`__kvm_rmap_lock`: set RMAP_LOCKED by compare-and-exchange, spinning while
        another holds it; returns the value without the bit. An empty head is not locked
        (0 comes back): only mmu_lock holders for write touch empty heads, and they
        exclude each other."""
        while True:
            old = heads[i]
            if not old:
                return 0
            if not old & RMAP_LOCKED:
                heads[i] = old | RMAP_LOCKED           # the cmpxchg: old was just read
                self._charge("rmap_lock")
                return old
            self.spins += 1
            await self.sched.point("rmap.lock_spin")
            await asyncio.sleep(0)        # the holder must run for the bit to clear

    def try_lock(self, heads: array, i: int) -> int | None:
        """The lock without the spin, for synchronous callers: None if it is held."""
        old = heads[i]
        if old & RMAP_LOCKED:
            return None
        if old:
            heads[i] = old | RMAP_LOCKED
        return old

    @staticmethod
    def unlock(heads: array, i: int, new: int) -> None:
        """`kvm_rmap_unlock`: publish the new value, which clears the lock bit."""
        if new & RMAP_LOCKED:
            raise VmBugged(f"rmap unlocked with the lock bit in {new:#x}")
        heads[i] = new

    async def lock_readonly(self, heads: array, i: int) -> int:
        """`kvm_rmap_lock_readonly`: the lock, for a walker that changes no rmap. With
        the `rmap_walk_without_lock` knob, only a read of the head."""
        if "rmap_walk_without_lock" in self.knobs:
            return heads[i] & ~RMAP_LOCKED
        return await self.lock(heads, i)

    def unlock_readonly(self, heads: array, i: int, old: int) -> None:
        """`kvm_rmap_unlock_readonly`: nothing to do for an empty head (it was not locked)."""
        if not old or "rmap_walk_without_lock" in self.knobs:
            return
        if heads[i] != old | RMAP_LOCKED:
            raise VmBugged(f"rmap head changed under its read-only lock: {heads[i]:#x}, "
                           f"locked at {old:#x}")
        heads[i] = old

    def _charge(self, cost: str, n: int = 1) -> None:
        """Virtual time: the running actor pays `n` of the named cost."""
        clock = self.sched.clock
        if clock is not None:
            clock.charge(getattr(clock.costs, cost) * n)

    # -- changes (mmu_lock held for write, head locked) -----------------------------------

    async def add(self, heads: array, i: int, sptep: int) -> int:
        """`pte_list_add`: returns the number of SPTEs the head held before."""
        old = await self.lock(heads, i)
        self._charge("rmap_add")
        if not old:
            new, count = sptep, 0
        elif not old & RMAP_MANY:
            desc = self.descs.alloc()
            desc.sptes[0], desc.sptes[1] = old, sptep
            desc.spte_count = 2
            new, count = desc.addr | RMAP_MANY, 1
        else:
            desc = self.descs.get(old)
            count = desc.tail_count + desc.spte_count
            if desc.spte_count == PTE_LIST_EXT:
                head = self.descs.alloc()
                head.more = desc.addr
                head.tail_count = count
                desc = head
            desc.sptes[desc.spte_count] = sptep
            desc.spte_count += 1
            new = desc.addr | RMAP_MANY
        self.unlock(heads, i, new)
        return count

    async def remove(self, heads: array, i: int, sptep: int) -> None:
        """`pte_list_remove`: the entry moves the head descriptor's last sptep into its
        place, and a head descriptor left empty is freed (with the head's lock held)."""
        old = await self.lock(heads, i)
        self._charge("rmap_remove")
        if not old:
            raise VmBugged(f"no rmap entry for sptep {sptep:#x}: the head is empty")
        if not old & RMAP_MANY:
            if old != sptep:
                raise VmBugged(f"rmap head {old:#x} is not sptep {sptep:#x}")
            self.unlock(heads, i, 0)
            return
        first = self.descs.get(old)
        desc = first
        while True:
            desc.check()
            for j in range(desc.spte_count):
                if desc.sptes[j] == sptep:
                    self.unlock(heads, i, self._remove_entry(old, desc, j))
                    return
            if not desc.more:
                break
            desc = self.descs.get(desc.more)
        self.unlock(heads, i, old)
        raise VmBugged(f"no rmap entry for sptep {sptep:#x}")

    def _remove_entry(self, val: int, desc: PteListDesc, j: int) -> int:
        """`pte_list_desc_remove_entry`: the new value of the head."""
        head = self.descs.get(val)
        last = head.spte_count - 1
        desc.sptes[j] = head.sptes[last]
        head.sptes[last] = 0
        head.spte_count = last
        if last:
            return val
        new = head.more | RMAP_MANY if head.more else 0
        self.descs.free(head)
        return new

    async def zap_all(self, heads: array, i: int, clear) -> bool:
        """`kvm_zap_all_rmap_sptes`: under the head's lock, `clear(sptep)` every SPTE it
        holds and free its descriptors; the head is empty after. False if it was."""
        old = await self.lock(heads, i)
        if not old:
            return False
        for sptep in self.sptes(old):
            clear(sptep)
        if old & RMAP_MANY:
            addr = old
            while addr:
                desc = self.descs.get(addr)
                addr = desc.more
                self.descs.free(desc)
        self.unlock(heads, i, 0)
        return True

    # -- walks ------------------------------------------------------------------------------

    def sptes(self, val: int) -> Iterator[int]:
        """`for_each_rmap_spte` over a head value read once (mmu_lock held for write, or
        the head's lock held): each sptep; the descriptor is checked at every read, so a
        walker whose descriptor is freed while it waits gets `UseAfterFree`."""
        val &= ~RMAP_LOCKED
        if not val:
            return
        if not val & RMAP_MANY:
            yield val
            return
        desc = self.descs.get(val)
        while True:
            j = 0
            while j < desc.check().spte_count:
                yield desc.check().sptes[j]
                j += 1
            more = desc.check().more
            if not more:
                return
            desc = self.descs.get(more)

    def count(self, val: int) -> int:
        val &= ~RMAP_LOCKED
        if not val:
            return 0
        if not val & RMAP_MANY:
            return 1
        desc = self.descs.get(val)
        return desc.tail_count + desc.spte_count
