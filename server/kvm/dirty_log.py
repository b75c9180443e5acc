"""Dirty logging: turning it on and off for a memslot, and harvesting what it recorded.

vmmu models the write-protection flavour (reference §7, without PML): while a slot logs,
every SPTE of it is 4K and a writable one exists only for a page recorded as dirty, by its
bit in the slot's `dirty_bitmap` or by an entry in the dirty ring of the vCPU that made it
writable (`Vm.mark_page_dirty`, called where a writable SPTE is created and where the fast
page fault sets W). Harvesting clears the record and write-protects the page again, so the
next write faults and records it anew.

Invariant (the sanitizers' `no-lost-dirty-page`): a page the guest can write without a
fault is recorded. Whatever clears a record write-protects the page and flushes TLBs
before userspace hears of it: GET_DIRTY_LOG and CLEAR_DIRTY_LOG clear and protect under
mmu_lock held for write and flush after dropping it, before they return; a dirty ring
reset recycles its entries only after the pages are protected and TLBs flushed.

    enable   (FLAGS_ONLY, logging on)   split huge leaves (eagerly, or on the next write
             fault), clear W on every leaf, flush; nothing with manual protect and
             INITIALLY_SET, whose bitmap starts all ones
    GET      get-and-clear: snapshot and clear each bitmap word, protect, flush;
             with manual protect: a copy, nothing else
    CLEAR    clear the given bits, protect the pages they stood for, flush
    RESET    recycle harvested ring entries, protecting their pages in batches
    disable  (FLAGS_ONLY, logging off)  rebuild huge leaves where the host allows

Every entry point runs under `slots_lock`, as KVM's ioctls do, so none overlaps a memslot
update or another harvest.
"""

from __future__ import annotations

import errno
import sys
from array import array
from typing import TYPE_CHECKING

import numpy as np

from .dirty_ring import DirtyGfn, coalesce
from .errors import KvmError, einval
from .memslots import (KVM_ADDRESS_SPACE_NUM, KVM_MEM_LOG_DIRTY_PAGES, KVM_USER_MEM_SLOTS,
                       Memslot, MemslotChange)
from .tdp_bulk import bits_to_pages
from .types import PG_LEVEL_2M, PG_LEVEL_4K

if TYPE_CHECKING:
    from .vcpu import Vcpu
    from .vm import Vm

__all__ = ["KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE", "KVM_DIRTY_LOG_INITIALLY_SET",
           "KVM_DIRTY_LOG_MANUAL_CAPS", "DirtyBitmap", "BYTE_IN_WORD", "check_manual_protect",
           "prepare_memslot", "commit_memslot", "get_dirty_log", "clear_dirty_log",
           "harvest_dirty_ring", "reset_dirty_rings", "enable_log_dirty_pt_masked"]

KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1
KVM_DIRTY_LOG_MANUAL_CAPS = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET

_ALL_ONES = (1 << 64) - 1

# Which byte of a bitmap word holds its bits 8k..8k+7: byte k of the word's memory on a
# little-endian host, byte 7 - k on a big-endian one (index ^ 7).
BYTE_IN_WORD = 0 if sys.byteorder == "little" else 7


class DirtyBitmap(array):
    """A slot's dirty bitmap: 64-bit words, bit i of word j for page 64j + i, which GET and
    CLEAR snapshot and clear a word at a time; `bytes` is a byte-wide view of the same
    memory, where `Vm.mark_page_dirty` sets one page's bit on every fault that makes a page
    writable: a byte is a small int, where a full word makes big-int temporaries.
    Page p is bit p % 8 of `bytes[p // 8 ^ BYTE_IN_WORD]`."""

    __slots__ = ("bytes",)

    def __new__(cls, words: array) -> "DirtyBitmap":
        self = super().__new__(cls, "Q", words)
        self.bytes = memoryview(self).cast("B")     # the view pins the size: never resized
        return self


def check_manual_protect(value: int) -> None:
    """KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2's argument: INITIALLY_SET only with ENABLE."""
    allowed = KVM_DIRTY_LOG_MANUAL_CAPS if value & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE \
        else KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
    if value < 0 or value & ~allowed:
        raise einval(f"manual_dirty_log_protect {value:#x} is not a valid set of "
                     "KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE (1) and KVM_DIRTY_LOG_INITIALLY_SET "
                     "(2, only with ENABLE)")


def _manual_protect(vm: "Vm") -> bool:
    return bool(vm.manual_dirty_log_protect & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)


def _initially_set(vm: "Vm") -> bool:
    """`kvm_dirty_log_manual_protect_and_init_set`."""
    return vm.manual_dirty_log_protect == KVM_DIRTY_LOG_MANUAL_CAPS


def _use_bitmap(vm: "Vm") -> bool:
    """`kvm_use_dirty_bitmap`: no dirty ring, or a ring with a bitmap beside it."""
    return not vm.dirty_ring_size or vm.dirty_ring_with_bitmap


def _flush(vm: "Vm") -> None:
    """The flush that ends a write-protection for dirty logging
    (`kvm_flush_remote_tlbs_memslot`); the `skip_wrprot_flush` knob leaves it out."""
    if "skip_wrprot_flush" not in vm.knobs:
        vm.flush_remote_tlbs()


# -- memslot updates ----------------------------------------------------------------------

def prepare_memslot(vm: "Vm", old: Memslot | None, new: Memslot | None) -> None:
    """`kvm_prepare_memory_region`'s part: a logging slot keeps the bitmap it had (MOVE,
    FLAGS_ONLY), or gets a new one, all ones with manual protect and INITIALLY_SET."""
    if new is None or not new.dirty_logging:
        return
    if old is not None and old.dirty_bitmap is not None:
        new.dirty_bitmap = old.dirty_bitmap
    elif _use_bitmap(vm):
        words = (new.npages + 63) // 64
        if _initially_set(vm):
            bitmap = DirtyBitmap(array("Q", [_ALL_ONES]) * words)
            if new.npages % 64:
                bitmap[-1] = (1 << new.npages % 64) - 1
        else:
            bitmap = DirtyBitmap(array("Q", bytes(8 * words)))
        new.dirty_bitmap = bitmap


async def commit_memslot(vm: "Vm", change: MemslotChange, old: Memslot | None,
                         new: Memslot | None) -> None:
    """After `new` is published: `kvm_mmu_slot_apply_flags` for a FLAGS_ONLY change of
    KVM_MEM_LOG_DIRTY_PAGES (slots_lock held), and the sanitizers' watch of the slot."""
    slot = new or old
    key = slot.as_id << 16 | slot.id
    sanitizers = vm.sanitizers
    if change is not MemslotChange.FLAGS_ONLY or new.readonly or \
            not (old.flags ^ new.flags) & KVM_MEM_LOG_DIRTY_PAGES:
        # A slot that keeps logging through a MOVE keeps its bitmap, and its pages fault
        # again: the writes it was watched for are still to be harvested.
        keeps = change is MemslotChange.MOVE and old.dirty_logging and new.dirty_logging
        if sanitizers is not None and not keeps:
            sanitizers.dirty_log_watch(key, new is not None and new.dirty_logging)
        return
    # synchronize_srcu_expedited: a fault that looked `old` up (and may map huge, or
    # writable without marking the page) finishes before the slot is protected.
    await vm.rcu.synchronize()
    if not new.dirty_logging:
        if sanitizers is not None:
            sanitizers.dirty_log_watch(key, False)
        if vm.shadow is not None:
            async with vm.mmu_lock.write:
                await vm.shadow.recover_huge_pages(new, vm.host.host_mapping_level)
            return
        async with vm.mmu_lock.read:
            await vm.tdp.recover_huge_pages(new, vm.host.host_mapping_level)
        return
    if not _initially_set(vm) and vm.shadow is not None:
        # The legacy MMU splits nothing eagerly (KVM: TDP MMU only): its huge leaves lose
        # W too, and a write to one maps 4K in its place.
        async with vm.mmu_lock.write:
            await vm.shadow.slot_remove_write_access(new, PG_LEVEL_4K)
        _flush(vm)
    elif not _initially_set(vm):
        if vm.config.eager_page_split:
            async with vm.mmu_lock.read:
                await vm.tdp.try_split_huge_pages(new, new.base_gfn, new.end_gfn,
                                                  PG_LEVEL_4K)
        async with vm.mmu_lock.read:
            await vm.tdp.wrprot_slot(new, PG_LEVEL_4K)
        _flush(vm)       # unconditionally, as KVM: W may have been cleared on a stale path
    if sanitizers is not None:
        sanitizers.dirty_log_watch(key, True)


# -- re-protection ------------------------------------------------------------------------

def enable_log_dirty_pt_masked(vm: "Vm", slot: Memslot, offset: int, mask: int) -> None:
    """`kvm_arch_mmu_enable_log_dirty_pt_masked` (mmu_lock held for write): write-protect
    the pages `offset + i` of the slot for each bit i of `mask`, to record their next write.

    With INITIALLY_SET the slot's huge leaves were never split: the ones holding the first
    and the last page are split now (eager splitting) and write-protected, W and
    MMU-writable, so that the next write to them takes the slow path, which maps 4K."""
    if _initially_set(vm):
        _protect_huge(vm, slot, offset, mask)
    vm.mmu.clear_dirty_pt_masked(slot, slot.base_gfn + offset, mask)


def _protect_huge(vm: "Vm", slot: Memslot, offset: int, mask: int) -> None:
    """`enable_log_dirty_pt_masked`'s part for INITIALLY_SET: the huge leaves."""
    mmu = vm.mmu            # the TDP MMU, or the legacy one through its rmaps
    first = slot.base_gfn + offset + (mask & -mask).bit_length() - 1
    last = slot.base_gfn + offset + mask.bit_length() - 1
    if vm.config.eager_page_split and vm.shadow is None:
        mmu.split_huge_pages_locked(slot, first, last + 1, PG_LEVEL_4K)
    mmu.write_protect_gfn(slot, first, PG_LEVEL_2M)
    if first >> 9 != last >> 9:
        mmu.write_protect_gfn(slot, last, PG_LEVEL_2M)


def _protect_dirty(vm: "Vm", slot: Memslot, offset: int, words: np.ndarray) -> None:
    """`enable_log_dirty_pt_masked` for each word of a bitmap (mmu_lock held for write):
    bit i of word j stands for page `offset + 64 * j + i` of the slot. In bulk (over the
    TDP MMU's tables, or the legacy MMU's rmaps) unless tracing wants an event per SPTE;
    the same SPTEs either way."""
    nonzero = np.flatnonzero(words).tolist()
    if not vm.mmu.bulk:
        for j in nonzero:
            enable_log_dirty_pt_masked(vm, slot, offset + 64 * j, int(words[j]))
        return
    if _initially_set(vm):
        for j in nonzero:
            _protect_huge(vm, slot, offset + 64 * j, int(words[j]))
    vm.mmu.clear_dirty_pages(slot, slot.base_gfn + offset, bits_to_pages(words))


# -- KVM_GET_DIRTY_LOG, KVM_CLEAR_DIRTY_LOG -------------------------------------------------

def _check_log_slot(vm: "Vm", slot: int) -> None:
    """The checks KVM makes before it looks the slot up: ENXIO, then EINVAL."""
    if not _use_bitmap(vm):
        raise KvmError(errno.ENXIO, "the VM logs dirty pages in dirty rings only: it has no "
                       "dirty bitmap")
    if not 0 <= slot < 1 << 32:
        raise einval(f"slot {slot} is not a u32")
    if slot >> 16 >= KVM_ADDRESS_SPACE_NUM or slot & 0xFFFF >= KVM_USER_MEM_SLOTS:
        raise einval(f"slot {slot >> 16}:{slot & 0xFFFF} is not a user memslot")


def _logged_memslot(vm: "Vm", slot: int) -> Memslot:
    """The slot, which must exist and have a dirty bitmap (slots_lock held)."""
    memslot = vm.memslot_sets[slot >> 16].by_id.get(slot & 0xFFFF)
    if memslot is None:
        raise KvmError(errno.ENOENT, f"slot {slot >> 16}:{slot & 0xFFFF} does not exist")
    if memslot.dirty_bitmap is None:
        raise KvmError(errno.ENOENT, f"slot {slot >> 16}:{slot & 0xFFFF} does not log dirty "
                       "pages")
    return memslot


async def get_dirty_log(vm: "Vm", slot: int) -> bytes:
    """KVM_GET_DIRTY_LOG: the slot's bitmap, one bit per page, least significant bit
    first, 8 * ceil(npages / 64) bytes. Without manual protect the reported bits are
    cleared and their pages write-protected, and TLBs are flushed before it returns."""
    _check_log_slot(vm, slot)
    async with vm.slots_lock:
        memslot = _logged_memslot(vm, slot)
        bitmap = memslot.dirty_bitmap
        # Before the harvest: bits cleared for an answer that cannot be sent would be lost.
        vm.limits.check_response(8 * len(bitmap), f"the dirty log of slot {slot}")
        if _manual_protect(vm):
            if vm.sanitizers is not None:
                vm.sanitizers.check_dirty_recorded(slot)
            return _le_bytes(bitmap)
        async with vm.mmu_lock.write:
            if vm.sanitizers is not None:
                vm.sanitizers.check_dirty_recorded(slot)
            words = np.frombuffer(bitmap, dtype=np.uint64)
            snapshot = words.copy()
            dirty = bool(snapshot.any())
            if dirty:
                words.fill(0)
                _protect_dirty(vm, memslot, 0, snapshot)
        # As KVM, the flush comes after mmu_lock is dropped: a write through a stale TLB
        # entry until then is to a page this call reports, copied after it returns.
        if dirty:
            _flush(vm)
        if vm.sanitizers is not None:
            vm.sanitizers.dirty_pages_harvested(slot, _offsets(snapshot, 0))
    return _le_bytes(snapshot)


async def clear_dirty_log(vm: "Vm", slot: int, first_page: int, num_pages: int,
                          bitmap: bytes) -> int:
    """KVM_CLEAR_DIRTY_LOG: clear the bits of `bitmap` (bit i: page first_page + i) in
    the slot's bitmap, write-protect the pages whose bit was set, flush. `bitmap` holds
    ceil(num_pages / 8) bytes, up to whole 64-bit words. Returns the pages cleared."""
    _check_log_slot(vm, slot)
    if not 0 <= first_page < 1 << 64 or not 0 <= num_pages < 1 << 32:
        raise einval(f"first_page {first_page} or num_pages {num_pages} is out of range")
    if first_page % 64:
        raise einval(f"first_page {first_page} is not a multiple of 64")
    async with vm.slots_lock:
        memslot = _logged_memslot(vm, slot)
        npages = memslot.npages
        if first_page > npages or num_pages > npages - first_page:
            raise einval(f"pages [{first_page}, {first_page + num_pages}) are not in the "
                         f"slot's {npages}")
        if num_pages < npages - first_page and num_pages % 64:
            raise einval(f"num_pages {num_pages} is not a multiple of 64 and does not reach "
                         "the end of the slot")
        words = _user_words(bitmap, num_pages)
        base = first_page // 64
        dirty = np.frombuffer(memslot.dirty_bitmap, dtype=np.uint64)[base:base + len(words)]
        async with vm.mmu_lock.write:
            if vm.sanitizers is not None:
                vm.sanitizers.check_dirty_recorded(slot)
            masks = words & dirty
            cleared = int(np.bitwise_count(masks).sum())
            if cleared:
                np.bitwise_and(dirty, ~masks, out=dirty)
                _protect_dirty(vm, memslot, first_page, masks)
        if cleared:
            _flush(vm)                    # after dropping mmu_lock, as GET_DIRTY_LOG
        if vm.sanitizers is not None:
            vm.sanitizers.dirty_pages_harvested(slot, _offsets(words, first_page))
    return cleared


def _user_words(bitmap: bytes, num_pages: int) -> np.ndarray:
    """The caller's bitmap as 64-bit words (what KVM copies from userspace)."""
    words = (num_pages + 63) // 64
    if not (num_pages + 7) // 8 <= len(bitmap) <= 8 * words:
        raise einval(f"the bitmap of {num_pages} pages takes {(num_pages + 7) // 8} to "
                     f"{8 * words} bytes, not {len(bitmap)}")
    raw = np.frombuffer(bytes(bitmap).ljust(8 * words, b"\0"), dtype="<u8")
    return raw.astype(np.uint64)


def _le_bytes(words: np.ndarray | array) -> bytes:
    return np.asarray(words, dtype=np.uint64).astype("<u8", copy=False).tobytes()


def _offsets(words: np.ndarray, first: int) -> list[int]:
    """The page offsets whose bits are set, bit i of word j standing for first + 64j + i."""
    return (np.flatnonzero(bits_to_pages(words)) + first).tolist()


# -- dirty rings ----------------------------------------------------------------------------

def harvest_dirty_ring(vm: "Vm", vcpu: "Vcpu") -> list[DirtyGfn]:
    """What userspace collects from the vCPU's ring: the entries published since its
    last harvest, now flagged for the next reset."""
    if not vm.dirty_ring_size:
        raise einval(f"VM {vm.id} has no dirty ring")
    if vm.sanitizers is not None:
        vm.sanitizers.check_dirty_recorded()
    return vcpu.dirty_ring.harvest()


async def reset_dirty_rings(vm: "Vm") -> int:
    """KVM_RESET_DIRTY_RINGS: recycle every harvested entry of every vCPU's ring,
    write-protecting the pages again in batches of one slot and 64 pages (mmu_lock held
    for write for each), then flush. Returns the entries recycled."""
    if not vm.dirty_ring_size:
        raise einval(f"VM {vm.id} has no dirty ring")
    async with vm.slots_lock:
        if vm.sanitizers is not None:
            vm.sanitizers.check_dirty_recorded()
        # The entries stay in the rings until their pages are protected and TLBs flushed:
        # until then a write through a stale TLB entry is still covered by them.
        work = [(vcpu, vcpu.dirty_ring.harvested()) for vcpu in vm.vcpus()]
        if vm.mmu.bulk and not _initially_set(vm):
            await _reset_dirty_slots(vm, [batch for _, entries in work
                                          for batch in coalesce(entries)])
        else:
            for _, entries in work:
                for slot, offset, mask in coalesce(entries):
                    await _reset_dirty_gfn(vm, slot, offset, mask)
        count = sum(len(entries) for _, entries in work)
        if count:
            _flush(vm)
        for vcpu, entries in work:
            vcpu.dirty_ring.recycle(len(entries))
            if vm.tracer.on:
                vm.tracer.emit("kvm_dirty_ring_reset", vcpu=vcpu.id, count=len(entries))
            if vm.sanitizers is not None:
                for entry in entries:
                    vm.sanitizers.dirty_pages_harvested(entry.slot, (entry.offset,))
    return count


def _reset_memslot(vm: "Vm", slot: int, offset: int, mask: int) -> Memslot | None:
    """The memslot of a batch to protect again; None for a slot gone or shrunk."""
    as_id, slot_id = slot >> 16, slot & 0xFFFF
    if as_id >= KVM_ADDRESS_SPACE_NUM or slot_id >= KVM_USER_MEM_SLOTS:
        return None
    memslot = vm.memslot_sets[as_id].by_id.get(slot_id)
    if memslot is None or offset + mask.bit_length() > memslot.npages:
        return None
    return memslot


async def _reset_dirty_gfn(vm: "Vm", slot: int, offset: int, mask: int) -> None:
    """Write-protect one batch again (mmu_lock held for write for it)."""
    memslot = _reset_memslot(vm, slot, offset, mask)
    if memslot is not None:
        async with vm.mmu_lock.write:
            enable_log_dirty_pt_masked(vm, memslot, offset, mask)


async def _reset_dirty_slots(vm: "Vm", batches: list[tuple[int, int, int]]) -> None:
    """The batches' pages write-protected again in bulk: one pass over the tables per
    slot, mmu_lock held for write for it."""
    pages: dict[int, tuple[Memslot, np.ndarray]] = {}
    for slot, offset, mask in batches:
        memslot = _reset_memslot(vm, slot, offset, mask)
        if memslot is None:
            continue
        _, dirty = pages.setdefault(slot, (memslot, np.zeros(memslot.npages, np.bool_)))
        n = mask.bit_length()
        dirty[offset:offset + n] |= bits_to_pages(np.array([mask], np.uint64))[:n]
    for memslot, dirty in pages.values():
        async with vm.mmu_lock.write:
            vm.mmu.clear_dirty_pages(memslot, memslot.base_gfn, dirty)
