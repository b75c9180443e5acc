"""vmmu's dirty log against the host's real KVM: the same script, the same answers.

Each script (`benchmarks.kvmhost.conformance` steps) runs once on real KVM and once on
vmmu, where `replay` plays it through the model's API; the two transcripts (per step: the
errno name, and for a GET the bitmap with its length) must be equal, step by step:

    bitmap mode     GET_DIRTY_LOG clears and re-protects; rounds of writes and harvests
    manual protect  GET only copies, CLEAR_DIRTY_LOG clears and re-protects exactly the
                    pages given; with ENABLE and with ENABLE|INITIALLY_SET
    bad arguments   every script of `BAD_ARGUMENTS`

vmmu replays each script over 4K and over THP host memory, with huge SPTEs split eagerly and
on the next write fault: the bitmaps depend on none of these, so a huge SPTE that escapes
write protection shows up as a lost write.
Runs only where /dev/kvm can be opened; slots are at most 1000 pages.
"""

from __future__ import annotations

import functools
import random
from array import array
from collections.abc import Iterable, Sequence

import pytest

from benchmarks.kvmhost import (BAD_ARGUMENTS, Clear, EnableManualProtect, Get,
                                KvmUnavailable, RealVm, Result, SetRegion, Step, Write,
                                bitmap_of, pages_of, run_script)
from vmmu.kvmhost import abi
from benchmarks.kvmhost.conformance import (LOG, MANUAL, MANUAL_INITIALLY_SET, SLOT_BASE,
                                            SLOT_STRIDE)
from vmmu.server.kvm import (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, AccessBatch, AccessKind,
                             Backing, ExitReason, Kvm, KvmError, Vm, VmConfig, make_op)

try:
    RealVm().close()
except (KvmUnavailable, OSError) as e:
    pytest.skip(f"real KVM not usable here: {e}", allow_module_level=True)

PAGE_SIZE = 4096
KVM_CAP_X86_SMM = 117
WRITE_BYTE = make_op(AccessKind.WRITE, 1, True)


# -- the replayer --------------------------------------------------------------------------

class Replayer:
    """Plays script steps on one vmmu VM as `run_script` plays them on KVM: data slot k at
    GPA `SLOT_BASE + (k - 1) * SLOT_STRIDE` over fresh host memory, one vCPU writing one
    byte per page, errors as errnos."""

    def __init__(self, vm: Vm, backing: Backing) -> None:
        self.vm, self.backing = vm, backing
        self.vcpu = vm.create_vcpu(0)
        self.slots: dict[int, tuple[int, int]] = {}      # slot id -> (npages, hva)

    async def step(self, step: Step) -> Result:
        try:
            match step:
                case SetRegion(slot, npages, flags):
                    await self._set_region(slot, npages, flags)
                case Write(pages, slot):
                    await self._write(slot, pages)
                case Get(slot):
                    return Result(step, 0, await self.vm.get_dirty_log(slot))
                case Clear(first_page, num_pages, bitmap, slot):
                    if bitmap is None:
                        bitmap = b"\xff" * ((num_pages + 63) // 64 * 8)
                    await self.vm.clear_dirty_log(slot, first_page, num_pages, bitmap)
                case EnableManualProtect(mode, flags):
                    await self.vm.enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, flags, [mode])
                case _:
                    raise TypeError(f"not a script step: {step!r}")
        except KvmError as e:
            return Result(step, e.errno)
        return Result(step, 0)

    async def _set_region(self, slot: int, npages: int, flags: int) -> None:
        gpa = SLOT_BASE + (slot - 1) * SLOT_STRIDE
        if slot in self.slots:
            if self.slots[slot][0] != npages:
                raise ValueError(f"slot {slot}: a resize is not scripted")
            hva = self.slots[slot][1]
        else:
            hva = self.vm.mmap(npages * PAGE_SIZE, self.backing).hva
        await self.vm.set_user_memory_region(slot, flags, gpa, npages * PAGE_SIZE, hva)
        self.slots[slot] = (npages, hva)

    async def _write(self, slot: int, pages: Sequence[int]) -> None:
        npages = self.slots[slot][0]
        bad = [p for p in pages if not 0 <= p < npages]
        if bad:
            raise ValueError(f"pages {bad[:4]} outside slot {slot} of {npages} pages")
        if not pages:
            return                       # the guest runs and writes nothing
        gpa = SLOT_BASE + (slot - 1) * SLOT_STRIDE
        gpas = array("Q", [gpa + p * PAGE_SIZE for p in pages]).tobytes()
        batch = AccessBatch.from_wire(gpas, bytes([WRITE_BYTE]) * len(pages),
                                      b"\x01" * len(pages))
        result = await self.vcpu.run(batch)
        if result.exit.reason is not ExitReason.DONE:
            raise AssertionError(f"write {result.completed} of {list(pages)[:8]}...: "
                                 f"unexpected exit {result.exit}")


async def replay(steps: Sequence[Step], backing: Backing = Backing.PAGE_4K,
                 eager_page_split: bool = True, mmu: str = "tdp") -> list[Result]:
    """Replay `steps` on a fresh vmmu VM; one `Result` per step, as `run_script` returns.
    `EnableManualProtect` is KVM_ENABLE_CAP on the live VM, wherever the script has it."""
    results = []
    vm = Kvm().create_vm(VmConfig(eager_page_split=eager_page_split, mmu=mmu))
    try:
        replayer = Replayer(vm, backing)
        for step in steps:
            results.append(await replayer.step(step))
    finally:
        await vm.destroy()
    return results


@functools.cache
def on_real_kvm(steps: tuple[Step, ...]) -> list[Result]:
    return run_script(steps)


# -- transcripts ---------------------------------------------------------------------------

def ranges(pages: Iterable[int]) -> str:
    """[0, 1, 2, 7] -> "0-2,7"."""
    runs: list[list[int]] = []
    for page in sorted(pages):
        if runs and page == runs[-1][1] + 1:
            runs[-1][1] = page
        else:
            runs.append([page, page])
    return ",".join(f"{a}-{b}" if b != a else str(a) for a, b in runs) or "-"


def describe(step: Step) -> str:
    match step:
        case Write(pages, slot):
            return f"Write(slot {slot}: {ranges(set(pages))})"
        case Clear(first_page, num_pages, bitmap, slot):
            which = "all" if bitmap is None else ranges(first_page + p for p in pages_of(bitmap))
            return f"Clear(slot {slot}: [{first_page}, +{num_pages}) pages {which})"
    return repr(step)


def transcript(results: Sequence[Result]) -> list[tuple]:
    """Per step: its description, "ok" or the errno name, and a GET's bitmap (bytes, pages)."""
    return [(i, describe(r.step), r.outcome,
             None if r.bitmap is None else (len(r.bitmap), ranges(pages_of(r.bitmap))))
            for i, r in enumerate(results)]


async def assert_conforms(steps: Sequence[Step], backing: Backing = Backing.PAGE_4K,
                          eager_page_split: bool = True, mmu: str = "tdp") -> None:
    steps = tuple(steps)
    expected = transcript(on_real_kvm(steps))
    assert transcript(await replay(steps, backing, eager_page_split, mmu)) == expected


# What vmmu's host and KVM module parameter may change without changing a bitmap: huge
# SPTEs split when logging starts (or CLEAR protects them), or on the next write fault.
hosts = pytest.mark.parametrize(("backing", "eager_page_split"),
                                [(Backing.PAGE_4K, True), (Backing.THP, True),
                                 (Backing.THP, False)],
                                ids=["4k", "thp", "thp-split-on-fault"])
# vmmu's MMU: the host's KVM here runs the legacy MMU (tdp_mmu=0), which also shadows the
# guest's own page tables; what a bitmap shows does not depend on either.
mmus = pytest.mark.parametrize("mmu", ["tdp", "legacy"])


def random_pages(rng: random.Random, npages: int, n: int) -> tuple[int, ...]:
    """n writes, repeats included, half of them bunched in one 64-page word."""
    word = rng.randrange(npages // 64) * 64
    return tuple(rng.randrange(npages) if i % 2 else word + rng.randrange(64)
                 for i in range(n))


# -- (a) bitmap mode: GET_DIRTY_LOG clears and re-protects -----------------------------------

def _bitmap_rounds(rounds: Iterable[Iterable[int]], npages: int = 512) -> tuple[Step, ...]:
    steps: list[Step] = [SetRegion(1, npages, LOG)]
    for pages in rounds:
        steps += [Write(tuple(pages)), Get()]
    return tuple(steps)


def _random_bitmap_rounds(rng: random.Random, npages: int, rounds: int) -> tuple[Step, ...]:
    return _bitmap_rounds([random_pages(rng, npages, 48) for _ in range(rounds)], npages)


BITMAP_MODE: dict[str, tuple[Step, ...]] = {
    "written_pages_and_only_those": _bitmap_rounds([[0, 1, 63, 64, 500, 511]]),
    "harvest_clears_and_reprotects": _bitmap_rounds([[1, 2, 3], [2], [2, 3, 2], [7]]) + (Get(),),
    "every_page_twice": _bitmap_rounds([range(512), range(512), range(0, 512, 3)]),
    "tail_of_a_100_page_slot": _bitmap_rounds([[0, 63, 64, 99], [99], []], npages=100),
    "random_rounds": _random_bitmap_rounds(random.Random(20120529), 512, rounds=8),
    "pages_written_before_logging": (
        SetRegion(1, 512, 0), Write((1, 2, 300, 511)), SetRegion(1, 512, LOG), Get(),
        Write((2,)), Get(), Write((1, 300, 511)), Get()),
    "logging_off_and_on_again": (
        SetRegion(1, 128, LOG), Write((1, 2)), SetRegion(1, 128, 0), Get(),
        Write((3,)), SetRegion(1, 128, LOG), Get(), Write((2, 3)), Get()),
    "two_slots_keep_their_own_logs": (
        SetRegion(1, 512, LOG), SetRegion(2, 256, LOG), Write((5, 6), slot=1),
        Write((7,), slot=2), Get(1), Get(2), Write((7, 255), slot=2), Get(1), Get(2)),
}


@mmus
@hosts
@pytest.mark.parametrize("name", BITMAP_MODE)
async def test_bitmap_mode_matches_real_kvm(name, backing, eager_page_split, mmu):
    await assert_conforms(BITMAP_MODE[name], backing, eager_page_split, mmu)


# -- (b) manual protect: GET copies, CLEAR clears and re-protects ----------------------------

def _manual_rounds(rng: random.Random, npages: int, rounds: int) -> tuple[Step, ...]:
    """Write, GET, CLEAR a random subset of one random aligned range, GET; repeated."""
    steps: list[Step] = [SetRegion(1, npages, LOG)]
    for _ in range(rounds):
        first = rng.randrange(npages // 64) * 64
        num = min(rng.choice([64, 128, 256]), npages - first)
        steps += [Write(random_pages(rng, npages, 32)), Get(),
                  Clear(first, num, bitmap_of(rng.sample(range(num), num // 2), num)), Get()]
    return tuple(steps)


MANUAL_PROTECT: dict[str, tuple[Step, ...]] = {
    "get_does_not_clear": (SetRegion(1, 256, LOG), Write((4, 200)), Get(), Get()),
    "clear_clears_exactly_the_given_pages": (
        SetRegion(1, 256, LOG), Write((1, 2, 70, 130, 255)),
        Clear(64, 128, bitmap_of([70 - 64, 130 - 64, 131 - 64], 128)), Get(),
        Clear(0, 64, bitmap_of([2], 64)), Get()),
    "clear_reprotects_so_the_next_write_is_seen": (
        SetRegion(1, 128, LOG), Write((1, 5)), Clear(0, 128), Get(), Write((1,)), Get()),
    "a_page_written_twice_before_its_clear": (
        SetRegion(1, 256, LOG), Write((9,)), Get(), Write((9, 10)), Clear(0, 64), Get(),
        Write((9,)), Get()),
    "clearing_the_tail_of_a_100_page_slot": (
        SetRegion(1, 100, LOG), Write((3, 99)), Get(), Clear(64, 36), Get(), Clear(0, 64), Get(),
        Write((98, 99)), Get()),
    "pages_written_before_logging": (
        SetRegion(1, 512, 0), Write((1, 5, 300)), SetRegion(1, 512, LOG),
        Clear(0, 64, bitmap_of([5], 64)), Write((1, 5)), Get(), Clear(0, 512), Get(),
        Write((1, 300)), Get()),
    "pages_written_before_logging_then_cleared": (
        SetRegion(1, 512, 0), Write((1, 5, 300)), SetRegion(1, 512, LOG), Clear(0, 512), Get(),
        Write((5,)), Get(), Clear(0, 64, bitmap_of([5], 64)), Write((1, 300)), Get()),
    "random_rounds": _manual_rounds(random.Random(20120613), 512, 8),
}


@mmus
@hosts
@pytest.mark.parametrize("mode", [MANUAL, MANUAL_INITIALLY_SET], ids=["enable", "initially_set"])
@pytest.mark.parametrize("name", MANUAL_PROTECT)
async def test_manual_protect_matches_real_kvm(name, mode, backing, eager_page_split, mmu):
    await assert_conforms((EnableManualProtect(mode),) + MANUAL_PROTECT[name], backing,
                          eager_page_split, mmu)


# -- (c) bad arguments: the same errno, step by step -----------------------------------------

_SETUP = (EnableManualProtect(MANUAL), SetRegion(1, 1000, LOG))
SMM_SLOT = 1 << 16 | 1

MORE_BAD_ARGUMENTS: dict[str, tuple[Step, ...]] = {
    "clear_no_pages": _SETUP + (Clear(0, 0),),
    "clear_whole_slot_unaligned_to_end": _SETUP + (Clear(0, 1000),),
    "clear_num_pages_unaligned_mid_slot": _SETUP + (Clear(64, 100),),
    "get_slot_id_at_u16_max": _SETUP + (Get(slot=0xFFFF),),
    "get_address_space_2": _SETUP + (Get(slot=2 << 16 | 1),),
    "get_smm_slot_missing": _SETUP + (Get(slot=SMM_SLOT),),
    "clear_smm_slot_missing": _SETUP + (Clear(0, 64, slot=SMM_SLOT),),
    "get_slot_not_logging_without_manual_protect": (SetRegion(1, 128, 0), Get()),
    "clear_slot_not_logging_without_manual_protect": (SetRegion(1, 128, 0), Clear(0, 64)),
    "cap_initially_set_value_2": (EnableManualProtect(abi.KVM_DIRTY_LOG_INITIALLY_SET),
                                  SetRegion(1, 128, LOG), Get()),
}


# -- (d) KVM_ENABLE_CAP on a live VM ---------------------------------------------------------

LIVE_CAP = {
    # A slot that logs already keeps its (empty) bitmap: INITIALLY_SET reaches a slot only
    # when its logging is enabled again.
    "initially_set_after_a_slot_exists": (
        SetRegion(1, 256, LOG), Write((3,)), EnableManualProtect(MANUAL_INITIALLY_SET), Get(),
        SetRegion(1, 256, 0), SetRegion(1, 256, LOG), Get()),
    "manual_then_off_again": (
        SetRegion(1, 256, LOG), EnableManualProtect(MANUAL), Write((7,)), Get(), Get(),
        EnableManualProtect(0), Get(), Get()),
    "nonzero_flags_change_nothing": (
        SetRegion(1, 256, LOG), EnableManualProtect(MANUAL, flags=1), Write((9,)), Get(),
        Get()),
}


@pytest.mark.parametrize("name", LIVE_CAP)
async def test_enable_cap_on_a_live_vm_matches_real_kvm(name):
    await assert_conforms(LIVE_CAP[name])


@functools.cache
def host_has_smm() -> bool:
    with RealVm() as vm:
        return bool(vm.check_extension(KVM_CAP_X86_SMM))


@pytest.mark.parametrize("name", list(BAD_ARGUMENTS) + list(MORE_BAD_ARGUMENTS))
async def test_bad_arguments_fail_as_on_real_kvm(name):
    steps = BAD_ARGUMENTS.get(name) or MORE_BAD_ARGUMENTS[name]
    if any(getattr(step, "slot", 0) >> 16 == 1 for step in steps) and not host_has_smm():
        pytest.skip("this host's KVM has no SMM, so one address space (slot ids of address "
                    "space 1 are EINVAL); vmmu models the two of a kernel with SMM")
    await assert_conforms(steps)


# -- the replayer itself ---------------------------------------------------------------------

def test_ranges_names_runs_of_pages():
    assert ranges([7, 0, 1, 2, 9, 10]) == "0-2,7,9-10"
    assert ranges([]) == "-"


async def test_the_replayer_refuses_pages_outside_the_slot():
    with pytest.raises(ValueError, match="outside slot 1"):
        await replay((SetRegion(1, 64, LOG), Write((64,))))
