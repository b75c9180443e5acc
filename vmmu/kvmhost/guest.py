"""The guest: 64-bit user-mode (CPL 3) code over an identity map, and the system memory it needs.

On this host KVM is PVM-based: only 64-bit code at CPL 3 runs natively, every other mode is
emulated an instruction at a time. So the vCPU starts directly in long mode at CPL 3 (no boot
code): `install` writes page tables, GDT, TSS and code into the system slot at GPA 0, and
`long_mode_sregs` loads the matching segment caches and control registers.

Layout of the system slot (`SYSTEM_SIZE` bytes at GPA 0):

    0x1000 PML4, 0x2000 PDPT, 0x3000-0x6fff four PDs: GVA == GPA for the low 4 GiB,
           2 MiB guest pages, user + writable at every level
    0x7000 GDT (null, kernel code/data, user data 0x1b, user code64 0x23), 0x7800 TSS
    0x8000 code, LIST_BASE..SYSTEM_SIZE a list of GPAs for the `list` entry

The code has three entry points, all ending in `OUT DONE_PORT`:

    stride: for (p = rdi; p < rsi; p += rdx) *(u8 *)p = al;      then exit
    list:   for (q = rcx; q < rdx; q += 8)   *(u8 *)*q = (u8)*q; then exit
    store:  *(u64 *)rdi = rax;                                  then exit

A run may also start at any GPA below 4 GiB (`fetch_regs`): the vCPU fetches its first
instruction there.

Why OUT: HLT is privileged at CPL 3 (#GP, and with no IDT a triple fault: KVM_EXIT_SHUTDOWN);
OUT is allowed because RFLAGS.IOPL is 3 and costs one KVM_EXIT_IO (about 25 us round trip
from Python here); an MMIO write to a GPA without a slot also exits cleanly but cost more.

Re-entering after the exit only exits again, so a run without fresh registers is harmless.
"""

from __future__ import annotations

import struct

from .abi import Dtable, Regs, Segment, Sregs

__all__ = ["SYSTEM_SIZE", "LIST_BASE", "LIST_CAPACITY", "MAPPED_LIMIT", "DONE_PORT",
           "install", "long_mode_sregs", "stride_regs", "list_regs", "store_regs",
           "fetch_regs"]

SYSTEM_SIZE = 2 << 20
MAPPED_LIMIT = 4 << 30
DONE_PORT = 0x10

PML4, PDPT, PD = 0x1000, 0x2000, 0x3000
GDT, TSS, CODE = 0x7000, 0x7800, 0x8000
LIST_BASE = 0x10000
LIST_CAPACITY = (SYSTEM_SIZE - LIST_BASE) // 8

# as --64: stride (0x00), list (0x0c), done (0x1c: out %al, $0x10; jmp done),
# store (0x20: mov %rax, (%rdi); jmp done)
_CODE = bytes.fromhex("4839f7731788074801d7ebf4"
                      "4839d1730b488b0188004883c108ebf0"
                      "e610ebfc"
                      "488907ebf7")
_STRIDE, _LIST, _STORE = 0x00, 0x0C, 0x20

_PRESENT, _WRITABLE, _USER, _HUGE = 1 << 0, 1 << 1, 1 << 2, 1 << 7
_GDT = (0,
        0x00AF9B000000FFFF,   # 0x08 kernel code64
        0x00CF93000000FFFF,   # 0x10 kernel data
        0x00CFF3000000FFFF,   # 0x18 user data, DPL 3
        0x00AFFB000000FFFF)   # 0x20 user code64, DPL 3
_USER_DS, _USER_CS, _TR = 0x18 | 3, 0x20 | 3, 0x28

_CR0_PE, _CR0_MP, _CR0_ET, _CR0_NE = 1 << 0, 1 << 1, 1 << 4, 1 << 5
_CR0_WP, _CR0_PG = 1 << 16, 1 << 31
_CR4_PAE = 1 << 5
_EFER_LME, _EFER_LMA = 1 << 8, 1 << 10
_RFLAGS_FIXED, _RFLAGS_IOPL3 = 1 << 1, 3 << 12


def install(mem) -> None:
    """Write page tables, GDT, TSS and code into the system slot's backing `mem`."""
    table = _PRESENT | _WRITABLE | _USER
    struct.pack_into("<Q", mem, PML4, PDPT | table)
    for i in range(MAPPED_LIMIT >> 30):
        pd = PD + i * 0x1000
        struct.pack_into("<Q", mem, PDPT + 8 * i, pd | table)
        struct.pack_into("<512Q", mem, pd,
                         *(((i << 30) + (j << 21)) | table | _HUGE for j in range(512)))
    struct.pack_into(f"<{len(_GDT)}Q", mem, GDT, *_GDT)
    mem[TSS:TSS + 0x68] = bytes(0x68)
    mem[CODE:CODE + len(_CODE)] = _CODE


def long_mode_sregs(sregs: Sregs) -> None:
    """Put `sregs` (as read by KVM_GET_SREGS) in 64-bit mode at CPL 3 over `install`'s map."""
    def user(selector: int, type_: int, code64: bool) -> Segment:
        return Segment(base=0, limit=0xFFFFFFFF, selector=selector, type=type_, present=1,
                       dpl=3, db=0 if code64 else 1, s=1, l=1 if code64 else 0, g=1)

    sregs.cs = user(_USER_CS, 0xB, True)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(sregs, name, user(_USER_DS, 0x3, False))
    sregs.tr = Segment(base=TSS, limit=0x67, selector=_TR, type=0xB, present=1)
    sregs.gdt = Dtable(base=GDT, limit=8 * len(_GDT) - 1)
    sregs.cr0 = _CR0_PE | _CR0_MP | _CR0_ET | _CR0_NE | _CR0_WP | _CR0_PG
    sregs.cr3 = PML4
    sregs.cr4 = _CR4_PAE
    sregs.efer = _EFER_LME | _EFER_LMA


def stride_regs(start: int, end: int, stride: int) -> Regs:
    return Regs(rip=CODE + _STRIDE, rflags=_RFLAGS_FIXED | _RFLAGS_IOPL3,
                rdi=start, rsi=end, rdx=stride)


def store_regs(gpa: int, value: int) -> Regs:
    """Registers for the `store` entry: one 8-byte write of `value` at `gpa`."""
    return Regs(rip=CODE + _STORE, rflags=_RFLAGS_FIXED | _RFLAGS_IOPL3, rdi=gpa, rax=value)


def fetch_regs(gpa: int) -> Regs:
    """Registers that start the vCPU at `gpa`: its first instruction is fetched there."""
    return Regs(rip=gpa, rflags=_RFLAGS_FIXED | _RFLAGS_IOPL3)


def list_regs(count: int) -> Regs:
    """Registers for the `list` entry over the first `count` GPAs at LIST_BASE."""
    return Regs(rip=CODE + _LIST, rflags=_RFLAGS_FIXED | _RFLAGS_IOPL3,
                rcx=LIST_BASE, rdx=LIST_BASE + 8 * count)
