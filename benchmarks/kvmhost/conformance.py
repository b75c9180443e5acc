"""Dirty-log scripts replayed on the host's real KVM, so a model can be held to its answers.

A script is a tuple of steps, plain data that can be replayed on any implementation:

    EnableManualProtect(mode, flags)  KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
    SetRegion(slot, npages, flags)    KVM_SET_USER_MEMORY_REGION: create, or a flags-only change
    Write(pages, slot)                the vCPU writes one byte to each page index, in order
    Get(slot)                         KVM_GET_DIRTY_LOG
    Clear(first_page, num_pages, bitmap, slot)   KVM_CLEAR_DIRTY_LOG

`run_script` returns one `Result` per step: the errno (0 on success) and, for `Get`, the
bitmap KVM copied out (bit i of byte i // 8, little-endian, is page i; npages rounded up to
64 bits). Data slot `k` sits at GPA `SLOT_BASE + (k - 1) * SLOT_STRIDE`.

Errnos this host's KVM returned (6.18.44-fc, PVM, shadow MMU; the same with manual protect
off, ENABLE, or ENABLE|INITIALLY_SET), the cases of `BAD_ARGUMENTS`:

    CLEAR first_page not a multiple of 64 ................................ EINVAL
    CLEAR num_pages not a multiple of 64, not reaching the slot end ...... EINVAL
    CLEAR num_pages not a multiple of 64, reaching the slot end .......... ok
    CLEAR first_page + num_pages beyond the slot ......................... EINVAL
    CLEAR first_page beyond the slot ..................................... EINVAL
    CLEAR first_page == npages (a multiple of 64), num_pages 0 ........... ok
    CLEAR on a slot without KVM_MEM_LOG_DIRTY_PAGES ...................... ENOENT
    CLEAR / GET on a slot id with no slot ................................ ENOENT
    CLEAR / GET on slot id >= KVM_USER_MEM_SLOTS (32764) ................. EINVAL
    CLEAR without manual protect enabled ................................. ok (clears, re-protects)
    GET on a slot without KVM_MEM_LOG_DIRTY_PAGES ........................ ENOENT
    ENABLE_CAP with INITIALLY_SET but not ENABLE ......................... EINVAL
    ENABLE_CAP with an unknown mode bit, or non-zero flags ............... EINVAL
"""

from __future__ import annotations

import errno as errno_module
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from vmmu.kvmhost import abi
from vmmu.kvmhost.vm import PAGE_SIZE, RealVm

__all__ = ["EnableManualProtect", "SetRegion", "Write", "Get", "Clear", "Step", "Result",
           "run_script", "real_dirty_bitmaps", "BAD_ARGUMENTS", "bad_argument_errnos",
           "bitmap_of", "pages_of", "SLOT_BASE", "SLOT_STRIDE", "MANUAL", "MANUAL_INITIALLY_SET",
           "LOG"]

SLOT_BASE = 1 << 30
SLOT_STRIDE = 256 << 20
LOG = abi.KVM_MEM_LOG_DIRTY_PAGES
MANUAL = abi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
MANUAL_INITIALLY_SET = MANUAL | abi.KVM_DIRTY_LOG_INITIALLY_SET


@dataclass(frozen=True)
class EnableManualProtect:
    mode: int = MANUAL
    flags: int = 0


@dataclass(frozen=True)
class SetRegion:
    slot: int = 1
    npages: int = 512
    flags: int = LOG


@dataclass(frozen=True)
class Write:
    pages: tuple[int, ...]
    slot: int = 1


@dataclass(frozen=True)
class Get:
    slot: int = 1


@dataclass(frozen=True)
class Clear:
    """Bit i of `bitmap` clears page `first_page + i`; `None` means every page in the range."""
    first_page: int
    num_pages: int
    bitmap: bytes | None = None
    slot: int = 1


Step = EnableManualProtect | SetRegion | Write | Get | Clear


@dataclass(frozen=True)
class Result:
    step: Step
    errno: int
    bitmap: bytes | None = None

    @property
    def outcome(self) -> str:
        """"ok" or the errno's name, e.g. "EINVAL"."""
        return errno_module.errorcode.get(self.errno, str(self.errno)) if self.errno else "ok"


def bitmap_of(pages: Iterable[int], npages: int) -> bytes:
    """The dirty bitmap KVM would copy out for `pages` in a slot of `npages`."""
    bits = 0
    for page in pages:
        bits |= 1 << page
    return bits.to_bytes((npages + 63) // 64 * 8, "little")


def pages_of(bitmap: bytes) -> list[int]:
    bits = int.from_bytes(bitmap, "little")
    return [i for i in range(bits.bit_length()) if bits >> i & 1]


def run_script(steps: Sequence[Step]) -> list[Result]:
    """Replay `steps` on a fresh VM of the host's KVM; one `Result` per step."""
    with RealVm() as vm:
        return [_run_step(vm, step) for step in steps]


def _run_step(vm: RealVm, step: Step) -> Result:
    try:
        match step:
            case EnableManualProtect(mode, flags):
                vm.enable_cap(abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, mode, flags)
            case SetRegion(slot, npages, flags):
                _set_region(vm, slot, npages, flags)
            case Write(pages, slot):
                _write(vm, slot, pages)
            case Get(slot):
                return Result(step, 0, vm.get_dirty_log(slot))
            case Clear(first_page, num_pages, bitmap, slot):
                if bitmap is None:
                    bitmap = b"\xff" * ((num_pages + 63) // 64 * 8)
                vm.clear_dirty_log(slot, first_page, num_pages, bitmap)
            case _:
                raise TypeError(f"not a script step: {step!r}")
    except OSError as e:
        return Result(step, e.errno)
    return Result(step, 0)


def _set_region(vm: RealVm, slot: int, npages: int, flags: int) -> None:
    size = npages * PAGE_SIZE
    if size > SLOT_STRIDE:
        raise ValueError(f"slot {slot}: {npages} pages exceed the {SLOT_STRIDE >> 20} MiB stride")
    try:
        existing = vm.slot(slot)
    except KeyError:
        vm.add_slot(slot, SLOT_BASE + (slot - 1) * SLOT_STRIDE, size, flags)
        return
    if existing.size != size:
        raise ValueError(f"slot {slot} exists with {existing.npages} pages; a resize is not "
                         f"scripted")
    vm.set_slot_flags(slot, flags)


def _write(vm: RealVm, slot: int, pages: Sequence[int]) -> None:
    s = vm.slot(slot)
    bad = [p for p in pages if not 0 <= p < s.npages]
    if bad:
        raise ValueError(f"pages {bad[:4]} outside slot {slot} of {s.npages} pages")
    vm.write_pages([s.gpa + p * PAGE_SIZE for p in pages])


def real_dirty_bitmaps(rounds: Sequence[Sequence[int]], npages: int = 512) -> list[bytes]:
    """Bitmap mode: write each round's pages, then KVM_GET_DIRTY_LOG; one bitmap per round."""
    steps: list[Step] = [SetRegion(1, npages, LOG)]
    for pages in rounds:
        steps += [Write(tuple(pages)), Get()]
    results = run_script(steps)
    failed = [r for r in results if r.errno]
    if failed:
        raise OSError(failed[0].errno, f"{failed[0].step} failed: {failed[0].outcome}")
    return [r.bitmap for r in results if isinstance(r.step, Get)]


# A slot of 1000 pages: 15 full 64-page words and a 40-page tail.
_NPAGES = 1000
_SETUP = (EnableManualProtect(MANUAL), SetRegion(1, _NPAGES, LOG))

BAD_ARGUMENTS: dict[str, tuple[Step, ...]] = {
    "clear_first_page_unaligned": _SETUP + (Clear(1, 64),),
    "clear_num_pages_unaligned": _SETUP + (Clear(0, 63),),
    "clear_num_pages_unaligned_to_end": _SETUP + (Clear(960, 40),),
    "clear_range_beyond_slot": _SETUP + (Clear(960, 64),),
    "clear_first_page_beyond_slot": _SETUP + (Clear(1024, 0),),
    "clear_first_page_at_end_empty": (EnableManualProtect(MANUAL), SetRegion(1, 1024, LOG),
                                      Clear(1024, 0)),
    "clear_slot_not_logging": _SETUP + (SetRegion(1, _NPAGES, 0), Clear(0, 64)),
    "clear_slot_missing": _SETUP + (Clear(0, 64, slot=7),),
    "clear_slot_id_invalid": _SETUP + (Clear(0, 64, slot=32764),),
    "clear_without_manual_protect": (SetRegion(1, _NPAGES, LOG), Clear(0, 64)),
    "get_slot_not_logging": _SETUP + (SetRegion(1, _NPAGES, 0), Get()),
    "get_slot_missing": _SETUP + (Get(slot=7),),
    "get_slot_id_invalid": _SETUP + (Get(slot=32764),),
    "cap_initially_set_without_enable": (EnableManualProtect(abi.KVM_DIRTY_LOG_INITIALLY_SET),),
    "cap_unknown_mode_bit": (EnableManualProtect(MANUAL | 1 << 2),),
    "cap_nonzero_flags": (EnableManualProtect(MANUAL, flags=1),),
}


def bad_argument_errnos() -> dict[str, str]:
    """Run every `BAD_ARGUMENTS` script; the outcome ("ok" or errno name) of its last step."""
    return {name: run_script(steps)[-1].outcome for name, steps in BAD_ARGUMENTS.items()}
