"""The fast page fault: fixing an SPTE without mmu_lock (`fast_page_fault`, reference §2.7).

Only inside an RCU read-side section, and only by a compare-and-exchange against the
snapshot the walk read, the fast path fixes exactly three things:
- a write to a present 4K leaf that is write-protected for dirty logging (W clear,
  MMU-writable set): W is set and, W having gone 0 -> 1, the page is marked dirty;
- an access to an access-tracked SPTE (A/D bits off): R/X (and A) are restored;
- a spurious fault (the SPTE already allows the access: a stale TLB, or another vCPU fixed
  it first): nothing to do.
It never allocates, never changes a pfn, never touches a non-leaf SPTE, and refuses a huge
leaf in a dirty-logged slot (the slow path must split it). Anything else goes to the slow
path (RET_PF_INVALID). Between the read and the cmpxchg another task may change the SPTE
(preemption point `fast_pf.cas`): the cmpxchg then fails and the walk is done again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import spte as S
from .spte import MMU_PRESENT, MMU_WRITABLE, RWX, WRITABLE
from .mmu_internal import (ACCESS_NEEDS, PFERR_ACCESS_MASK, PFERR_PRESENT_MASK,
                           PFERR_RSVD_MASK, PFERR_WRITE_MASK, RET_PF_FIXED, RET_PF_INVALID,
                           RET_PF_SPURIOUS, RetPf)
from .mmu_page import UseAfterFree
from .tdp_iter import last_spte
from .types import PG_LEVEL_4K

if TYPE_CHECKING:
    from .vcpu import Vcpu
    from .vm import Vm

__all__ = ["page_fault_can_be_fast", "can_be_fast_table", "CAN_BE_FAST_BITS", "fast_page_fault"]

MAX_TRIES = 4
_TRIES = range(MAX_TRIES)
_PRESENT_WRITE = PFERR_PRESENT_MASK | PFERR_WRITE_MASK
_PRESENT_WRITE_RSVD = _PRESENT_WRITE | PFERR_RSVD_MASK
# By the error code's write and fetch bits: the SPTE bit the access needs, and the write
# bit, in one lookup.
_ACCESS = {bits: (need, bits & PFERR_WRITE_MASK) for bits, need in ACCESS_NEEDS.items()}


def page_fault_can_be_fast(vm: "Vm", error_code: int) -> bool:
    """A write to a present SPTE, or, A/D bits off, an access to a not-present one (it may
    be access-tracked); never an MMIO fault (RSVD)."""
    if error_code & _PRESENT_WRITE_RSVD == _PRESENT_WRITE:
        return vm.config.fast_page_fault
    if error_code & (PFERR_PRESENT_MASK | PFERR_RSVD_MASK):
        return False
    return not vm.ad_enabled and vm.config.fast_page_fault


# The bits of an error code `page_fault_can_be_fast` looks at.
CAN_BE_FAST_BITS = PFERR_PRESENT_MASK | PFERR_WRITE_MASK | PFERR_RSVD_MASK


def can_be_fast_table(vm: "Vm") -> tuple[bool, ...]:
    """`page_fault_can_be_fast` for `vm`, by `error_code & CAN_BE_FAST_BITS`: the fault
    path asks on every fault, and the answer depends on settings fixed at VM creation."""
    return tuple(page_fault_can_be_fast(vm, bits) for bits in range(CAN_BE_FAST_BITS + 1))


async def fast_page_fault(vcpu: "Vcpu", gpa: int, error_code: int) -> RetPf:
    """FIXED or SPURIOUS when the leaf needed no mmu_lock, else INVALID (the slow path).

    It takes the fault's address and error code rather than a `PageFault`: the fault object
    is made only for the slow path, which fills it in."""
    vm = vcpu.vm
    r = RET_PF_INVALID
    gfn = gpa >> 12
    need, write = _ACCESS[error_code & PFERR_ACCESS_MASK]
    rcu = vm.rcu
    token = rcu.enter()
    # fault->slot: looked up once, under the read-side section that memslot updates wait
    # out, so a slot published meanwhile is not this fault's business.
    slot = vcpu.memslots.lookup(gfn)
    try:
        for _ in _TRIES:
            table, index, level, old = last_spte(vcpu.root, gfn)
            if not old & MMU_PRESENT:
                break                             # nothing to fix: the slow path maps it
            if old & need:
                r = RET_PF_SPURIOUS
                break
            new = old
            if not old & RWX and S.ad_disabled(old):
                new = S.restore_access_track(new)
            if write and old & MMU_WRITABLE:
                if level > PG_LEVEL_4K and slot is not None and slot.dirty_logging:
                    break                         # only the slow path may split it
                new |= WRITABLE                   # now allows the write: W was clear
            elif new == old or not new & need:
                break
            await vm.sched.point("fast_pf.cas")
            if table.freed:
                raise UseAfterFree(f"fast page fault wrote freed {table!r}")
            spt = table.spt
            if spt[index] != old and "fast_pf_plain_write" not in vm.knobs:
                continue                          # changed under us: walk again
            spt[index] = new                      # the cmpxchg (the debug knob: no compare)
            if new & WRITABLE and not old & WRITABLE and slot is not None:
                vm.mark_page_dirty(slot, gfn, vcpu)
            r = RET_PF_FIXED
            break
    finally:
        rcu.exit(token)
    if r is not RET_PF_INVALID:
        vcpu.stat.pf_fast += 1
    if vm.tracer.on:
        vm.tracer.emit("fast_page_fault", vcpu=vcpu.id, gpa=gpa, error_code=error_code,
                       result=r.name)
    return r
