"""A vCPU: its TLB, its requests, the hardware walker, and the run loop with its exits.

The run loop is the guest: accesses execute in order through the TLB (synchronous,
allocation-free on a hit); a miss walks the EPT as the CPU does, setting Accessed (and
Dirty on a write) when A/D bits are on; an access the EPT cannot satisfy is an EPT
violation, converted to a #PF error code as VMX does and handed to the fault path, after
which the access is executed again. Requests (TLB flush, reload of an obsolete root) are
serviced at every guest entry, i.e. after every `await`, which is the only place another
task can have queued one.

TLB entries are 4K-grained, one per permitted access kind: `gfn << 4 | kind` -> pfn. W is
granted only once the leaf's Dirty bit is set, so that the first write through a clean
entry walks and sets D, as hardware does. The TLB has a fixed capacity, like the hardware
one: a fill that finds it full first drops the oldest sixteenth of its entries (first in,
first out: the dict's insertion order), so its size does not grow with the guest memory
the vCPU touches and a working set a little larger than it still mostly hits.
"""

from __future__ import annotations

import asyncio
import enum
import errno
from array import array
from bisect import bisect_right
from collections import deque
from itertools import islice
from operator import indexOf
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np

from .spte import (ACCESSED, BASE_ADDR_MASK, DIRTY, EXECUTABLE, LARGE, MMIO_MASK,
                   MMIO_VALUE, READABLE, RWX, WRITABLE)
from .batch import OP_HLT, OP_KIND_MASK, OP_WITH_DATA, AccessBatch, op_size
from .clock import VIRTUAL_TIME_LIMIT, Actor
from .errors import KvmError, MemoryFault, VmBugged
from .mmu import page_fault
from .mmu_internal import RET_PF_EMULATE, RET_PF_FIXED, RET_PF_RETRY
from .mmu_page import MmuPage
from .resched import Timeslice
from .stats import VcpuStats
from .types import PAGE_SHIFT, PAGE_SIZE, AccessKind
from .vmx import MISCONFIG_ERROR_CODE, ept_violation_qualification, \
    error_code_from_qualification

if TYPE_CHECKING:
    from .vm import Vm

__all__ = ["Vcpu", "VcpuInfo", "RunResult", "Exit", "ExitReason",
           "KVM_REQ_TLB_FLUSH", "KVM_REQ_MMU_FREE_OBSOLETE_ROOTS", "KVM_REQ_VM_DEAD",
           "KVM_REQ_DIRTY_RING_SOFT_FULL", "TLB_CAPACITY", "KVM_INTERNAL_ERROR_EMULATION"]

TLB_CAPACITY = 1 << 14                 # entries: 5461 pages with R, W and X
TLB_EVICT = TLB_CAPACITY // 16         # entries a fill into a full TLB drops
KVM_REQ_TLB_FLUSH = 1 << 0
KVM_REQ_MMU_FREE_OBSOLETE_ROOTS = 1 << 1
KVM_REQ_VM_DEAD = 1 << 2           # never cleared: the VM is dead or destroyed
KVM_REQ_DIRTY_RING_SOFT_FULL = 1 << 3   # cleared at an entry that finds the ring reset
KVM_INTERNAL_ERROR_EMULATION = 1        # kvm_run->internal.suberror: emulation failed
_HLT = -1                    # `_exit_error_code` of an HLT: not a fault (error codes are >= 0)

_SIZE = tuple(op_size(op) for op in range(256))
_PAGE_OFFSET = PAGE_SIZE - 1
# By op: the bytes an access moves into guest memory (0 unless it writes data), so that
# the guest's common write tests one table entry.
_WRITE_SIZE = tuple(op_size(op) if op & OP_WITH_DATA and op & OP_KIND_MASK == AccessKind.WRITE
                    else 0 for op in range(256))
_READ, _WRITE, _EXEC = int(AccessKind.READ), int(AccessKind.WRITE), int(AccessKind.EXEC)
_AD = ACCESSED | DIRTY
_RX = READABLE | EXECUTABLE
_LEAF_BITS = RWX | _AD                 # what the walker's use of a leaf depends on
_TLB_FULL = TLB_CAPACITY - 3           # more entries than this leave no room for a page


def _access_error_code(kind: int, rwx: int) -> int:
    """The exit an access of `kind` through a leaf with R/W/X `rwx` takes, as an error code:
    0 for none, the misconfiguration's when W is set without R (as in every MMIO SPTE: the
    CPU sees the misconfiguration, not the MMIO), else the #PF error code VMX makes of the
    EPT violation's exit qualification (never 0)."""
    if rwx & (READABLE | WRITABLE) == WRITABLE:
        return MISCONFIG_ERROR_CODE
    if rwx & 1 << (kind - 1):
        return 0
    return error_code_from_qualification(ept_violation_qualification(kind, rwx))


def _leaf_use(kind: int, low: int, ad_enabled: bool) -> int:
    """What the walker does with a leaf whose low bits are `low` for an access of `kind`:
    ~error code (negative) for an exit; else the A/D bits it sets in the leaf (A, and D
    for a write, when A/D bits are on) or'ed with the kinds the TLB entry grants, R/W/X as
    in the SPTE (W only through a Dirty leaf when A/D bits are on, so that the first write
    through a clean entry walks and sets D, as hardware does)."""
    error_code = _access_error_code(kind, low & RWX)
    if error_code:
        return ~error_code
    perms = low & RWX
    if low & _LEAF_BITS == _LEAF_BITS or not ad_enabled:
        return perms
    ad = _AD if kind == _WRITE else ACCESSED
    if not (low | ad) & DIRTY:
        perms &= ~WRITABLE
    return (ad if low & ad != ad else 0) | perms


# By A/D on, then op, then the leaf's `low & _LEAF_BITS`: `_leaf_use`, one table lookup on
# every TLB fill. (An op without a kind is no access: batches reject it; HLT walks nothing.)
# The ops of one kind share their kind's row: made per op, the rows cost every import of
# the module half a second.
_LEAF_USE = {ad_enabled: tuple(rows[op & OP_KIND_MASK] for op in range(256))
             for ad_enabled in (False, True)
             for rows in [(None,) + tuple(
                 tuple(_leaf_use(kind, low, ad_enabled) for low in range(_LEAF_BITS + 1))
                 for kind in (_READ, _WRITE, _EXEC))]}


class ExitReason(enum.Enum):
    DONE = "done"
    MMIO = "mmio"
    MEMORY_FAULT = "memory_fault"
    INTERNAL_ERROR = "internal_error"
    DIRTY_RING_FULL = "dirty_ring_full"   # harvest and reset the ring, then run again
    HLT = "hlt"                           # the guest halted: KVM_EXIT_HLT


@dataclass(frozen=True)
class Exit:
    reason: ExitReason
    gpa: int = 0
    length: int = 0
    is_write: bool = False
    data: bytes = b""
    errno: int = 0
    message: str = ""
    suberror: int = 0          # of an INTERNAL_ERROR: KVM_INTERNAL_ERROR_*, 0 for a dead VM
    flags: int = 0             # of a MEMORY_FAULT: KVM_MEMORY_EXIT_FLAG_* (8: PRIVATE)


@dataclass(frozen=True)
class RunResult:
    completed: int
    exit: Exit
    read_data: bytes
    start_ns: int = 0          # virtual time: when the run entered the guest, and left
    end_ns: int = 0            # (0 for a VM in wall time)


@dataclass(frozen=True)
class VcpuInfo:
    id: int
    running: bool
    mmio_pending: bool


_DONE = Exit(ExitReason.DONE)
# The host's timer interrupt: every GUEST_TICK accesses that move data the guest exits
# (`_exit_error_code` TIMER_TICK, not a #PF error code), so that a long batch reaches the
# run loop's need_resched check even when it never faults.
GUEST_TICK = 256
TIMER_TICK = -2                # not a fault either, and not an HLT
_HALTED = Exit(ExitReason.HLT)


class Vcpu:
    def __init__(self, vm: "Vm", vcpu_id: int) -> None:
        self.vm, self.id = vm, vcpu_id
        self.tlb: dict[int, int] = {}
        # The paging-structure cache: the 4K-level table that maps each 2M of gfns, so a
        # walk starts there. A TLB flush (INVEPT) empties it with the TLB.
        self.pde_cache: dict[int, MmuPage] = {}
        self.requests = 0
        self.root = None
        self.dirty_ring = None            # set by the VM when it logs dirty pages in rings
        self.stat = VcpuStats()
        self._running = False
        self._batch: AccessBatch | None = None
        self._pos = 0
        self._wpos = 0
        self._read_data = bytearray()
        self._mmio: Exit | None = None
        self._exit_error_code = 0
        # What the walker reads on every miss, fixed for the VM's life.
        self.memslots = vm.memslot_sets[0]     # kvm_vcpu_memslots: no SMM, address space 0
        self._max_gfn = vm.max_gfn
        self._ad_enabled = vm.ad_enabled
        self._tdp_levels = vm.config.tdp_levels
        self._leaf_use = _LEAF_USE[vm.ad_enabled]
        self._host = vm.host
        self._check_access = vm.sanitizers.check_access if vm.sanitizers is not None else None
        # Virtual time: the simulated CPU this vCPU runs on, and the hardware walks done
        # since its time was last charged (from the paging-structure cache, or the root).
        self.clock = vm.clock
        self.actor = Actor(f"vcpu{vcpu_id}") if vm.clock is not None else None
        self.walks_cached = 0
        self.walks_full = 0
        if self.clock is not None:
            self._tlb_fill = self._tlb_fill_counted
        self._start_ns = 0

    def info(self) -> VcpuInfo:
        return VcpuInfo(self.id, self._running, self._mmio is not None)

    def stats(self) -> dict[str, int]:
        stats = self.stat.as_dict()
        actor = self.actor
        if actor is not None:                  # virtual time: where the vCPU's time went
            stats.update(virtual_ns=actor.time, virtual_busy_ns=actor.busy_ns,
                         virtual_wait_ns=actor.wait_ns)
        return stats

    def in_guest(self) -> bool:
        """Inside KVM_RUN: an IPI makes it exit."""
        return self._running

    def make_request(self, request: int) -> None:
        self.requests |= request

    # -- KVM_RUN ----------------------------------------------------------------------

    async def run(self, batch: AccessBatch | None = None, mmio_data: bytes | None = None,
                  start_ns: int | None = None) -> RunResult:
        """KVM_RUN: run `batch` from its start; or complete a pending MMIO and resume; or,
        given neither, resume the batch where the last step left it, as KVM_RUN does
        after any exit: the access that ended it with a MEMORY_FAULT or an
        INTERNAL_ERROR is tried again, and after an HLT or DIRTY_RING_FULL the batch
        goes on. In virtual time the run starts at `start_ns` if given (not before the
        VM's now), else where the vCPU's time stands (or at now, if that is later)."""
        self.vm.check_alive()
        if start_ns is not None and self.clock is None:
            raise KvmError(errno.EOPNOTSUPP, f"a start time needs a VM in virtual time; "
                           f"VM {self.vm.id} runs in wall time")
        if start_ns is not None and not 0 <= start_ns < VIRTUAL_TIME_LIMIT:
            raise KvmError(errno.EINVAL, f"start_ns {start_ns} is not in [0, 2^63) ns")
        if self._running:
            raise KvmError(errno.EBUSY, f"vCPU {self.id} is already running")
        if batch is not None and mmio_data is not None:
            raise KvmError(errno.EINVAL, "a batch and an MMIO completion in one run")
        if mmio_data is not None:
            self._check_mmio_completion(mmio_data)
        elif self._mmio is not None:
            raise KvmError(errno.EBUSY, f"vCPU {self.id} has an MMIO exit at gpa "
                           f"{self._mmio.gpa:#x} to complete first")
        elif batch is None and (self._batch is None or self._pos >= len(self._batch)):
            raise KvmError(errno.EINVAL, f"vCPU {self.id} has no batch left to resume: "
                           "run needs a batch")
        elif batch is not None:
            self._check_batch_limits(batch)
        if self.vm.nx_recovery is not None:
            self.vm.nx_recovery.start()          # KVM starts the worker at the first KVM_RUN
        if self.clock is not None:
            async with self.clock.running(self.actor, start_ns=start_ns):
                return await self._run(batch, mmio_data)
        return await self._run(batch, mmio_data)

    async def _run(self, batch: AccessBatch | None, mmio_data: bytes | None) -> RunResult:
        self._running = True
        if self.actor is not None:
            self._start_ns = self.actor.time
        try:
            if batch is not None:
                self._batch, self._pos, self._wpos = batch, 0, 0
                self._read_data = bytearray()
            elif mmio_data is not None:
                self._complete_mmio(mmio_data)
            return await self._run_loop()
        except VmBugged as bug:
            self.vm.mark_dead(bug)
            return self._result(Exit(ExitReason.INTERNAL_ERROR, errno=errno.EIO,
                                     message=str(bug)))
        finally:
            self._running = False
            if self.vm.destroyed:
                self.release_root()       # `destroy` left it to the vCPU that was running

    def _check_batch_limits(self, batch: AccessBatch) -> None:
        """Refuse a batch longer than the `batch_accesses` limit, or one that could make
        the server allocate more than `batch_bytes`: the contents of a 4K page and a page
        table per level below the root for every access, counted once per distinct page
        and table; the exact count only when the cheap bound (every access distinct)
        does not settle it. (A huge host frame costs the server no
        more than the 4K pages written in it; it is charged as populated memory.)"""
        limits, n = self.vm.limits, len(batch)
        limits.check("batch_accesses", n, f"a batch of {n} accesses", errno.E2BIG)
        table_levels = range(1, self.vm.mmu.root_level)
        worst = PAGE_SIZE * (1 + len(table_levels))
        if n * worst <= limits.batch_bytes:
            return
        # In bulk: a set per level over a batch of 262,144 accesses held the event loop
        # for 190 ms. Sorted (a radix sort: `np.unique` hashes, 10 times slower), the
        # gfns give each level's distinct frames where a frame number changes.
        gfns = np.sort(np.frombuffer(batch.gpas, dtype=np.uint64) >> PAGE_SHIFT,
                       kind="stable")
        need = PAGE_SIZE * sum(1 + int(np.count_nonzero(np.diff(gfns >> (9 * level))))
                               for level in range(len(table_levels) + 1))
        limits.check("batch_bytes", need, f"a batch that may allocate {need} bytes",
                     errno.E2BIG)

    @property
    def running(self) -> bool:
        """Inside KVM_RUN: a fault of this vCPU may be using its root."""
        return self._running

    def cancel_mmio(self, pending: Exit) -> None:
        """Drop the MMIO exit `pending` if it is still the one to complete: its access is
        cancelled, the batch ends there and the vCPU takes a new batch."""
        if self._mmio is pending and not self._running:
            self._mmio = self._batch = None

    def _check_mmio_completion(self, data: bytes) -> None:
        pending = self._mmio
        if pending is None:
            raise KvmError(errno.EINVAL, f"vCPU {self.id} has no MMIO exit to complete")
        want = 0 if pending.is_write else pending.length
        if len(data) != want:
            raise KvmError(errno.EINVAL, f"the MMIO {'write' if pending.is_write else 'read'}"
                           f" at {pending.gpa:#x} completes with {want} bytes, not "
                           f"{len(data)}")

    def _complete_mmio(self, data: bytes) -> None:
        op = self._batch.ops[self._pos]
        if op & OP_WITH_DATA and not self._mmio.is_write:
            self._read_data += data
        elif op & OP_WITH_DATA:
            self._wpos += self._mmio.length
        self._mmio = None
        self._pos += 1
        self.stat.accesses += 1

    def _result(self, exit: Exit) -> RunResult:
        if self.vm.tracer.on:
            self.vm.tracer.emit("kvm_userspace_exit", vcpu=self.id, reason=exit.reason.value,
                                errno=exit.errno)
        actor = self.actor
        if actor is not None:
            return RunResult(self._pos, exit, bytes(self._read_data), self._start_ns,
                             actor.time)
        return RunResult(self._pos, exit, bytes(self._read_data))

    async def _run_loop(self) -> RunResult:
        """Enter the guest, run it until an access exits, handle the exit, and go round.

        The guest is a generator (`_guest`) resumed at every entry: it keeps its place in
        the batch across exits, as a vCPU's state survives a VM exit."""
        batch, stats, vm, clock = self._batch, self.stat, self.vm, self.clock
        gpas, n, first = batch.gpas, len(batch), self._pos
        guest = self._guest()
        timeslice = Timeslice(vm.sched)     # `vcpu_run`'s need_resched between entries
        charged = first
        try:
            while True:
                if (self.requests or self.root is None) and not await self._enter_guest():
                    return self._dirty_ring_full_exit()
                i = self._pos = next(guest, n)
                if clock is not None:             # (the guest yields indices below n)
                    charged = self._charge_guest(clock, charged, i, i < n and
                                                 self._exit_error_code != TIMER_TICK)
                if i >= n:
                    return self._result(_DONE)
                error_code = self._exit_error_code
                if error_code == _HLT:
                    self._pos = i + 1              # HLT retired: a resume goes on after it
                    stats.exits += 1
                    stats.halt_exits += 1
                    return self._result(_HALTED)
                if error_code == TIMER_TICK:
                    await timeslice.cond_resched()
                    continue
                stats.exits += 1
                if error_code == MISCONFIG_ERROR_CODE:
                    stats.ept_misconfigs += 1
                else:
                    stats.ept_violations += 1
                gpa = gpas[i]
                try:
                    r = await page_fault(self, gpa, error_code)
                except KvmError as e:
                    if self.requests & KVM_REQ_VM_DEAD:
                        vm.check_alive()           # the VM went away under the fault
                    op = batch.ops[i]
                    if isinstance(e, MemoryFault):      # the fault says where and how
                        return self._result(Exit(ExitReason.MEMORY_FAULT, gpa=e.gpa,
                                                 length=e.size, is_write=_is_write(op),
                                                 errno=e.errno, message=e.reason,
                                                 flags=e.flags))
                    return self._result(Exit(ExitReason.MEMORY_FAULT, gpa=gpa,
                                             length=op_size(op), is_write=_is_write(op),
                                             errno=e.errno, message=e.reason))
                if r is RET_PF_FIXED:          # the usual outcome: the access runs again
                    if timeslice.need_resched():
                        await timeslice.cond_resched()
                    continue
                if r is RET_PF_EMULATE:
                    if batch.ops[i] & OP_KIND_MASK == _EXEC:
                        return self._emulation_failure(i)
                    return self._mmio_exit(i)
                if r is RET_PF_RETRY:
                    await vm.sched.point("vcpu.retry")
                    if vm.notifier.blocks(gpa >> 12):
                        await vm.notifier.wait_for_end()   # re-faulting would only spin
                    else:
                        await asyncio.sleep(0)      # let the zap or the other fault move on
        finally:
            stats.accesses += self._pos - first     # the accesses completed since `first`

    def _charge_guest(self, clock, charged: int, i: int, exits: bool) -> int:
        """Virtual time for the guest's work since the last charge: its TLB hits and
        hardware walks up to access i, and the exit that access takes if it `exits` (the
        host's timer tick costs the model nothing: it is not a VM exit of the guest's
        making). Returns i, the accesses charged for."""
        costs = clock.costs
        cached, full = self.walks_cached, self.walks_full
        hits = i - charged - cached - full
        ns = hits * costs.tlb_hit if hits > 0 else 0
        ns += (cached + full * self._tdp_levels) * costs.ept_walk_level
        if exits:
            ns += costs.vmexit_entry
        self.walks_cached = self.walks_full = 0
        clock.charge(ns)
        return i

    def _dirty_ring_full_exit(self) -> RunResult:
        """KVM_EXIT_DIRTY_RING_FULL: the vCPU may not run until the ring is reset."""
        self.stat.exits += 1
        if self.vm.tracer.on:
            self.vm.tracer.emit("kvm_dirty_ring_exit", vcpu=self.id)
        return self._result(Exit(ExitReason.DIRTY_RING_FULL))

    def _emulation_failure(self, i: int) -> RunResult:
        """An instruction fetch from a gpa no memslot backs: the emulator cannot fetch
        the instruction (`handle_emulation_failure`), KVM_EXIT_INTERNAL_ERROR with
        suberror KVM_INTERNAL_ERROR_EMULATION."""
        batch = self._batch
        gpa, size = batch.gpas[i], op_size(batch.ops[i])
        return self._result(Exit(ExitReason.INTERNAL_ERROR, gpa=gpa, length=size,
                                 suberror=KVM_INTERNAL_ERROR_EMULATION,
                                 message=f"emulation failure: instruction fetch from gpa "
                                 f"{gpa:#x}, which no memslot backs"))

    def _mmio_exit(self, i: int) -> RunResult:
        batch = self._batch
        op = batch.ops[i]
        size = op_size(op)
        data = b""
        if _is_write(op):
            data = batch.write_data[self._wpos:self._wpos + size] if op & OP_WITH_DATA \
                else bytes(size)
        self._mmio = Exit(ExitReason.MMIO, gpa=batch.gpas[i], length=size,
                          is_write=_is_write(op), data=data)
        self.stat.mmio_exits += 1
        if self.vm.tracer.on:
            self.vm.tracer.emit("kvm_mmio", vcpu=self.id, gpa=self._mmio.gpa, len=size,
                                is_write=self._mmio.is_write)
        return self._result(self._mmio)

    async def _enter_guest(self) -> bool:
        """`vcpu_enter_guest`'s request servicing and `kvm_mmu_reload`: False when the vCPU
        may not enter (its dirty ring is soft-full)."""
        if self.requests & KVM_REQ_VM_DEAD:
            self.vm.check_alive()                # raises: the VM died while this vCPU ran
        if self.requests & KVM_REQ_MMU_FREE_OBSOLETE_ROOTS or self.root is None or \
                self.root.invalid:
            await self._load_root()
        if self.requests & KVM_REQ_TLB_FLUSH:
            self.requests &= ~KVM_REQ_TLB_FLUSH
            self.flush_tlb()
            self.stat.tlb_flush += 1
            if self.clock is not None:
                self.clock.charge(self.clock.costs.tlb_flush_local)
        if self.requests & KVM_REQ_DIRTY_RING_SOFT_FULL:
            # `kvm_dirty_ring_check_request`: the request stays until a reset makes room.
            if self.dirty_ring.soft_full():
                return False
            self.requests &= ~KVM_REQ_DIRTY_RING_SOFT_FULL
        return True

    async def _load_root(self) -> None:
        vm = self.vm
        # The legacy MMU makes and frees its roots with mmu_lock held for write.
        async with (vm.mmu_lock.read if vm.shadow is None else vm.mmu_lock.write):
            self.requests &= ~KVM_REQ_MMU_FREE_OBSOLETE_ROOTS
            if self.root is not None and self.root.invalid:
                vm.mmu.put_root(self.root)
                self.root = None
            if self.root is None:
                self.root = vm.mmu.get_root(0)
                self.requests |= KVM_REQ_TLB_FLUSH      # a fresh root flushes locally

    def flush_tlb(self) -> None:
        """INVEPT: drop every TLB entry and the paging-structure cache."""
        self.tlb.clear()
        self.pde_cache.clear()

    def release_root(self) -> None:
        if self.root is not None:
            self.vm.mmu.put_root(self.root)
            self.root = None

    # -- guest mode (synchronous: nothing else runs) -----------------------------------

    def _guest(self) -> Iterator[int]:
        """Run accesses from `_pos` until one needs the host: yield its index, and execute
        it again when resumed. The #PF error code of the exit is in `_exit_error_code`.

        Without data to move, hits are found in C: a batch whose keys are all in the TLB
        is done at once, else one lazy `map(tlb.__contains__, keys)` runs over the batch
        and `indexOf(..., False)` stops it at the next key the TLB lacks (each key is
        looked up after the fills before it); only misses come back to Python.
        """
        batch = self._batch
        gpas, ops, i = batch.gpas, batch.ops, self._pos
        n, tlb, fill = len(gpas), self.tlb, self._tlb_fill
        check = self._check_access
        if check is None and not batch.has_data:
            keys = memoryview(batch.tlb_keys)[i:]
            if i == 0 and keys[0] in tlb and tlb.keys() >= set(keys):
                return                         # every access hits
            hits = map(tlb.__contains__, keys)
            while True:
                try:
                    i += indexOf(hits, False)  # past the miss: `hits` is at i + 1
                except ValueError:
                    return
                while fill(gpas[i], ops[i]) is None:
                    yield i
                i += 1
        if check is None:
            runs = batch.runs()
            if runs is not None:
                yield from self._guest_runs(runs, i)
                return
        tlb_get, write_data, host, wpos = tlb.get, batch.write_data, self._host, self._wpos
        memory = host.contents                 # pfn -> page, for the pages ever written
        # Views: resuming after an MMIO exit does not copy the rest of the batch.
        rest = (memoryview(seq)[i:] for seq in (gpas, ops, batch.tlb_keys))
        tick = i + GUEST_TICK
        for i, gpa, op, key in zip(range(i, n), *rest):
            if i == tick:
                self._wpos, self._exit_error_code = wpos, TIMER_TICK
                yield i
                tick = i + GUEST_TICK
            pfn = tlb_get(key)
            if pfn is None:                    # a miss: walk; exit until the host fixed it
                pfn = fill(gpa, op)
                while pfn is None:
                    self._wpos = wpos
                    yield i
                    pfn = fill(gpa, op)
            if check is not None:
                check(gpa >> 12, pfn, op & OP_KIND_MASK == _WRITE)
            # The access moves its bytes (within one page: batches are checked).
            size = _WRITE_SIZE[op]
            if size == 1:                      # a byte store, straight to host memory
                page = memory.get(pfn)
                if page is not None:
                    page[gpa & _PAGE_OFFSET] = write_data[wpos]
                else:                          # a page never written: the host makes it
                    host.write_byte(pfn, gpa & _PAGE_OFFSET, write_data[wpos])
                wpos += 1
            elif size:
                host.write_pfn(pfn, gpa & _PAGE_OFFSET, write_data[wpos:wpos + size])
                wpos += size
            elif op & OP_WITH_DATA:            # a read: a write with data has a size
                self._read_data += host.read_pfn(pfn, gpa & _PAGE_OFFSET, _SIZE[op])
        self._wpos = wpos

    def _guest_runs(self, runs: list[int], i: int) -> Iterator[int]:
        """`_guest` over a batch of contiguous runs (`AccessBatch.runs`), sanitizers off:
        the accesses of a run share a TLB entry and a page, so a run takes one TLB lookup
        and moves its bytes in one copy. The first access of a run that misses walks, and
        exits, as alone; resumed after an exit, the run goes on from the next access."""
        batch = self._batch
        gpas, ops, keys, write_data = batch.gpas, batch.ops, batch.tlb_keys, batch.write_data
        tlb_get, fill, host, wpos = self.tlb.get, self._tlb_fill, self._host, self._wpos
        memory, read_data = host.contents, self._read_data
        k = bisect_right(runs, i)              # runs[k] is where the run holding i ends
        for end in runs[k:]:
            gpa, op = gpas[i], ops[i]
            pfn = tlb_get(keys[i])
            if pfn is None:                    # as in `_guest`
                pfn = fill(gpa, op)
                while pfn is None:
                    self._wpos = wpos
                    yield i
                    pfn = fill(gpa, op)
            if op & OP_WITH_DATA:
                offset = gpa & _PAGE_OFFSET
                length = gpas[end - 1] + _SIZE[op] - gpa
                if _WRITE_SIZE[op]:
                    host.write_pfn(pfn, offset, write_data[wpos:wpos + length])
                    wpos += length
                else:
                    page = memory.get(pfn)
                    read_data += bytes(length) if page is None else \
                        memoryview(page)[offset:offset + length]
            i = end
        self._wpos = wpos

    def _tlb_fill(self, gpa: int, op: int) -> int | None:
        """The hardware page walker: the pfn (and a TLB fill), or None with the exit's
        error code in `_exit_error_code`.

        A walk starts at the 4K-level table the paging-structure cache holds for the gfn,
        else at the root."""
        if op == OP_HLT:
            self._exit_error_code = _HLT
            return None
        gfn = gpa >> 12
        page = self.pde_cache.get(gfn >> 9)
        if page is None:
            stop = self._walk_upper(gfn)
            if stop is None:
                self._exit_error_code = ~self._leaf_use[op][0]
                return None
            spt, index, shift = stop
        elif page.freed:
            raise VmBugged(f"paging-structure cache holds freed {page!r}")
        else:
            spt, index, shift = page.spt, gfn & 511, 0
        spte = spt[index]
        use = self._leaf_use[op][spte & _LEAF_BITS]
        if use < 0:
            self._exit_error_code = ~use
            return None
        pfn = (spte & BASE_ADDR_MASK) >> 12
        if shift:
            pfn += gfn & ((1 << shift) - 1)      # the 4K page within a huge leaf
        key, tlb = gfn << 4, self.tlb
        if len(tlb) > _TLB_FULL:               # no room for a page: drop the oldest, in C
            deque(map(tlb.__delitem__, list(islice(tlb, TLB_EVICT))), 0)
        # The common fills, no A/D update: every kind (a Dirty leaf), or reads and fetches
        # (a clean one); the lines below do them too, in more steps.
        if use == RWX:
            tlb[key | _READ] = tlb[key | _WRITE] = tlb[key | _EXEC] = pfn
            return pfn
        if use == _RX:
            tlb[key | _READ] = tlb[key | _EXEC] = pfn
            return pfn
        if use & _AD:
            spt[index] = spte | use & _AD
        if use & READABLE:
            tlb[key | _READ] = pfn
        if use & WRITABLE:
            tlb[key | _WRITE] = pfn
        if use & EXECUTABLE:
            tlb[key | _EXEC] = pfn
        return pfn

    def _tlb_fill_counted(self, gpa: int, op: int) -> int | None:
        """`_tlb_fill` in virtual time, which charges the walk: counted as one that starts
        at the paging-structure cache or at the root (wall time counts none)."""
        if op != OP_HLT:
            if gpa >> 21 in self.pde_cache:
                self.walks_cached += 1
            else:
                self.walks_full += 1
        return Vcpu._tlb_fill(self, gpa, op)

    def _walk_upper(self, gfn: int) -> tuple[array, int, int] | None:
        """The walk from the root down to the entry for gfn that is not a present table
        pointer: (its table's SPTEs, its index, the level's gfn shift); None for a gfn above
        the VM's `max_gfn`. Sets Accessed on the table pointers it passes (A/D on) and
        caches the 4K-level table it reaches."""
        if gfn > self._max_gfn:
            return None        # maps nothing (beyond the root's reach, indices would wrap)
        page = self.root
        if page.freed:
            raise VmBugged(f"hardware walk from freed root {page!r}")
        spt, level, ad = page.spt, page.level, self._ad_enabled
        while True:
            shift = (level - 1) * 9
            index = (gfn >> shift) & 511
            spte = spt[index]
            if level == 1 or spte & LARGE or not spte & RWX or \
                    spte & MMIO_MASK == MMIO_VALUE:
                return spt, index, shift
            if ad and not spte & ACCESSED:
                spt[index] = spte | ACCESSED
            page = page.children[index]
            if page is None:
                raise VmBugged(f"hardware walk through SPTE {spte:#x} to no recorded table")
            if page.freed:
                raise VmBugged(f"hardware walk through SPTE {spte:#x} to freed {page!r}")
            spt = page.spt
            level -= 1
            if level == 1:
                self.pde_cache[gfn >> 9] = page


def _is_write(op: int) -> bool:
    return op & OP_KIND_MASK == AccessKind.WRITE
