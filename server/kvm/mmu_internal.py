"""What a page fault carries through the MMU (`struct kvm_page_fault`) and how it ends."""

from __future__ import annotations

import enum

from .types import MAX_HUGEPAGE_LEVEL, PG_LEVEL_4K

__all__ = ["RetPf", "PageFault", "PFERR_PRESENT_MASK", "PFERR_WRITE_MASK", "PFERR_USER_MASK",
           "PFERR_RSVD_MASK", "PFERR_FETCH_MASK", "PFERR_GUEST_FINAL_MASK",
           "PFERR_GUEST_PAGE_MASK"]

PFERR_PRESENT_MASK = 1 << 0
PFERR_WRITE_MASK = 1 << 1
PFERR_USER_MASK = 1 << 2
PFERR_RSVD_MASK = 1 << 3
PFERR_FETCH_MASK = 1 << 4
PFERR_GUEST_FINAL_MASK = 1 << 32
PFERR_GUEST_PAGE_MASK = 1 << 33


class RetPf(enum.IntEnum):
    CONTINUE = 0
    RETRY = 1
    EMULATE = 2
    WRITE_PROTECTED = 3
    INVALID = 4
    FIXED = 5
    SPURIOUS = 6


class PageFault:
    """One fault's inputs, what the lookups found, and the level it will map at."""

    __slots__ = ("addr", "error_code", "gfn", "write", "exec", "present", "rsvd", "prefetch",
                 "slot", "hva", "mmu_seq", "pfn", "map_writable", "max_level", "req_level",
                 "goal_level", "as_id", "generation", "host_level")

    def __init__(self, addr: int, error_code: int, as_id: int = 0,
                 prefetch: bool = False) -> None:
        self.addr, self.error_code, self.as_id, self.prefetch = addr, error_code, as_id, prefetch
        self.gfn = addr >> 12
        self.write = bool(error_code & PFERR_WRITE_MASK)
        self.exec = bool(error_code & PFERR_FETCH_MASK)
        self.present = bool(error_code & PFERR_PRESENT_MASK)
        self.rsvd = bool(error_code & PFERR_RSVD_MASK)
        self.slot = None
        self.hva = 0
        self.mmu_seq = 0
        self.pfn = 0
        self.map_writable = False
        self.max_level = MAX_HUGEPAGE_LEVEL
        self.req_level = PG_LEVEL_4K
        self.goal_level = PG_LEVEL_4K
        self.generation = 0           # memslot generation, stamped into an MMIO SPTE
        self.host_level = PG_LEVEL_4K  # the level the host maps the hva at
