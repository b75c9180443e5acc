"""`RealVm`: one VM on the host's /dev/kvm with one vCPU that writes guest pages on request.

The VM owns a system slot (id `SYSTEM_SLOT`, GPA 0, never logged) holding the guest of
`guest.py`; callers add data slots with anonymous private mmap backing and ask the vCPU to
write one byte per page (a stride or a list of GPAs). Every guest run ends in an `OUT` to
`DONE_PORT`; any other exit raises `GuestExit`.

Failing ioctls are not translated: they raise the `OSError` from `fcntl.ioctl`, whose
`errno` is what KVM returned, so conformance checks can compare errnos. Only a missing or
unopenable /dev/kvm becomes `KvmUnavailable`.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

from . import abi, guest
from .stats import Stats

__all__ = ["KvmUnavailable", "GuestExit", "Slot", "RealVm", "open_kvm", "PAGE_SIZE"]

PAGE_SIZE = 4096
KVM_PATH = "/dev/kvm"
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long)
_libc.mmap.restype = ctypes.c_void_p
_MAP_FIXED = 0x10


class KvmUnavailable(RuntimeError):
    """/dev/kvm is missing, cannot be opened, or speaks another API version."""


class GuestExit(RuntimeError):
    """KVM_RUN returned with an exit other than the guest's `OUT DONE_PORT`."""

    def __init__(self, reason: int, rip: int, detail: str = "") -> None:
        super().__init__(f"unexpected exit {abi.ExitReason.name(reason)} at rip {rip:#x}"
                         + (f" ({detail})" if detail else ""))
        self.reason = reason
        self.rip = rip


@dataclass(frozen=True)
class Slot:
    id: int
    gpa: int
    size: int
    flags: int
    hva: int

    @property
    def npages(self) -> int:
        return self.size // PAGE_SIZE

    @property
    def bitmap_bytes(self) -> int:
        """Bytes KVM copies for this slot's dirty bitmap: npages rounded up to 64 bits."""
        return (self.npages + 63) // 64 * 8


def open_kvm() -> int:
    try:
        fd = os.open(KVM_PATH, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise KvmUnavailable(f"cannot open {KVM_PATH}: {e.strerror} ({e.errno})") from e
    version = fcntl.ioctl(fd, abi.KVM_GET_API_VERSION)
    if version != 12:
        os.close(fd)
        raise KvmUnavailable(f"{KVM_PATH} speaks KVM API {version}, not 12")
    return fd


def _address_of(mem: mmap.mmap) -> int:
    # The ctypes view is dropped at once, so the mmap keeps no export and can be closed.
    return ctypes.addressof(ctypes.c_char.from_buffer(mem))


class RealVm:
    """A KVM VM with one 64-bit CPL-3 vCPU; use as a context manager (`close` frees all)."""

    SYSTEM_SLOT = 0

    def __init__(self) -> None:
        self._kvm = open_kvm()
        self._fd = -1
        self._vcpu = -1
        self._slots: dict[int, tuple[Slot, mmap.mmap]] = {}
        self._run_page: mmap.mmap | None = None
        self._run: abi.Run | None = None
        self._vcpu_stats: Stats | None = None
        try:
            self._fd = fcntl.ioctl(self._kvm, abi.KVM_CREATE_VM, 0)
            system = self.add_slot(self.SYSTEM_SLOT, 0, guest.SYSTEM_SIZE)
            self._system = self._slots[system.id][1]
            guest.install(self._system)
            self._vcpu = fcntl.ioctl(self._fd, abi.KVM_CREATE_VCPU, 0)
            size = fcntl.ioctl(self._kvm, abi.KVM_GET_VCPU_MMAP_SIZE)
            self._run_page = mmap.mmap(self._vcpu, size, mmap.MAP_SHARED,
                                       mmap.PROT_READ | mmap.PROT_WRITE)
            self._run = abi.Run.from_buffer(self._run_page)
            sregs = abi.Sregs()
            fcntl.ioctl(self._vcpu, abi.KVM_GET_SREGS, sregs)
            guest.long_mode_sregs(sregs)
            fcntl.ioctl(self._vcpu, abi.KVM_SET_SREGS, sregs)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> RealVm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._vcpu_stats is not None:
            self._vcpu_stats.close()
            self._vcpu_stats = None
        self._run = None
        if self._run_page is not None:
            self._run_page.close()
            self._run_page = None
        for fd in (self._vcpu, self._fd):
            if fd >= 0:
                os.close(fd)
        self._vcpu = self._fd = -1
        for _, mem in self._slots.values():
            mem.close()
        self._slots.clear()
        if self._kvm >= 0:
            os.close(self._kvm)
            self._kvm = -1

    # -- VM ioctls --------------------------------------------------------------------------

    def check_extension(self, cap: int) -> int:
        return fcntl.ioctl(self._fd, abi.KVM_CHECK_EXTENSION, cap)

    def enable_cap(self, cap: int, arg0: int = 0, flags: int = 0) -> None:
        request = abi.EnableCap(cap=cap, flags=flags)
        request.args[0] = arg0
        fcntl.ioctl(self._fd, abi.KVM_ENABLE_CAP, request)

    def enable_manual_protect(self, initially_set: bool = False) -> None:
        """KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 with ENABLE (and INITIALLY_SET)."""
        mode = abi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
        if initially_set:
            mode |= abi.KVM_DIRTY_LOG_INITIALLY_SET
        self.enable_cap(abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, mode)

    def add_slot(self, slot: int, gpa: int, size: int, flags: int = 0,
                 populate: bool = False) -> Slot:
        """Create a memslot over fresh anonymous memory (faulted in up front if `populate`)."""
        mem = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                        | (mmap.MAP_POPULATE if populate else 0))
        new = Slot(slot, gpa, size, flags, _address_of(mem))
        try:
            self._set_region(new)
        except OSError:
            mem.close()
            raise
        self._slots[slot] = (new, mem)
        return new

    def set_slot_flags(self, slot: int, flags: int) -> Slot:
        """A FLAGS_ONLY change, e.g. turning KVM_MEM_LOG_DIRTY_PAGES on or off."""
        old, mem = self._slots[slot]
        new = Slot(old.id, old.gpa, old.size, flags, old.hva)
        self._set_region(new)
        self._slots[slot] = (new, mem)
        return new

    def slot(self, slot: int) -> Slot:
        return self._slots[slot][0]

    def memory(self, slot: int) -> mmap.mmap:
        """The anonymous mapping behind a data slot (its bytes as the host sees them)."""
        return self._slots[slot][1]

    def set_user_memory_region(self, slot: int, flags: int, gpa: int, size: int,
                               hva: int) -> None:
        """The raw KVM_SET_USER_MEMORY_REGION, for validation probes: the slots this
        object tracks are not updated (a probe that succeeds is undone by the caller)."""
        fcntl.ioctl(self._fd, abi.KVM_SET_USER_MEMORY_REGION,
                    abi.UserspaceMemoryRegion(slot, flags, gpa, size, hva))

    def move_slot(self, slot: int, gpa: int) -> Slot:
        """A MOVE: the slot's memory appears at `gpa` (KVM deletes and recreates it)."""
        old, mem = self._slots[slot]
        new = Slot(old.id, gpa, old.size, old.flags, old.hva)
        self._set_region(new)
        self._slots[slot] = (new, mem)
        return new

    def delete_slot(self, slot: int) -> None:
        old, mem = self._slots.pop(slot)
        self._set_region(Slot(old.id, old.gpa, 0, 0, 0))
        mem.close()

    def mprotect(self, slot: int, prot: int) -> None:
        """mprotect(2) of the whole memory behind a data slot."""
        s = self._slots[slot][0]
        if _libc.mprotect(ctypes.c_void_p(s.hva), ctypes.c_size_t(s.size), prot):
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def alias_slot(self, slot: int, gpa: int, of: int) -> Slot:
        """A second slot over the memory of slot `of` (two gfns, one hva range)."""
        old, mem = self._slots[of]
        new = Slot(slot, gpa, old.size, 0, old.hva)
        self._set_region(new)
        self._slots[slot] = (new, mem)
        return new

    def remap(self, slot: int) -> None:
        """mmap(MAP_FIXED) fresh anonymous memory over the slot's: the old pages go (the
        MMU notifier invalidates them) and `memory(slot)` reads the new ones."""
        s = self._slots[slot][0]
        if _libc.mmap(s.hva, s.size, mmap.PROT_READ | mmap.PROT_WRITE,
                      mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED, -1, 0) != s.hva:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def madvise_dontneed(self, slot: int) -> None:
        """madvise(MADV_DONTNEED) of the whole memory behind a data slot."""
        self._slots[slot][1].madvise(mmap.MADV_DONTNEED)

    def _set_region(self, s: Slot) -> None:
        fcntl.ioctl(self._fd, abi.KVM_SET_USER_MEMORY_REGION,
                    abi.UserspaceMemoryRegion(s.id, s.flags, s.gpa, s.size, s.hva))

    def get_dirty_log(self, slot: int) -> bytes:
        """KVM_GET_DIRTY_LOG; as many bytes as KVM copies for the slot (8 if there is none)."""
        size = self._slots[slot][0].bitmap_bytes if slot in self._slots else 8
        buf = ctypes.create_string_buffer(size)
        fcntl.ioctl(self._fd, abi.KVM_GET_DIRTY_LOG,
                    abi.DirtyLog(slot=slot, dirty_bitmap=ctypes.addressof(buf)))
        return buf.raw

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int,
                        bitmap: bytes) -> None:
        """KVM_CLEAR_DIRTY_LOG; bit i of `bitmap` stands for page `first_page + i`."""
        size = max((num_pages + 63) // 64 * 8, len(bitmap), 8)
        buf = ctypes.create_string_buffer(bytes(bitmap), size)
        fcntl.ioctl(self._fd, abi.KVM_CLEAR_DIRTY_LOG,
                    abi.ClearDirtyLog(slot=slot, num_pages=num_pages, first_page=first_page,
                                      dirty_bitmap=ctypes.addressof(buf)))

    # -- the guest --------------------------------------------------------------------------

    def write_stride(self, start: int, end: int, stride: int = PAGE_SIZE) -> int:
        """The guest writes one byte at start, start+stride, ... below end; ns in KVM_RUN."""
        fcntl.ioctl(self._vcpu, abi.KVM_SET_REGS, guest.stride_regs(start, end, stride))
        return self._run_to_done()

    def write_pages(self, gpas: Sequence[int]) -> int:
        """The guest writes one byte at each GPA, in order; ns spent in KVM_RUN."""
        elapsed = 0
        for at in range(0, len(gpas), guest.LIST_CAPACITY):
            chunk = array("Q", gpas[at:at + guest.LIST_CAPACITY])
            self._system[guest.LIST_BASE:guest.LIST_BASE + 8 * len(chunk)] = chunk.tobytes()
            fcntl.ioctl(self._vcpu, abi.KVM_SET_REGS, guest.list_regs(len(chunk)))
            elapsed += self._run_to_done()
        return elapsed

    def store(self, gpa: int, value: int) -> int:
        """The guest writes the 8 bytes of `value` at `gpa` with one instruction; ns in
        KVM_RUN."""
        fcntl.ioctl(self._vcpu, abi.KVM_SET_REGS, guest.store_regs(gpa, value))
        return self._run_to_done()

    def run_from(self, gpa: int) -> int:
        """Start the vCPU at `gpa` (its first instruction is fetched there); ns in KVM_RUN.
        Code that does not reach `OUT DONE_PORT` ends in `GuestExit`."""
        fcntl.ioctl(self._vcpu, abi.KVM_SET_REGS, guest.fetch_regs(gpa))
        return self._run_to_done()

    def mmio_exit(self) -> tuple[int, bytes, bool]:
        """(gpa, data, is_write) of the MMIO exit the last run ended with."""
        m = self._run.exit.mmio
        return m.phys_addr, bytes(m.data[:m.len]), bool(m.is_write)

    def internal_error(self) -> int:
        """The suberror of the KVM_EXIT_INTERNAL_ERROR the last run ended with."""
        return self._run.exit.suberror

    def resume(self) -> int:
        """KVM_RUN again with the registers as the last exit left them: the instruction
        that faulted is executed again; ns in KVM_RUN."""
        return self._run_to_done()

    def vcpu_stats(self) -> dict[str, int]:
        """The vCPU's KVM statistics now (`pf_taken`, `pf_fast`, `pf_fixed`, `exits`, ...)."""
        if self._vcpu_stats is None:
            self._vcpu_stats = Stats(self._vcpu)
        return self._vcpu_stats.read()

    def _run_to_done(self) -> int:
        elapsed = 0
        while True:
            start = time.perf_counter_ns()
            try:
                fcntl.ioctl(self._vcpu, abi.KVM_RUN, 0)
            except InterruptedError:
                continue
            finally:
                elapsed += time.perf_counter_ns() - start
            reason = self._run.exit_reason
            if reason == abi.ExitReason.IO and self._run.exit.io.port == guest.DONE_PORT:
                return elapsed
            if reason != abi.ExitReason.INTR:
                raise GuestExit(reason, self._rip(), self._exit_detail(reason))

    def _rip(self) -> int:
        regs = abi.Regs()
        fcntl.ioctl(self._vcpu, abi.KVM_GET_REGS, regs)
        return regs.rip

    def _exit_detail(self, reason: int) -> str:
        exit_ = self._run.exit
        if reason == abi.ExitReason.IO:
            return f"port {exit_.io.port:#x}"
        if reason == abi.ExitReason.MMIO:
            return f"gpa {exit_.mmio.phys_addr:#x}"
        if reason == abi.ExitReason.FAIL_ENTRY:
            return f"hardware reason {exit_.hardware_exit_reason:#x}"
        if reason == abi.ExitReason.INTERNAL_ERROR:
            return f"suberror {exit_.suberror}"
        return ""
