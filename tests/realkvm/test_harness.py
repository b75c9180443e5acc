"""The real-KVM harness: its bitmaps say what the write pattern says, its errnos are recorded.

Runs only where /dev/kvm can be opened; slots are a few MiB so the module stays fast.
"""

from __future__ import annotations

import pytest

from benchmarks.kvmhost import (PHASES, Clear, EnableManualProtect, Get, GuestExit,
                                KvmUnavailable, RealVm, SetRegion, Write,
                                bad_argument_errnos, bitmap_of, kvm_dirty_log_workload,
                                pages_of, real_dirty_bitmaps, run_script)
from benchmarks.kvmhost.conformance import LOG, MANUAL, MANUAL_INITIALLY_SET
from vmmu.kvmhost import abi

try:
    RealVm().close()
except (KvmUnavailable, OSError) as e:
    pytest.skip(f"real KVM not usable here: {e}", allow_module_level=True)

MiB = 1 << 20


def harvested(steps) -> list[list[int]]:
    """Dirty pages reported by each Get of the script, which must not fail anywhere."""
    results = run_script(steps)
    assert [r.outcome for r in results] == ["ok"] * len(results)
    return [pages_of(r.bitmap) for r in results if isinstance(r.step, Get)]


# -- bitmap mode (get-and-clear) -----------------------------------------------------------

def test_written_pages_and_only_those_are_dirty():
    pages = [0, 1, 63, 64, 500, 2047]
    [bitmap] = real_dirty_bitmaps([pages], npages=2048)
    assert bitmap == bitmap_of(pages, 2048)
    assert len(bitmap) == 2048 // 8


def test_a_harvest_without_writes_since_the_last_is_empty():
    assert [pages_of(b) for b in real_dirty_bitmaps([[3, 9], []])] == [[3, 9], []]


def test_a_page_written_again_after_a_harvest_is_caught_again():
    rounds = [[1, 2, 3], [2], [2, 3]]
    assert [pages_of(b) for b in real_dirty_bitmaps(rounds)] == rounds


def test_the_bitmap_is_rounded_up_to_64_pages_and_the_tail_is_tracked():
    [bitmap] = real_dirty_bitmaps([[0, 99]], npages=100)
    assert len(bitmap) == 16
    assert pages_of(bitmap) == [0, 99]


def test_every_page_of_a_large_slot_is_reported():
    npages = 8 * MiB // 4096
    first, second = real_dirty_bitmaps([range(npages), range(0, npages, 2)], npages=npages)
    assert first == b"\xff" * (npages // 8)
    assert pages_of(second) == list(range(0, npages, 2))


def test_turning_logging_off_drops_the_bitmap_and_on_again_starts_clean():
    results = run_script([SetRegion(1, 128, LOG), Write((1, 2)), SetRegion(1, 128, 0), Get(),
                          SetRegion(1, 128, LOG), Get(), Write((2,)), Get()])
    assert [r.outcome for r in results if isinstance(r.step, Get)] == ["ENOENT", "ok", "ok"]
    assert [pages_of(r.bitmap) for r in results[5::2]] == [[], [2]]


# -- manual protect ------------------------------------------------------------------------

def test_manual_get_does_not_clear():
    steps = [EnableManualProtect(MANUAL), SetRegion(1, 256), Write((4, 200)), Get(), Get()]
    assert harvested(steps) == [[4, 200], [4, 200]]


def test_manual_clear_clears_exactly_the_given_pages():
    steps = [EnableManualProtect(MANUAL), SetRegion(1, 256), Write((1, 2, 70, 130, 255)),
             Clear(64, 128, bitmap_of([70 - 64, 130 - 64, 131 - 64], 128)), Get(),
             Clear(0, 64, bitmap_of([2], 64)), Get()]
    assert harvested(steps) == [[1, 2, 255], [1, 255]]


def test_manual_clear_reprotects_so_the_next_write_is_seen():
    steps = [EnableManualProtect(MANUAL), SetRegion(1, 128), Write((1, 5)), Clear(0, 128),
             Get(), Write((1,)), Get()]
    assert harvested(steps) == [[], [1]]


def test_initially_set_reports_every_page_until_cleared():
    steps = [EnableManualProtect(MANUAL_INITIALLY_SET), SetRegion(1, 100), Get(),
             Clear(0, 64), Get(), Clear(64, 36), Get()]
    assert harvested(steps) == [list(range(100)), list(range(64, 100)), []]


def test_initially_set_protects_lazily_at_clear():
    # Page 1 is mapped writable before logging starts; INITIALLY_SET write-protects nothing
    # then, so only CLEAR can make the next write visible.
    steps = [EnableManualProtect(MANUAL_INITIALLY_SET), SetRegion(1, 128, 0), Write((1,)),
             SetRegion(1, 128, LOG), Clear(0, 128), Write((1,)), Get()]
    assert harvested(steps) == [[1]]


# -- errnos --------------------------------------------------------------------------------

def test_bad_arguments_give_the_documented_errnos():
    assert bad_argument_errnos() == {
        "clear_first_page_unaligned": "EINVAL",
        "clear_num_pages_unaligned": "EINVAL",
        "clear_num_pages_unaligned_to_end": "ok",
        "clear_range_beyond_slot": "EINVAL",
        "clear_first_page_beyond_slot": "EINVAL",
        "clear_first_page_at_end_empty": "ok",
        "clear_slot_not_logging": "ENOENT",
        "clear_slot_missing": "ENOENT",
        "clear_slot_id_invalid": "EINVAL",
        "clear_without_manual_protect": "ok",
        "get_slot_not_logging": "ENOENT",
        "get_slot_missing": "ENOENT",
        "get_slot_id_invalid": "EINVAL",
        "cap_initially_set_without_enable": "EINVAL",
        "cap_unknown_mode_bit": "EINVAL",
        "cap_nonzero_flags": "EINVAL",
    }


def test_a_failing_step_records_its_errno_and_the_script_goes_on():
    results = run_script([EnableManualProtect(MANUAL), SetRegion(1, 128), Write((3,)),
                          Clear(1, 64), Get()])
    assert [r.outcome for r in results] == ["ok", "ok", "ok", "EINVAL", "ok"]
    assert results[3].errno == 22 and results[3].bitmap is None
    assert pages_of(results[4].bitmap) == [3]


# -- the VM and the workload ---------------------------------------------------------------

def test_kvm_offers_manual_protect_with_initially_set():
    with RealVm() as vm:
        assert vm.check_extension(abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) == MANUAL_INITIALLY_SET


def test_an_ioctl_failure_is_the_oserror_of_kvm():
    with RealVm() as vm:
        vm.add_slot(1, 1 << 30, 2 * MiB, LOG)
        with pytest.raises(OSError) as info:
            vm.add_slot(2, (1 << 30) + MiB, 2 * MiB)
        assert info.value.errno == 17  # EEXIST: overlaps slot 1


def test_a_write_outside_every_slot_is_an_unexpected_exit():
    with RealVm() as vm, pytest.raises(GuestExit) as info:
        vm.write_pages([3 << 30])
    assert info.value.reason == abi.ExitReason.MMIO


def test_the_workload_reports_every_phase_per_page():
    result = kvm_dirty_log_workload(size=4 * MiB, runs=2)
    assert result["pages"] == 1024 and result["runs"] == 2
    assert set(result["ns_per_page"]) == set(PHASES)
    assert all(len(result["samples"][p]) == 2 for p in PHASES)
    assert all(v > 0 for v in result["ns_per_page"].values())
    # Nothing is mapped before the first pass, so every page faults at least once.
    assert result["vcpu_stats"]["first_pass"]["pf_taken"] >= 1024
