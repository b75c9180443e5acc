"""The 64-bit EPT SPTE as the TDP MMU writes it: bits, predicates and constructors.

Callers ask these functions, except where an SPTE is read once per access or per fault (the
hardware walker, the iterator, the fault path), which test the bits. Layout (reference §1.1):

    bit 0-2  R W X            bit 7  large (leaf at 2M/1G)   bit 8 Accessed   bit 9 Dirty
    bit 11   MMU-present      bits 12-51 pfn                 bits 52-53 A/D mode
    bits 54,56  saved R,X of an access-tracked SPTE
    bit 57   host-writable    bit 58 MMU-writable            bit 63 suppress #VE

Special values: NONPRESENT (bit 63 only; fresh tables are filled with it), FROZEN
(NONPRESENT | 0x5a0, an entry being torn down by a thread holding mmu_lock for read), and
MMIO SPTEs (W+X without R, a misconfiguration, carrying the gfn and a memslot generation).
"""

from __future__ import annotations

from itertools import product

from .types import PG_LEVEL_4K

__all__ = [
    "READABLE", "WRITABLE", "EXECUTABLE", "RWX", "LARGE", "ACCESSED", "DIRTY",
    "MMU_PRESENT", "BASE_ADDR_MASK", "LOW_BITS", "AD_DISABLED", "HOST_WRITABLE",
    "MMU_WRITABLE",
    "SUPPRESS_VE", "NONPRESENT", "FROZEN", "LEAF_BITS", "PRESENT_LARGE",
    "is_shadow_present", "is_large", "is_last", "is_leaf_present", "is_frozen",
    "is_mmio", "is_writable", "is_mmu_writable", "is_host_writable", "is_accessed",
    "is_dirty", "is_access_track", "ad_disabled", "spte_to_pfn",
    "make_nonleaf", "make_leaf", "make_mmio", "make_small", "make_huge", "mmio_gfn",
    "mmio_generation", "make_executable", "make_nonexecutable",
    "mark_for_access_track", "restore_access_track", "needs_atomic_update",
    "leaf_change_needs_tlb_flush", "check_writable_invariants", "describe",
]

READABLE = 1 << 0
WRITABLE = 1 << 1
EXECUTABLE = 1 << 2
RWX = READABLE | WRITABLE | EXECUTABLE
LARGE = 1 << 7
ACCESSED = 1 << 8
DIRTY = 1 << 9
MMU_PRESENT = 1 << 11
BASE_ADDR_MASK = ((1 << 52) - 1) & ~((1 << 12) - 1)
# The SPTE's bits below its pfn (present, R/W/X, A/D): an SPTE is a 64-bit int (bit 63
# set) and each operation on it costs about a dict lookup; on these bits, one on a small int.
LOW_BITS = (1 << 12) - 1
AD_DISABLED = 1 << 52
AD_MASK = 3 << 52
ACC_TRACK_SAVED_SHIFT = 54
ACC_TRACK_SAVED_MASK = (READABLE | EXECUTABLE) << ACC_TRACK_SAVED_SHIFT
HOST_WRITABLE = 1 << 57
MMU_WRITABLE = 1 << 58
SUPPRESS_VE = 1 << 63

NONPRESENT = SUPPRESS_VE
FROZEN = NONPRESENT | 0x5A0

MMIO_MASK = RWX | SUPPRESS_VE
MMIO_VALUE = WRITABLE | EXECUTABLE        # W+X without R: an EPT misconfiguration
_MMIO_GEN_LOW_SHIFT, _MMIO_GEN_LOW_BITS = 3, 8
_MMIO_GEN_HIGH_SHIFT, _MMIO_GEN_HIGH_BITS = 52, 11
MMIO_GEN_MASK = (1 << (_MMIO_GEN_LOW_BITS + _MMIO_GEN_HIGH_BITS)) - 1


def is_shadow_present(spte: int) -> bool:
    return bool(spte & MMU_PRESENT)


def is_large(spte: int) -> bool:
    return bool(spte & LARGE)


def is_last(spte: int, level: int) -> bool:
    return level == PG_LEVEL_4K or bool(spte & LARGE)


# By level (index 0 unused): the bits that, all set, make an SPTE at that level a present
# leaf. One mask test instead of two, for `handle_changed_spte`, which makes it twice on
# every SPTE change.
LEAF_BITS = (0, MMU_PRESENT) + (MMU_PRESENT | LARGE,) * 4
# Above 4K, of these bits a present non-leaf SPTE has MMU_PRESENT only: the walkers' test.
PRESENT_LARGE = MMU_PRESENT | LARGE


def is_leaf_present(spte: int, level: int) -> bool:
    bits = LEAF_BITS[level]
    return spte & bits == bits


def is_frozen(spte: int) -> bool:
    return spte == FROZEN


def is_mmio(spte: int) -> bool:
    return (spte & MMIO_MASK) == MMIO_VALUE


def is_writable(spte: int) -> bool:
    return bool(spte & WRITABLE)


def is_mmu_writable(spte: int) -> bool:
    return bool(spte & MMU_WRITABLE)


def is_host_writable(spte: int) -> bool:
    return bool(spte & HOST_WRITABLE)


def is_accessed(spte: int) -> bool:
    return bool(spte & ACCESSED)


def is_dirty(spte: int) -> bool:
    return bool(spte & DIRTY)


def ad_disabled(spte: int) -> bool:
    return (spte & AD_MASK) == AD_DISABLED


def is_access_track(spte: int) -> bool:
    return ad_disabled(spte) and not (spte & RWX)


def spte_to_pfn(spte: int) -> int:
    return (spte & BASE_ADDR_MASK) >> 12


def make_nonleaf(child_pfn: int, ad_enabled: bool) -> int:
    """A table pointer: always RWX (permissions are enforced at the leaf only)."""
    spte = MMU_PRESENT | SUPPRESS_VE | RWX | (child_pfn << 12)
    return spte | (ACCESSED if ad_enabled else AD_DISABLED)


def make_leaf(pfn: int, level: int, host_writable: bool, writable: bool,
              ad_enabled: bool, prefetch: bool = False, executable: bool = True) -> int:
    """A leaf as `make_spte` builds it for TDP (pte_access = ACC_ALL).

    `host_writable` is the host mapping's (and the memslot's) permission, fixed for the
    life of the SPTE. `writable` says whether this SPTE may be writable now; a writable leaf
    gets W | MMU-writable, and D when A/D bits are on, so that hardware never has to set D
    itself (with A/D off there is no hardware D and KVM leaves the bit clear). A host-writable
    leaf that is not writable keeps MMU-writable: a later write may be fixed without
    mmu_lock. Every combination's bits are made once, at import; the flags index them as
    the bits of an int, `large` the highest (an int from conditionals is cheaper to make
    than a tuple key is to hash, and this runs on every fault).
    """
    return _LEAF_ATTRS[(32 if level > PG_LEVEL_4K else 0) | (16 if host_writable else 0) |
                       (8 if writable else 0) | (4 if ad_enabled else 0) |
                       (2 if prefetch else 0) | (1 if executable else 0)] | pfn << 12


def _leaf_attrs(large: bool, host_writable: bool, writable: bool, ad_enabled: bool,
                prefetch: bool, executable: bool) -> int:
    """The bits of `make_leaf`'s leaf other than the pfn (which no step below touches)."""
    spte = MMU_PRESENT | SUPPRESS_VE | READABLE
    if not ad_enabled:
        spte |= AD_DISABLED
    if not prefetch:
        spte |= ACCESSED
    if executable:
        spte |= EXECUTABLE
    if large:
        spte |= LARGE
    if host_writable:
        spte |= HOST_WRITABLE | MMU_WRITABLE
        if writable:
            spte |= WRITABLE | (DIRTY if ad_enabled else 0)
    if prefetch:
        spte = mark_for_access_track(spte)
    return spte


def make_mmio(gfn: int, generation: int) -> int:
    gen = generation & MMIO_GEN_MASK
    low = gen & ((1 << _MMIO_GEN_LOW_BITS) - 1)
    high = gen >> _MMIO_GEN_LOW_BITS
    return (MMIO_VALUE | (low << _MMIO_GEN_LOW_SHIFT)
            | (high << _MMIO_GEN_HIGH_SHIFT) | (gfn << 12))


def mmio_gfn(spte: int) -> int:
    return (spte & BASE_ADDR_MASK) >> 12


def mmio_generation(spte: int) -> int:
    low = (spte >> _MMIO_GEN_LOW_SHIFT) & ((1 << _MMIO_GEN_LOW_BITS) - 1)
    high = (spte >> _MMIO_GEN_HIGH_SHIFT) & ((1 << _MMIO_GEN_HIGH_BITS) - 1)
    return low | (high << _MMIO_GEN_LOW_BITS)


def make_small(huge: int, huge_level: int, index: int, nx_huge_pages: bool = False) -> int:
    """Child `index` of a split huge leaf: same bits, pfn advanced, large cleared at 4K
    (and X set again there under the NX huge page mitigation)."""
    child_level = huge_level - 1
    pfn = spte_to_pfn(huge) + index * (1 << ((child_level - 1) * 9))
    spte = (huge & ~BASE_ADDR_MASK) | (pfn << 12)
    if child_level == PG_LEVEL_4K:
        spte &= ~LARGE
        if nx_huge_pages:
            spte = make_executable(spte)
    return spte


def make_huge(small: int, level: int) -> int:
    """A `level` leaf built from any leaf below it (huge page recovery): same bits, large
    set, pfn aligned down to the huge frame."""
    frame_mask = (1 << ((level - 1) * 9)) - 1
    pfn = spte_to_pfn(small) & ~frame_mask
    return (small & ~BASE_ADDR_MASK) | LARGE | (pfn << 12)


def mark_for_access_track(spte: int) -> int:
    """Age an SPTE: clear A, or with A/D disabled stash R/X and clear RWX (W is not kept)."""
    if not ad_disabled(spte):
        return spte & ~ACCESSED
    if is_access_track(spte):
        return spte      # already aged: R/X are stashed, recomputing would lose them
    saved = (spte & (READABLE | EXECUTABLE)) << ACC_TRACK_SAVED_SHIFT
    return (spte & ~(RWX | ACCESSED | ACC_TRACK_SAVED_MASK)) | saved


def restore_access_track(spte: int) -> int:
    saved = (spte & ACC_TRACK_SAVED_MASK) >> ACC_TRACK_SAVED_SHIFT
    return (spte & ~ACC_TRACK_SAVED_MASK) | saved | ACCESSED


def make_executable(spte: int) -> int:
    """`make_spte_executable`: set X, in the stashed bits of an access-tracked SPTE."""
    if is_access_track(spte):
        return spte | EXECUTABLE << ACC_TRACK_SAVED_SHIFT
    return spte | EXECUTABLE


def make_nonexecutable(spte: int) -> int:
    """`make_spte_nonexecutable`: clear X, in the stashed bits of an access-tracked SPTE."""
    if is_access_track(spte):
        return spte & ~(EXECUTABLE << ACC_TRACK_SAVED_SHIFT)
    return spte & ~EXECUTABLE


def needs_atomic_update(spte: int, level: int) -> bool:
    """A present leaf that another party may change under us (reference §1.3)."""
    if not is_leaf_present(spte, level):
        return False
    if is_mmu_writable(spte) and not is_writable(spte):
        return True      # the fast page fault may set W
    if ad_disabled(spte):
        return True      # aging may access-track it, the fast path may restore it
    return is_writable(spte) and not is_dirty(spte)   # the CPU may set D


def leaf_change_needs_tlb_flush(old: int, new: int) -> bool:
    return is_mmu_writable(old) and not is_mmu_writable(new)


_WRITABLE_BITS = HOST_WRITABLE | MMU_WRITABLE | WRITABLE
_LEGAL_WRITABLE = frozenset((_WRITABLE_BITS, HOST_WRITABLE | MMU_WRITABLE, HOST_WRITABLE, 0))


def check_writable_invariants(spte: int) -> bool:
    """Only (host, mmu, W) = 111, 110, 100, 000 are legal."""
    return spte & _WRITABLE_BITS in _LEGAL_WRITABLE


def describe(spte: int, level: int) -> str:
    """The kind of an SPTE at `level`: non-present, frozen, mmio, table or leaf."""
    if spte == FROZEN:
        return "frozen"
    if is_mmio(spte):
        return "mmio"
    if not is_shadow_present(spte):
        return "non-present"
    return "leaf" if is_last(spte, level) else "table"


# Built last: `_leaf_attrs` needs `mark_for_access_track`. By `make_leaf`'s index: `product`
# varies the last flag fastest, so flag i of six is bit 5 - i.
_LEAF_ATTRS = tuple(_leaf_attrs(*flags) for flags in product((False, True), repeat=6))
