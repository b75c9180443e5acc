"""What a page fault carries through the MMU (`struct kvm_page_fault`) and how it ends."""

from __future__ import annotations

import enum

from .spte import EXECUTABLE, READABLE, WRITABLE, make_leaf, make_mmio
from .types import MAX_HUGEPAGE_LEVEL, PG_LEVEL_4K

__all__ = ["RetPf", "PageFault", "RET_PF_CONTINUE", "RET_PF_RETRY", "RET_PF_EMULATE",
           "RET_PF_WRITE_PROTECTED", "RET_PF_INVALID", "RET_PF_FIXED", "RET_PF_SPURIOUS",
           "PFERR_PRESENT_MASK", "PFERR_WRITE_MASK", "PFERR_USER_MASK",
           "PFERR_RSVD_MASK", "PFERR_FETCH_MASK", "PFERR_GUEST_FINAL_MASK",
           "PFERR_GUEST_PAGE_MASK", "PFERR_ACCESS_MASK", "ACCESS_NEEDS", "fault_spte"]

PFERR_PRESENT_MASK = 1 << 0
PFERR_WRITE_MASK = 1 << 1
PFERR_USER_MASK = 1 << 2
PFERR_RSVD_MASK = 1 << 3
PFERR_FETCH_MASK = 1 << 4
PFERR_GUEST_FINAL_MASK = 1 << 32
PFERR_GUEST_PAGE_MASK = 1 << 33

# `is_access_allowed`: by an error code's write and fetch bits, the SPTE bit the access
# needs: X for a fetch, else W for a write, else R.
PFERR_ACCESS_MASK = PFERR_WRITE_MASK | PFERR_FETCH_MASK
ACCESS_NEEDS = {bits: EXECUTABLE if bits & PFERR_FETCH_MASK else
                WRITABLE if bits & PFERR_WRITE_MASK else READABLE
                for bits in (0, PFERR_WRITE_MASK, PFERR_FETCH_MASK, PFERR_ACCESS_MASK)}


class RetPf(enum.IntEnum):
    CONTINUE = 0
    RETRY = 1
    EMULATE = 2
    WRITE_PROTECTED = 3
    INVALID = 4
    FIXED = 5
    SPURIOUS = 6


# The members under KVM's names, for the fault path: reading an enum member through its
# class costs a descriptor call, and the path compares results many times per fault.
(RET_PF_CONTINUE, RET_PF_RETRY, RET_PF_EMULATE, RET_PF_WRITE_PROTECTED, RET_PF_INVALID,
 RET_PF_FIXED, RET_PF_SPURIOUS) = RetPf


class PageFault:
    """One fault's inputs, what the lookups found, and the level it will map at.

    The fields every fault starts with are class attributes: a fault object is made on
    every fault, and only what differs is stored on it. A fault is always a vCPU's, in
    address space 0 (`Vcpu.memslots`: no SMM), and never a prefetch (no async page fault
    completes, no KVM_PRE_FAULT_MEMORY), so it carries neither `as_id` nor `prefetch`."""

    slot = None                     # the memslot, None for a gfn no slot covers (MMIO)
    hva = 0
    mmu_seq = 0                     # mmu_invalidate_seq when the fault began
    pfn = 0
    map_writable = False
    generation = 0                  # memslot generation, stamped into an MMIO SPTE
    max_level = MAX_HUGEPAGE_LEVEL
    req_level = PG_LEVEL_4K
    goal_level = PG_LEVEL_4K
    host_level = PG_LEVEL_4K        # the level the host maps the hva at
    huge_page_disallowed = False    # an instruction fetch under the NX huge page mitigation
    is_private = False              # the gfn was private when the fault began

    def __init__(self, addr: int, error_code: int) -> None:
        self.addr = addr
        self.error_code = error_code
        self.gfn = addr >> 12
        self.write = error_code & PFERR_WRITE_MASK != 0


def fault_spte(fault: PageFault, level: int, ad_enabled: bool,
               executable: bool = True) -> int:
    """`make_spte` for a fault, as both MMUs install it: an MMIO SPTE when no memslot
    holds the gfn, else the leaf (host_writable = writable = map_writable; not executable
    when the NX huge page mitigation says so)."""
    if fault.slot is None:
        return make_mmio(fault.gfn, fault.generation)
    writable = fault.map_writable
    return make_leaf(fault.pfn, level, writable, writable, ad_enabled, executable=executable)
