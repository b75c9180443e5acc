"""Memslots: the guest physical memory map, with `KVM_SET_USER_MEMORY_REGION2`'s rules.

One `Memslots` set per address space (x86: 0 normal, 1 SMM), sorted by base gfn, with a
generation that moves on every change. `check_region` is the validation of reference §6.2,
in KVM's order and with KVM's errnos; it decides the change kind and never mutates, so a
rejected call changes nothing. A slot with KVM_MEM_GUEST_MEMFD also takes its private
pages from a range of a guest_memfd (guest_memfd.py): such a slot is immutable, it can
only be deleted.
"""

from __future__ import annotations

import bisect
import enum
import errno
from array import array
from dataclasses import dataclass

from .errors import KvmError, einval
from .types import PAGE_SHIFT, PAGE_SIZE, PG_LEVEL_4K, TASK_SIZE_MAX

__all__ = [
    "KVM_MEM_LOG_DIRTY_PAGES", "KVM_MEM_READONLY", "KVM_MEMSLOT_INVALID",
    "KVM_MEM_GUEST_MEMFD", "KVM_USER_MEM_SLOTS", "KVM_MEM_SLOTS_NUM", "KVM_ADDRESS_SPACE_NUM",
    "KVM_MEM_MAX_NR_PAGES", "Memslot", "MemslotInfo", "Memslots", "MemslotChange",
    "check_region", "check_region_flags",
]

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_MEM_GUEST_MEMFD = 1 << 2
KVM_MEMSLOT_INVALID = 1 << 16     # internal: the slot is being deleted or moved

KVM_MEM_SLOTS_NUM = 32767         # SHRT_MAX
KVM_USER_MEM_SLOTS = 32764        # minus the three x86 private slots
KVM_ADDRESS_SPACE_NUM = 2
KVM_MEM_MAX_NR_PAGES = (1 << 31) - 1


class MemslotChange(enum.Enum):
    CREATE = "create"
    DELETE = "delete"
    MOVE = "move"
    FLAGS_ONLY = "flags_only"


@dataclass(frozen=True)
class MemslotInfo:
    as_id: int
    id: int
    flags: int
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    guest_memfd: int = 0             # with KVM_MEM_GUEST_MEMFD: the fd and the offset bound
    guest_memfd_offset: int = 0


class Memslot:
    """One `kvm_memory_slot`. Replaced, never edited, by a memslot update.

    `dirty_bitmap` (one bit per page, 64 to a word, bit i of word j for page 64j + i) is
    the exception: its words change in place, and a MOVE or FLAGS_ONLY update hands the
    same array to the new slot while logging stays on (dirty_log.py).
    """

    _FIELDS = ("as_id", "id", "base_gfn", "npages", "userspace_addr", "flags", "dirty_bitmap",
               "gmem", "gmem_pgoff")
    # What the flags say and where the slot ends, read on every fault: kept as fields (a
    # slot is never edited).
    __slots__ = _FIELDS + ("readonly", "dirty_logging", "invalid", "end_gfn")

    def __init__(self, as_id: int, id: int, base_gfn: int, npages: int,
                 userspace_addr: int, flags: int, dirty_bitmap: array | None = None,
                 gmem=None, gmem_pgoff: int = 0) -> None:
        self.as_id, self.id = as_id, id
        self.gmem, self.gmem_pgoff = gmem, gmem_pgoff    # GuestMemfd, its first page index
        self.base_gfn, self.npages = base_gfn, npages
        self.userspace_addr, self.flags = userspace_addr, flags
        self.dirty_bitmap = dirty_bitmap
        self.readonly = bool(flags & KVM_MEM_READONLY)
        self.dirty_logging = bool(flags & KVM_MEM_LOG_DIRTY_PAGES)
        self.invalid = bool(flags & KVM_MEMSLOT_INVALID)
        self.end_gfn = base_gfn + npages

    def copy(self, **changes) -> "Memslot":
        fields = {k: getattr(self, k) for k in self._FIELDS}
        fields.update(changes)
        return Memslot(**fields)

    def gfn_to_hva(self, gfn: int) -> int:
        return self.userspace_addr + ((gfn - self.base_gfn) << PAGE_SHIFT)

    def hva_to_gfn_range(self, start: int, end: int) -> tuple[int, int] | None:
        """The gfns whose pages intersect hva [start, end), clipped to the slot."""
        slot_end = self.userspace_addr + (self.npages << PAGE_SHIFT)
        start, end = max(start, self.userspace_addr), min(end, slot_end)
        if start >= end:
            return None
        first = self.base_gfn + ((start - self.userspace_addr) >> PAGE_SHIFT)
        last = self.base_gfn + ((end - 1 - self.userspace_addr) >> PAGE_SHIFT)
        return first, last + 1

    def lpage_disallowed(self, gfn: int, level: int) -> bool:
        """`lpage_info[level].disallow_lpage`: may gfn not be mapped by a `level` page?

        Disallowed for the first/last frame when the slot does not start/end on a frame
        boundary, and for every frame when gfn and hva are misaligned to each other.
        """
        shift = (level - 1) * 9
        mask = (1 << shift) - 1
        base, end = self.base_gfn, self.base_gfn + self.npages
        if (base ^ (self.userspace_addr >> PAGE_SHIFT)) & mask:
            return True
        frame = gfn >> shift
        if frame == base >> shift and base & mask:
            return True
        return frame == (end - 1) >> shift and bool(end & mask)

    def max_lpage_level(self, gfn: int, level: int) -> int:
        """The largest level up to `level` at which the lpage rules let gfn be mapped
        (the loop of `__kvm_mmu_max_mapping_level`); 4K is always allowed."""
        while level > PG_LEVEL_4K and self.lpage_disallowed(gfn, level):
            level -= 1
        return level

    def info(self) -> MemslotInfo:
        gmem = self.gmem
        return MemslotInfo(self.as_id, self.id, self.flags & ~KVM_MEMSLOT_INVALID,
                           self.base_gfn << PAGE_SHIFT, self.npages << PAGE_SHIFT,
                           self.userspace_addr, gmem.fd if gmem is not None else 0,
                           self.gmem_pgoff << PAGE_SHIFT)


class Memslots:
    """The slots of one address space: by id, and sorted by gfn for lookups."""

    def __init__(self, as_id: int) -> None:
        self.as_id = as_id
        self.generation = as_id      # moves by KVM_ADDRESS_SPACE_NUM per update
        self.by_id: dict[int, Memslot] = {}
        self._bases: list[int] = []
        self._sorted: list[Memslot] = []
        self._last_used: Memslot | None = None

    def lookup(self, gfn: int) -> Memslot | None:
        """`__gfn_to_memslot`: the last used slot first, then a binary search."""
        slot = self._last_used
        if slot is not None and slot.base_gfn <= gfn < slot.end_gfn:
            return slot
        i = bisect.bisect_right(self._bases, gfn) - 1
        if i >= 0:
            slot = self._sorted[i]
            if gfn < slot.end_gfn:
                self._last_used = slot
                return slot
        return None

    def overlapping(self, start_gfn: int, end_gfn: int, exclude: int | None = None):
        return [s for s in self._sorted
                if s.base_gfn < end_gfn and start_gfn < s.end_gfn and s.id != exclude]

    def in_hva_range(self, start: int, end: int):
        """`kvm_for_each_memslot_in_hva_range`: (slot, gfn_start, gfn_end) triples."""
        for slot in self._sorted:
            r = slot.hva_to_gfn_range(start, end)
            if r is not None:
                yield slot, r[0], r[1]

    def __iter__(self):
        return iter(self._sorted)

    def __len__(self) -> int:
        return len(self._sorted)

    def replace(self, old: Memslot | None, new: Memslot | None) -> None:
        """Install `new` in place of `old` (either may be None) and move the generation."""
        if old is not None:
            i = self._sorted.index(old)
            del self._sorted[i], self._bases[i]
            del self.by_id[old.id]
        if new is not None:
            i = bisect.bisect_right(self._bases, new.base_gfn)
            self._sorted.insert(i, new)
            self._bases.insert(i, new.base_gfn)
            self.by_id[new.id] = new
        self._last_used = None
        self.generation += KVM_ADDRESS_SPACE_NUM


def check_region_flags(flags: int, private_mem: bool) -> None:
    """`check_memory_region_flags`: GUEST_MEMFD only on a VM with private memory, and
    neither with LOG_DIRTY_PAGES (private memory is not dirty-logged) nor with READONLY (a
    write to a read-only slot is emulated MMIO, which private memory cannot be)."""
    valid = KVM_MEM_LOG_DIRTY_PAGES | (KVM_MEM_GUEST_MEMFD if private_mem else 0)
    if flags & KVM_MEM_GUEST_MEMFD:
        valid &= ~KVM_MEM_LOG_DIRTY_PAGES
    else:
        valid |= KVM_MEM_READONLY
    if flags & ~valid:
        if flags & KVM_MEM_GUEST_MEMFD and not private_mem:
            why = "GUEST_MEMFD needs private memory, which needs the TDP MMU"
        elif flags & KVM_MEM_GUEST_MEMFD and flags & (KVM_MEM_LOG_DIRTY_PAGES |
                                                      KVM_MEM_READONLY):
            why = "GUEST_MEMFD takes neither LOG_DIRTY_PAGES nor READONLY"
        else:
            why = "the valid bits are LOG_DIRTY_PAGES|READONLY|GUEST_MEMFD"
        raise einval(f"flags {flags:#x}: {why}")


def check_region(spaces: list[Memslots], slot: int, flags: int, guest_phys_addr: int,
                 memory_size: int, userspace_addr: int, max_gfn: int,
                 guest_memfd_offset: int = 0, private_mem: bool = False
                 ) -> tuple[MemslotChange | None, Memslot | None, Memslot | None]:
    """Validate one `KVM_SET_USER_MEMORY_REGION2` call: (change, old, new).

    `change` is None for a call that changes nothing (same base, flags, size and hva).
    Raises KvmError exactly where KVM's `kvm_set_memory_region` would, up to the
    guest_memfd binding, which the caller checks next (`GuestMemfd.check_bind`).
    """
    for name, value in (("slot", slot), ("flags", flags), ("guest_phys_addr", guest_phys_addr),
                        ("memory_size", memory_size), ("userspace_addr", userspace_addr),
                        ("guest_memfd_offset", guest_memfd_offset)):
        if value < 0:
            raise einval(f"{name} {value} is negative")
    check_region_flags(flags, private_mem)
    as_id, id = slot >> 16, slot & 0xFFFF
    if id >= KVM_USER_MEM_SLOTS:
        raise einval(f"slot id {id} is not below KVM_USER_MEM_SLOTS ({KVM_USER_MEM_SLOTS})")
    if memory_size % PAGE_SIZE or memory_size >= 1 << 64:
        raise einval(f"memory_size {memory_size:#x} is not page aligned")
    if guest_phys_addr % PAGE_SIZE:
        raise einval(f"guest_phys_addr {guest_phys_addr:#x} is not page aligned")
    if userspace_addr % PAGE_SIZE:
        raise einval(f"userspace_addr {userspace_addr:#x} is not page aligned")
    if userspace_addr + memory_size > TASK_SIZE_MAX:
        raise einval(f"userspace_addr {userspace_addr:#x} + size {memory_size:#x} is not a "
                     "user address range")
    if flags & KVM_MEM_GUEST_MEMFD and (guest_memfd_offset % PAGE_SIZE or
                                        guest_memfd_offset + memory_size >= 1 << 64):
        raise einval(f"guest_memfd_offset {guest_memfd_offset:#x} is not page aligned or "
                     "wraps with memory_size")
    if as_id >= KVM_ADDRESS_SPACE_NUM:
        raise einval(f"address space {as_id} does not exist (x86 has "
                     f"{KVM_ADDRESS_SPACE_NUM})")
    if guest_phys_addr + memory_size >= 1 << 64:
        raise einval("guest_phys_addr + memory_size wraps")
    npages = memory_size >> PAGE_SHIFT
    if npages > KVM_MEM_MAX_NR_PAGES:
        raise einval(f"{npages} pages is more than KVM_MEM_MAX_NR_PAGES")

    slots = spaces[as_id]
    old = slots.by_id.get(id)
    if npages == 0:
        if old is None:
            raise einval(f"slot {as_id}:{id} does not exist, nothing to delete")
        return MemslotChange.DELETE, old, None

    base_gfn = guest_phys_addr >> PAGE_SHIFT
    new = Memslot(as_id, id, base_gfn, npages, userspace_addr, flags)
    if old is None:
        change = MemslotChange.CREATE
    else:
        if flags & KVM_MEM_GUEST_MEMFD:
            raise einval(f"slot {as_id}:{id} exists: a GUEST_MEMFD slot is immutable, it can "
                         "only be deleted")
        if userspace_addr != old.userspace_addr or npages != old.npages or \
                (flags ^ old.flags) & (KVM_MEM_READONLY | KVM_MEM_GUEST_MEMFD):
            raise einval(f"slot {as_id}:{id} exists: its size, userspace_addr, READONLY and "
                         "GUEST_MEMFD cannot change")
        if base_gfn != old.base_gfn:
            change = MemslotChange.MOVE
        elif flags != old.flags:
            change = MemslotChange.FLAGS_ONLY
        else:
            return None, old, old
    if change in (MemslotChange.CREATE, MemslotChange.MOVE):
        clash = slots.overlapping(base_gfn, base_gfn + npages, exclude=id)
        if clash:
            raise KvmError(errno.EEXIST, f"gfns [{base_gfn:#x}, {base_gfn + npages:#x}) "
                           f"overlap slot {as_id}:{clash[0].id}")
        if base_gfn + npages - 1 > max_gfn:
            raise einval(f"last gfn {base_gfn + npages - 1:#x} is above the maximum gfn "
                         f"{max_gfn:#x}")
    return change, old, new


