"""guest_memfd: guest memory no host virtual address maps (`KVM_CREATE_GUEST_MEMFD`).

A `GuestMemfd` is a file of `size` bytes whose pages are host pages reached only through
KVM: a private fault takes the page at the gfn's index (`get_pfn`, KVM's
`kvm_gmem_get_pfn`), allocated and zeroed on first use. A range of the file is bound to
one memslot (KVM_MEM_GUEST_MEMFD, `bind`); the bindings of a file never overlap, and a
bound slot is immutable until it is deleted (`unbind`).

The invariant a hole keeps (`fallocate` with PUNCH_HOLE, `kvm_gmem_punch_hole`): before a
page of the file is freed, no SPTE maps it and no TLB holds it, and a fault that looked it
up before retries. The hole invalidates the gfns of every slot bound to the range
(`kvm_gmem_invalidate_begin`: zap, flush, `mmu_invalidate_in_progress`), frees the pages,
and ends the invalidation (`mmu_invalidate_seq` moves). `invalidate_lock` (the mapping's
`invalidate_lock`) keeps the bindings still across the three steps.

`GuestMemfds` is the VM's file table, numbered as a fresh process's: 0-2 are the standard
streams (open files that are no guest_memfd), guest_memfds count from 3 and are never
reused within the VM.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .clock import Mutex
from .errors import KvmError, MemoryFault, einval
from .host_region import keys_in
from .mmu_internal import RET_PF_RETRY, PageFault, RetPf
from .types import PAGE_SHIFT, PAGE_SIZE, PG_LEVEL_4K

if TYPE_CHECKING:
    from .memslots import Memslot
    from .vm import Vm

__all__ = ["GuestMemfd", "GuestMemfds", "GuestMemfdInfo", "FALLOC_FL_KEEP_SIZE",
           "FALLOC_FL_PUNCH_HOLE", "GUEST_MEMFD_FLAGS", "KVM_MEMORY_EXIT_FLAG_PRIVATE",
           "faultin_private"]

KVM_MEMORY_EXIT_FLAG_PRIVATE = 1 << 3

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
GUEST_MEMFD_FLAGS = 0           # flags KVM_CREATE_GUEST_MEMFD accepts (no MMAP, INIT_SHARED)
GMEM_FD_LIMIT = 1 << 10         # guest_memfds one VM may hold open
STDIO_FDS = 3                   # fds 0-2: the standard streams


@dataclass(frozen=True)
class GuestMemfdInfo:
    fd: int
    size: int
    flags: int
    pages: int                            # pages allocated (populated) in the file
    bindings: tuple[tuple[int, int, int], ...]   # (slot as_id << 16 | id, offset, size)


class GuestMemfd:
    """One guest_memfd file of one VM."""

    def __init__(self, vm: "Vm", fd: int, size: int, flags: int) -> None:
        self.vm, self.fd, self.size, self.flags = vm, fd, size, flags
        self.pages: dict[int, int] = {}            # index -> pfn of an allocated page
        # [start, end) page indices -> the slot bound there (immutable: its gfns stay).
        self.bindings: dict[tuple[int, int], "Memslot"] = {}
        self.invalidate_lock = Mutex(vm.clock)

    def info(self) -> GuestMemfdInfo:
        return GuestMemfdInfo(self.fd, self.size, self.flags, len(self.pages), tuple(
            (slot.as_id << 16 | slot.id, start << PAGE_SHIFT, (end - start) << PAGE_SHIFT)
            for (start, end), slot in sorted(self.bindings.items())))

    # -- bindings (slots_lock held: memslot updates) ------------------------------------

    def check_bind(self, offset: int, npages: int) -> None:
        """`kvm_gmem_bind`'s checks: EINVAL for an offset that is not page aligned, a
        range past the file's end, or one that overlaps a bound range."""
        if offset % PAGE_SIZE or offset + (npages << PAGE_SHIFT) > self.size:
            raise einval(f"guest_memfd_offset {offset:#x} + {npages << PAGE_SHIFT:#x} bytes "
                         f"is not page aligned or passes the end of guest_memfd {self.fd} "
                         f"({self.size:#x} bytes)")
        start, end = offset >> PAGE_SHIFT, (offset >> PAGE_SHIFT) + npages
        for (s, e), slot in self.bindings.items():
            if s < end and start < e:
                raise einval(f"pages [{start:#x}, {end:#x}) of guest_memfd {self.fd} "
                             f"overlap the range bound to slot {slot.as_id}:{slot.id}")

    async def bind(self, slot: "Memslot") -> None:
        async with self.invalidate_lock:
            start = slot.gmem_pgoff
            self.bindings[start, start + slot.npages] = slot

    async def unbind(self, slot: "Memslot") -> None:
        async with self.invalidate_lock:
            del self.bindings[slot.gmem_pgoff, slot.gmem_pgoff + slot.npages]

    # -- the fault's lookup -------------------------------------------------------------

    def get_pfn(self, slot: "Memslot", gfn: int) -> int:
        """`kvm_gmem_get_pfn`: the page at gfn's index, allocated (zeroed) if absent. A
        limit on populated memory refuses the allocation with ENOMEM."""
        index = gfn - slot.base_gfn + slot.gmem_pgoff
        pfn = self.pages.get(index)
        if pfn is None:
            pfn = self.pages[index] = self.vm.host.pfns.alloc(PG_LEVEL_4K)
        return pfn

    def current_pfn(self, slot: "Memslot", gfn: int) -> int | None:
        """The page at gfn's index now, None if none is allocated (the sanitizers' truth)."""
        return self.pages.get(gfn - slot.base_gfn + slot.gmem_pgoff)

    # -- fallocate ----------------------------------------------------------------------

    async def fallocate(self, mode: int, offset: int, length: int) -> None:
        """`kvm_gmem_fallocate`: KEEP_SIZE is required; with PUNCH_HOLE the range's pages
        go (invalidated first), else they are allocated."""
        if offset < 0 or length <= 0:
            raise einval(f"offset {offset} or length {length} is not positive")
        if not mode & FALLOC_FL_KEEP_SIZE or mode & ~(FALLOC_FL_KEEP_SIZE |
                                                       FALLOC_FL_PUNCH_HOLE):
            raise KvmError(errno.EOPNOTSUPP, f"mode {mode:#x}: a guest_memfd takes "
                           "KEEP_SIZE (1), with or without PUNCH_HOLE (2)")
        if offset % PAGE_SIZE or length % PAGE_SIZE:
            raise einval(f"offset {offset:#x} or length {length:#x} is not page aligned")
        start, end = offset >> PAGE_SHIFT, (offset + length) >> PAGE_SHIFT
        if mode & FALLOC_FL_PUNCH_HOLE:
            await self.punch_hole(start, end)
            return
        if offset + length > self.size:
            raise einval(f"[{offset:#x}, {offset + length:#x}) passes the end of "
                         f"guest_memfd {self.fd} ({self.size:#x} bytes)")
        pfns = self.vm.host.pfns
        if pfns.charge is not None:     # refused before any page is allocated
            pfns.charge.check((end - start - len(keys_in(self.pages, start, end)))
                              << PAGE_SHIFT)
        for index in range(start, end):
            if index not in self.pages:
                self.pages[index] = pfns.alloc(PG_LEVEL_4K)

    async def punch_hole(self, start: int, end: int) -> None:
        """`kvm_gmem_punch_hole` of page indices [start, end)."""
        vm = self.vm
        async with self.invalidate_lock:
            hits = self._gfn_ranges(start, end)
            if vm.tracer.on:
                vm.tracer.emit("kvm_gmem_invalidate", fd=self.fd, start=start, end=end)
            if hits:
                await vm.notifier.invalidate_gfns_begin(hits)
            await vm.sched.point("gmem.truncate")
            for index in keys_in(self.pages, start, end):
                vm.host.put(self.pages.pop(index), PG_LEVEL_4K)
            if hits:
                await vm.notifier.invalidate_gfns_end(hits)

    def _gfn_ranges(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """The (as_id, gfn start, gfn end) that page indices [start, end) back."""
        return [(slot.as_id, slot.base_gfn + max(s, start) - s, slot.base_gfn + min(e, end) - s)
                for (s, e), slot in sorted(self.bindings.items()) if s < end and start < e]

    def release(self) -> None:
        """The VM is gone: free every page (no mapping of them is left)."""
        for pfn in self.pages.values():
            self.vm.host.put(pfn, PG_LEVEL_4K)
        self.pages.clear()


def faultin_private(vm: "Vm", fault: PageFault, slot: "Memslot | None") -> RetPf | None:
    """The private part of `kvm_mmu_faultin_pfn`, after the sequence snapshot: a fault whose
    private/shared view no longer matches the gfn's attribute, or a private fault the slot
    cannot serve (no slot: a private access cannot be emulated; no guest_memfd), ends
    KVM_RUN with a memory-fault exit (`kvm_mmu_prepare_memory_fault_exit`). A private fault
    takes its pfn from the slot's guest_memfd (`kvm_mmu_faultin_pfn_private`) and maps 4K
    (the file's pages are order 0). Returns RET_PF_RETRY, or None to go on."""
    gfn = fault.gfn
    private = fault.is_private
    if private != vm.mem_attributes.is_private(gfn):
        raise _memory_fault(fault, f"the access is {'private' if private else 'shared'} "
                            f"but gfn {gfn:#x} has become "
                            f"{'shared' if private else 'private'}")
    if not private:
        return None
    if slot is None or slot.gmem is None:
        where = "no memslot holds it" if slot is None else "its memslot has no guest_memfd"
        raise _memory_fault(fault, f"gfn {gfn:#x} is private but {where}")
    if slot.invalid:
        return RET_PF_RETRY
    fault.slot = slot
    if "skip_invalidate_retry" not in vm.knobs and \
            vm.notifier.retry_gfn_unsafe(fault.mmu_seq, gfn):
        return RET_PF_RETRY
    fault.pfn = slot.gmem.get_pfn(slot, gfn)
    fault.max_level = fault.host_level = PG_LEVEL_4K
    fault.map_writable = True                   # a GUEST_MEMFD slot is never READONLY
    return None


def _memory_fault(fault: PageFault, why: str) -> MemoryFault:
    flags = KVM_MEMORY_EXIT_FLAG_PRIVATE if fault.is_private else 0
    return MemoryFault(fault.gfn << PAGE_SHIFT, PAGE_SIZE, flags, why)


class GuestMemfds:
    """The guest_memfds of one VM, by fd."""

    def __init__(self, vm: "Vm") -> None:
        self.vm = vm
        self._files: dict[int, GuestMemfd] = {}
        self._next_fd = STDIO_FDS

    def create(self, size: int, flags: int) -> GuestMemfd:
        """`kvm_gmem_create`: EINVAL for unknown flags or a size that is not a positive
        multiple of the page size."""
        vm = self.vm
        if not vm.has_private_mem:
            raise einval("guest_memfd needs private memory, which needs the TDP MMU "
                         "(KVM supports KVM_X86_SW_PROTECTED_VM only with tdp_mmu); "
                         "this VM has VmConfig.mmu 'legacy'")
        if flags & ~GUEST_MEMFD_FLAGS:
            raise einval(f"flags {flags:#x}: KVM_CREATE_GUEST_MEMFD accepts none here")
        if size <= 0 or size % PAGE_SIZE or size >= 1 << 63:
            raise einval(f"size {size:#x} is not a positive multiple of {PAGE_SIZE:#x}")
        if len(self._files) >= GMEM_FD_LIMIT:
            raise KvmError(errno.EMFILE, f"VM {vm.id} holds {GMEM_FD_LIMIT} guest_memfds "
                           "already")
        gmem = self._files[self._next_fd] = GuestMemfd(vm, self._next_fd, size, flags)
        self._next_fd += 1
        return gmem

    def get(self, fd: int) -> GuestMemfd:
        """The guest_memfd `fd`: EINVAL for a standard stream (an open file that is no
        guest_memfd, as KVM answers for one), EBADF for an fd nothing has opened."""
        gmem = self._files.get(fd)
        if gmem is None:
            if 0 <= fd < STDIO_FDS:
                raise einval(f"fd {fd} is a standard stream, not a guest_memfd")
            raise KvmError(errno.EBADF, f"fd {fd} is not open in VM {self.vm.id}")
        return gmem

    def infos(self) -> list[GuestMemfdInfo]:
        return [gmem.info() for gmem in self._files.values()]

    def release(self) -> None:
        for gmem in self._files.values():
            gmem.release()
