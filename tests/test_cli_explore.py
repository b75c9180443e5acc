"""`vmmu explore` on worker processes: the same report as one process, the --all table,
plain progress lines off a terminal, and what it says when Ray is missing."""

import os
import pty
import subprocess
import sys

import pytest

from vmmu.server.kvm.explore import SCENARIOS
from vmmu.server.kvm.vm import DEBUG_KNOBS

WITHOUT_RAY = "import sys; sys.modules['ray'] = None; from vmmu.cli import main; sys.exit(main())"


def vmmu(*args: str, python: tuple[str, ...] = ("-m", "vmmu.cli")):
    """Run `vmmu explore`; stdout and stderr decoded as written (a "\r" stays one)."""
    done = subprocess.run([sys.executable, *python, "explore", *args], capture_output=True,
                          timeout=300)
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(),
                                       done.stderr.decode())


@pytest.mark.parametrize("args", [
    ("fast_pf_vs_invalidate", "--seeds", "12", "--knob", "fast_pf_plain_write"),
    ("tlb_vs_zap", "--seeds", "8", "--first-seed", "40")])
def test_two_workers_print_what_one_process_prints(args):
    alone, pooled = vmmu(*args, "--workers", "1"), vmmu(*args, "--workers", "2")
    assert (pooled.returncode, pooled.stdout) == (alone.returncode, alone.stdout)
    assert alone.stdout and alone.returncode in (0, 1)
    assert "\r" not in pooled.stderr and " seeds " in pooled.stderr.splitlines()[-1]


def test_all_prints_every_scenario_with_and_without_each_knob():
    table = vmmu("--all", "--seeds", "1", "--workers", "2")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    header = lines[1].split()
    assert header == ["scenario", "none", *sorted(DEBUG_KNOBS)]
    starts = [lines[1].index(name) for name in header] + [None]
    cells = {(line.split()[0], name): line[start:end].strip()
             for line in lines[2:2 + len(SCENARIOS)]
             for name, start, end in zip(header[1:], starts[1:], starts[2:])}
    assert {scenario for scenario, _ in cells} == set(SCENARIOS)
    assert {cells[scenario, "none"] for scenario in SCENARIOS} == {"clean"}
    assert cells["tlb_vs_zap", "skip_zap_tlb_flush"] == "seed 0"
    assert cells["dirty_log_vs_tlb", "skip_wrprot_flush"] == "seed 0"
    assert cells["dirty_log_vs_tlb", "skip_zap_tlb_flush"] == "clean"
    assert len(table.stderr.splitlines()) == len(SCENARIOS) * len(header[1:])


def test_ray_without_ray_says_how_to_install_it():
    missing = vmmu("tlb_vs_zap", "--seeds", "2", "--ray", python=("-c", WITHOUT_RAY))
    assert missing.returncode == 2
    assert "pip install 'vmmu[ray]'" in missing.stderr


@pytest.mark.parametrize("args,reason", [
    ((), "give a scenario or --all"),
    (("--all", "tlb_vs_zap"), "give a scenario or --all"),
    (("--all", "--knob", "skip_zap_tlb_flush"), "--knob is not for it"),
    (("tlb_vs_zap", "--ray", "10.0.0.1:6379", "--workers", "2"), "Ray cluster's CPUs")])
def test_contradictory_options_are_refused(args, reason):
    refused = vmmu(*args)
    assert refused.returncode == 2 and reason in refused.stderr


@pytest.mark.parametrize("workers", ["0", "1000"])
def test_workers_out_of_range_are_refused(workers):
    refused = vmmu("tlb_vs_zap", "--seeds", "2", "--workers", workers)
    assert refused.returncode == 2 and f"workers {workers} is not in 1..64" in refused.stderr


def test_on_a_terminal_progress_is_a_bar():
    controller, terminal = pty.openpty()
    try:
        done = subprocess.run([sys.executable, "-m", "vmmu.cli", "explore", "tlb_vs_zap",
                               "--seeds", "4", "--workers", "2"], stderr=terminal,
                              stdout=subprocess.PIPE, text=True, timeout=300)
        os.close(terminal)
        shown = b""
        while chunk := _read(controller):
            shown += chunk
    finally:
        os.close(controller)
    assert done.returncode == 0 and "all 4 seeds passed" in done.stdout
    assert b"\rtlb_vs_zap [" in shown and b"] 4/4 seeds" in shown


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    except OSError:                          # EIO: the terminal's other end is closed
        return b""
