"""The slice of the /dev/kvm ABI (x86-64, `include/uapi/linux/kvm.h`) that the harness uses.

Ioctl numbers are built with the `_IOC` encoding of `asm-generic/ioctl.h`; every struct is a
`ctypes.Structure` whose size is checked against the kernel's at import time, so a layout
mistake fails loudly instead of corrupting an ioctl argument.
"""

from __future__ import annotations

import ctypes

__all__ = [
    "KVM_GET_API_VERSION", "KVM_CREATE_VM", "KVM_CHECK_EXTENSION", "KVM_GET_VCPU_MMAP_SIZE",
    "KVM_CREATE_VCPU", "KVM_GET_DIRTY_LOG", "KVM_SET_USER_MEMORY_REGION", "KVM_RUN",
    "KVM_GET_REGS", "KVM_SET_REGS", "KVM_GET_SREGS", "KVM_SET_SREGS", "KVM_ENABLE_CAP",
    "KVM_CLEAR_DIRTY_LOG", "KVM_GET_STATS_FD",
    "KVM_CAP_USER_MEMORY", "KVM_CAP_NR_MEMSLOTS", "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
    "KVM_CAP_DIRTY_LOG_RING",
    "KVM_MEM_LOG_DIRTY_PAGES", "KVM_MEM_READONLY",
    "KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE", "KVM_DIRTY_LOG_INITIALLY_SET",
    "ExitReason",
    "UserspaceMemoryRegion", "DirtyLog", "ClearDirtyLog", "EnableCap",
    "Segment", "Dtable", "Sregs", "Regs", "RunIo", "RunMmio", "Run",
]

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _iow(nr: int, struct: type[ctypes.Structure]) -> int:
    return _ioc(_IOC_WRITE, nr, ctypes.sizeof(struct))


def _ior(nr: int, struct: type[ctypes.Structure]) -> int:
    return _ioc(_IOC_READ, nr, ctypes.sizeof(struct))


def _iowr(nr: int, struct: type[ctypes.Structure]) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, ctypes.sizeof(struct))


u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64


class UserspaceMemoryRegion(ctypes.Structure):
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64),
                ("memory_size", u64), ("userspace_addr", u64)]


class DirtyLog(ctypes.Structure):
    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


class ClearDirtyLog(ctypes.Structure):
    _fields_ = [("slot", u32), ("num_pages", u32), ("first_page", u64), ("dirty_bitmap", u64)]


class EnableCap(ctypes.Structure):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


class Segment(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u32), ("selector", u16), ("type", u8),
                ("present", u8), ("dpl", u8), ("db", u8), ("s", u8), ("l", u8), ("g", u8),
                ("avl", u8), ("unusable", u8), ("padding", u8)]


class Dtable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class Sregs(ctypes.Structure):
    _fields_ = [("cs", Segment), ("ds", Segment), ("es", Segment), ("fs", Segment),
                ("gs", Segment), ("ss", Segment), ("tr", Segment), ("ldt", Segment),
                ("gdt", Dtable), ("idt", Dtable),
                ("cr0", u64), ("cr2", u64), ("cr3", u64), ("cr4", u64), ("cr8", u64),
                ("efer", u64), ("apic_base", u64), ("interrupt_bitmap", u64 * 4)]


class Regs(ctypes.Structure):
    _fields_ = [(name, u64) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class RunIo(ctypes.Structure):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32),
                ("data_offset", u64)]


class RunMmio(ctypes.Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class _RunExit(ctypes.Union):
    _fields_ = [("io", RunIo), ("mmio", RunMmio), ("hardware_exit_reason", u64),
                ("suberror", u32), ("padding", u8 * 256)]


class Run(ctypes.Structure):
    """The head of the vCPU's shared `struct kvm_run` page (fixed part and exit union)."""
    _fields_ = [("request_interrupt_window", u8), ("immediate_exit", u8), ("padding1", u8 * 6),
                ("exit_reason", u32), ("ready_for_interrupt_injection", u8), ("if_flag", u8),
                ("flags", u16), ("cr8", u64), ("apic_base", u64), ("exit", _RunExit)]


for _struct, _size in ((UserspaceMemoryRegion, 32), (DirtyLog, 16), (ClearDirtyLog, 24),
                       (EnableCap, 104), (Segment, 24), (Dtable, 16), (Sregs, 312),
                       (Regs, 144), (RunIo, 16), (RunMmio, 24)):
    assert ctypes.sizeof(_struct) == _size, (_struct.__name__, ctypes.sizeof(_struct))
assert Run.exit.offset == 32

KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _iow(0x42, DirtyLog)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, UserspaceMemoryRegion)
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, Regs)
KVM_SET_REGS = _iow(0x82, Regs)
KVM_GET_SREGS = _ior(0x83, Sregs)
KVM_SET_SREGS = _iow(0x84, Sregs)
KVM_ENABLE_CAP = _iow(0xA3, EnableCap)
KVM_CLEAR_DIRTY_LOG = _iowr(0xC0, ClearDirtyLog)
KVM_GET_STATS_FD = _io(0xCE)

KVM_CAP_USER_MEMORY = 3
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_DIRTY_LOG_RING = 192

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1

KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1


class ExitReason:
    """`KVM_EXIT_*` values seen by this harness (names for error messages)."""
    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    INTERNAL_ERROR = 17

    @classmethod
    def name(cls, value: int) -> str:
        for key, val in vars(cls).items():
            if key.isupper() and val == value:
                return key
        return str(value)
