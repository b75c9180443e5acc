"""The dirty ring of one vCPU (`KVM_CAP_DIRTY_LOG_RING`, reference §7.5).

A ring of `size` entries, each `(slot, offset)` with `slot = as_id << 16 | id`: the vCPU
publishes a page it dirtied at `dirty_index`; userspace harvests entries in order (it reads
an entry and sets its RESET flag; here `harvest` does both) and `KVM_RESET_DIRTY_RINGS`
recycles harvested entries from `reset_index`, write-protecting their pages again.

    reset_index <= fetch_index <= dirty_index <= reset_index + size
    [reset_index, fetch_index)   harvested, waiting for a reset
    [fetch_index, dirty_index)   published, not yet harvested

`fetch_index` is userspace's own cursor (KVM keeps none: userspace remembers where it
stopped). Once `dirty_index - reset_index` reaches the soft limit (`size` minus
`KVM_DIRTY_RING_RSVD_ENTRIES`), the vCPU must not enter the guest until a reset makes room:
KVM_RUN returns `KVM_EXIT_DIRTY_RING_FULL`. The reserved entries absorb what the vCPU
dirties before it sees that; a push into a full ring is a KVM bug (`VmBugged`).
"""

from __future__ import annotations

import errno
from array import array
from dataclasses import dataclass

from .errors import KvmError, VmBugged, einval

__all__ = ["DirtyRing", "DirtyGfn", "check_ring_size", "coalesce",
           "KVM_DIRTY_RING_RSVD_ENTRIES", "KVM_DIRTY_RING_MAX_ENTRIES", "DIRTY_GFN_BYTES"]

KVM_DIRTY_RING_RSVD_ENTRIES = 64       # no PML: kvm_cpu_dirty_log_size() is 0
KVM_DIRTY_RING_MAX_ENTRIES = 65536
DIRTY_GFN_BYTES = 16                   # sizeof(struct kvm_dirty_gfn)
PAGE_SIZE = 4096


@dataclass(frozen=True)
class DirtyGfn:
    """One ring entry: a page of memslot `slot` (`as_id << 16 | id`) at `offset` pages
    from the slot's base gfn."""

    slot: int
    offset: int


def check_ring_size(size: int) -> int:
    """`kvm_vm_ioctl_enable_dirty_log_ring`'s checks on a ring size in bytes, in KVM's
    order; returns the number of entries."""
    if size <= 0 or size & (size - 1):
        raise einval(f"dirty ring size {size} is not a power of two")
    if size < PAGE_SIZE or size < KVM_DIRTY_RING_RSVD_ENTRIES * DIRTY_GFN_BYTES:
        raise einval(f"dirty ring size {size} is below a page and the "
                     f"{KVM_DIRTY_RING_RSVD_ENTRIES} reserved entries")
    if size > KVM_DIRTY_RING_MAX_ENTRIES * DIRTY_GFN_BYTES:
        raise KvmError(errno.E2BIG, f"dirty ring size {size} is above "
                       f"{KVM_DIRTY_RING_MAX_ENTRIES} entries of {DIRTY_GFN_BYTES} bytes")
    return size // DIRTY_GFN_BYTES


class DirtyRing:
    __slots__ = ("size", "soft_limit", "dirty_index", "fetch_index", "reset_index",
                 "_slots", "_offsets")

    def __init__(self, entries: int) -> None:
        self.size = entries
        self.soft_limit = entries - KVM_DIRTY_RING_RSVD_ENTRIES
        self.dirty_index = self.fetch_index = self.reset_index = 0
        self._slots = array("I", bytes(4 * entries))
        self._offsets = array("Q", bytes(8 * entries))

    @property
    def used(self) -> int:
        return self.dirty_index - self.reset_index

    def soft_full(self) -> bool:
        """Must the vCPU stay out of the guest until `KVM_RESET_DIRTY_RINGS`?"""
        return self.dirty_index - self.reset_index >= self.soft_limit

    def push(self, slot: int, offset: int) -> bool:
        """Publish a dirty page; returns whether the ring is now soft-full."""
        if self.dirty_index - self.reset_index >= self.size:
            raise VmBugged(f"dirty ring full ({self.size} entries): the vCPU kept running "
                           "past its soft limit")
        i = self.dirty_index & (self.size - 1)
        self._slots[i], self._offsets[i] = slot, offset
        self.dirty_index += 1
        return self.dirty_index - self.reset_index >= self.soft_limit

    def harvest(self) -> list[DirtyGfn]:
        """Userspace's collection: every entry published since the last harvest, in ring
        order, each now flagged RESET (harvested, waiting for a reset)."""
        entries = self._entries(self.fetch_index, self.dirty_index)
        self.fetch_index = self.dirty_index
        return entries

    def harvested(self) -> list[DirtyGfn]:
        """The entries a reset would recycle now: harvested and not yet reset."""
        return self._entries(self.reset_index, self.fetch_index)

    def outstanding(self) -> list[DirtyGfn]:
        """Every entry published and not yet reset, harvested or not."""
        return self._entries(self.reset_index, self.dirty_index)

    def recycle(self, count: int) -> None:
        """Clear the flags of the oldest `count` harvested entries: their slots are free."""
        if not 0 <= count <= self.fetch_index - self.reset_index:
            raise VmBugged(f"recycling {count} dirty ring entries, but only "
                           f"{self.fetch_index - self.reset_index} are harvested")
        self.reset_index += count

    def _entries(self, start: int, end: int) -> list[DirtyGfn]:
        mask = self.size - 1
        return [DirtyGfn(self._slots[i & mask], self._offsets[i & mask])
                for i in range(start, end)]

    def __repr__(self) -> str:
        return (f"DirtyRing(size={self.size}, reset={self.reset_index}, "
                f"fetch={self.fetch_index}, dirty={self.dirty_index})")


def coalesce(entries: list[DirtyGfn]) -> list[tuple[int, int, int]]:
    """Batches of `(slot, offset, mask)` in which bit i of `mask` stands for page
    `offset + i` of `slot`: consecutive entries of one slot join a batch while they fit
    in a window of 64 pages, which may slide down to take an entry below it (a guest
    that scans memory backwards), as `kvm_dirty_ring_reset` batches its re-protection."""
    batches: list[tuple[int, int, int]] = []
    slot = offset = mask = 0
    for entry in entries:
        if mask and entry.slot == slot:
            delta = entry.offset - offset
            if 0 <= delta < 64:
                mask |= 1 << delta
                continue
            if -64 < delta < 0 and mask.bit_length() - delta <= 64:
                offset, mask = entry.offset, (mask << -delta) | 1
                continue
        if mask:
            batches.append((slot, offset, mask))
        slot, offset, mask = entry.slot, entry.offset, 1
    if mask:
        batches.append((slot, offset, mask))
    return batches
