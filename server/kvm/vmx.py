"""The VMX exits the hardware walker raises, and their translation to a #PF error code.

An access the EPT cannot satisfy is an EPT violation whose exit qualification says what the
access was (read, write, fetch) and what the EPT entries allowed (the AND of R/W/X along the
walk; all clear when an entry was not present). `error_code_from_qualification` converts
it as `__vmx_handle_ept_violation` does (reference §2.2). An MMIO SPTE (W+X without R) is an
EPT misconfiguration, which KVM turns into a fault with PFERR_RSVD_MASK.

vmmu's accesses are guest-physical accesses of the guest's own loads, stores and fetches, so
the guest-linear-address fields say "valid, translated" (bits 7 and 8): the error code
carries PFERR_GUEST_FINAL_MASK.
"""

from __future__ import annotations

from .mmu_internal import (PFERR_FETCH_MASK, PFERR_GUEST_FINAL_MASK, PFERR_GUEST_PAGE_MASK,
                           PFERR_PRESENT_MASK, PFERR_RSVD_MASK, PFERR_USER_MASK,
                           PFERR_WRITE_MASK)
from .types import AccessKind

__all__ = ["EPT_VIOLATION_ACC_READ", "EPT_VIOLATION_ACC_WRITE", "EPT_VIOLATION_ACC_INSTR",
           "EPT_VIOLATION_PROT_MASK", "EPT_VIOLATION_GVA_IS_VALID",
           "EPT_VIOLATION_GVA_TRANSLATED", "ept_violation_qualification",
           "error_code_from_qualification", "MISCONFIG_ERROR_CODE"]

EPT_VIOLATION_ACC_READ = 1 << 0
EPT_VIOLATION_ACC_WRITE = 1 << 1
EPT_VIOLATION_ACC_INSTR = 1 << 2
EPT_VIOLATION_PROT_SHIFT = 3
EPT_VIOLATION_PROT_MASK = 7 << EPT_VIOLATION_PROT_SHIFT
EPT_VIOLATION_GVA_IS_VALID = 1 << 7
EPT_VIOLATION_GVA_TRANSLATED = 1 << 8

_ACC = {AccessKind.READ: EPT_VIOLATION_ACC_READ, AccessKind.WRITE: EPT_VIOLATION_ACC_WRITE,
        AccessKind.EXEC: EPT_VIOLATION_ACC_INSTR}

MISCONFIG_ERROR_CODE = PFERR_RSVD_MASK


def ept_violation_qualification(kind: int, walk_rwx: int) -> int:
    """Exit qualification for an access of `kind`; `walk_rwx` = AND of R/W/X on the walk."""
    return (_ACC[kind] | ((walk_rwx & 7) << EPT_VIOLATION_PROT_SHIFT)
            | EPT_VIOLATION_GVA_IS_VALID | EPT_VIOLATION_GVA_TRANSLATED)


def error_code_from_qualification(qualification: int) -> int:
    error_code = 0
    if qualification & EPT_VIOLATION_ACC_READ:
        error_code |= PFERR_USER_MASK
    if qualification & EPT_VIOLATION_ACC_WRITE:
        error_code |= PFERR_WRITE_MASK
    if qualification & EPT_VIOLATION_ACC_INSTR:
        error_code |= PFERR_FETCH_MASK
    if qualification & EPT_VIOLATION_PROT_MASK:
        error_code |= PFERR_PRESENT_MASK
    if qualification & EPT_VIOLATION_GVA_IS_VALID:
        error_code |= (PFERR_GUEST_FINAL_MASK if qualification & EPT_VIOLATION_GVA_TRANSLATED
                       else PFERR_GUEST_PAGE_MASK)
    return error_code
