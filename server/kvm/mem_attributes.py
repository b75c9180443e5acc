"""Memory attributes: which gfns are private (`KVM_SET_MEMORY_ATTRIBUTES`).

`kvm->mem_attr_array` of KVM, for its one x86 attribute, KVM_MEMORY_ATTRIBUTE_PRIVATE: the
private gfns, kept as sorted disjoint [start, end) ranges (a change adds at most one range,
so the store grows with the calls, never with the gfns they name).

The invariant a change keeps (`set_memory_attributes`, KVM's `kvm_vm_set_mem_attributes`):
between the moment a gfn's attribute changes and the moment a fault sees the new value, no
SPTE maps it. The change zaps the memslots' SPTEs of the range and holds
`mmu_invalidate_in_progress` over it (`kvm_mmu_invalidate_begin`) before the new
attributes are stored, and moves `mmu_invalidate_seq` (`_end`) after: a fault that decided
private or shared before the store retries (`is_page_fault_stale`), or, if it reads the
attribute after its sequence snapshot and finds it changed, exits with
KVM_EXIT_MEMORY_FAULT (mmu.py).

Private memory is the TDP MMU's only (KVM supports KVM_X86_SW_PROTECTED_VM only with
`tdp_mmu`): on a legacy-MMU VM no attribute is supported and every change is EINVAL.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

from .errors import einval
from .types import PAGE_SHIFT, PAGE_SIZE, pages_per_level

if TYPE_CHECKING:
    from .vm import Vm

__all__ = ["KVM_MEMORY_ATTRIBUTE_PRIVATE", "MemoryAttributes", "set_memory_attributes",
           "supported_attributes"]

KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3


def supported_attributes(vm: "Vm") -> int:
    """`kvm_supported_mem_attributes`: PRIVATE on a VM that can have private memory."""
    return KVM_MEMORY_ATTRIBUTE_PRIVATE if vm.has_private_mem else 0


class MemoryAttributes:
    """The private gfns of one VM, as sorted disjoint ranges."""

    __slots__ = ("starts", "ends")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def __bool__(self) -> bool:
        """Is any gfn private? (False on every VM that never used the attribute.)"""
        return bool(self.starts)

    def is_private(self, gfn: int) -> bool:
        """`kvm_mem_is_private`."""
        i = bisect.bisect_right(self.starts, gfn) - 1
        return i >= 0 and gfn < self.ends[i]

    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self.starts, self.ends))

    def range_has(self, start: int, end: int, private: bool) -> bool:
        """`kvm_range_has_memory_attributes`: do all gfns of [start, end) have it?"""
        i = bisect.bisect_right(self.starts, start) - 1
        covered = i >= 0 and self.ends[i] >= end
        if private:
            return covered
        j = bisect.bisect_left(self.starts, end)    # ranges starting before end
        return j == 0 or self.ends[j - 1] <= start

    def max_mapping_level(self, gfn: int, level: int) -> int:
        """The largest level up to `level` whose frame around gfn has one attribute for
        all its gfns (`hugepage_has_attrs`, the KVM_LPAGE_MIXED_FLAG of lpage_info)."""
        private = self.is_private(gfn)
        while level > 1:
            pages = pages_per_level(level)
            start = gfn & ~(pages - 1)
            if self.range_has(start, start + pages, private):
                break
            level -= 1
        return level

    def store(self, start: int, end: int, private: bool) -> None:
        """Make [start, end) private or shared."""
        lo = bisect.bisect_left(self.ends, start)      # first range ending at/after start
        hi = bisect.bisect_right(self.starts, end)     # ranges starting at/before end
        starts, ends = self.starts[lo:hi], self.ends[lo:hi]
        pieces_s: list[int] = []
        pieces_e: list[int] = []
        if private:
            new_s = min([start] + starts[:1])
            new_e = max([end] + ends[-1:])
            pieces_s, pieces_e = [new_s], [new_e]
        else:
            if starts and starts[0] < start:
                pieces_s.append(starts[0])
                pieces_e.append(start)
            if ends and ends[-1] > end:
                pieces_s.append(end)
                pieces_e.append(ends[-1])
        self.starts[lo:hi] = pieces_s
        self.ends[lo:hi] = pieces_e


def check_attributes(vm: "Vm", address: int, size: int, attributes: int, flags: int
                     ) -> tuple[int, int]:
    """`kvm_vm_ioctl_set_mem_attributes`' checks, in KVM's order: the gfn range."""
    if flags:
        raise einval(f"flags {flags:#x}: KVM_SET_MEMORY_ATTRIBUTES defines none")
    if attributes & ~supported_attributes(vm):
        why = "" if vm.has_private_mem else \
            " (none: private memory needs the TDP MMU, VmConfig.mmu 'tdp')"
        raise einval(f"attributes {attributes:#x} has bits the VM does not support; "
                     f"supported: {supported_attributes(vm):#x}{why}")
    if size == 0 or address + size >= 1 << 64:
        raise einval(f"size {size:#x} is 0, or address {address:#x} + size wraps")
    if address % PAGE_SIZE or size % PAGE_SIZE:
        raise einval(f"address {address:#x} or size {size:#x} is not page aligned")
    return address >> PAGE_SHIFT, (address + size) >> PAGE_SHIFT


async def set_memory_attributes(vm: "Vm", address: int, size: int, attributes: int,
                                flags: int) -> None:
    """KVM_SET_MEMORY_ATTRIBUTES (`kvm_vm_set_mem_attributes`): under slots_lock, nothing
    if the whole range has the attributes already; else invalidate the memslots' gfns of
    the range (begin: zap, flush, in-progress), store, and end the invalidation."""
    start, end = check_attributes(vm, address, size, attributes, flags)
    private = bool(attributes & KVM_MEMORY_ATTRIBUTE_PRIVATE)
    async with vm.slots_lock:
        attrs = vm.mem_attributes
        if attrs.range_has(start, end, private):
            return
        hits = [(slots.as_id, max(start, slot.base_gfn), min(end, slot.end_gfn))
                for slots in vm.memslot_sets for slot in slots.overlapping(start, end)]
        if hits:
            await vm.notifier.invalidate_gfns_begin(hits)
        await vm.sched.point("attributes.store")
        attrs.store(start, end, private)
        if vm.tracer.on:
            vm.tracer.emit("kvm_vm_set_mem_attributes", start=start, end=end,
                           attributes=attributes)
        if hits:
            await vm.notifier.invalidate_gfns_end(hits)
