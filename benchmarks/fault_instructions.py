"""Instructions per fault of kvm_compare's workload, counted by valgrind: a measure the
host's noise does not move.

Each phase runs in a child process under `valgrind --tool=cachegrind --cache-sim=no`
(with a fixed hash seed), and a phase's count is the difference between two children that
differ only by that phase. The result is the second pass (a 1-byte write to every 4 KiB
page of a logged slot, each write-protected by GET_DIRTY_LOG) with the fast page fault on,
against the same pass with it off: the ratio kvm_compare's `fast_page_fault` result times
(<= 0.37 is its target). The first pass (demand faults) and the harvest ride along.

Instruction counts leave out what time adds (cache misses: the slow pass has more), so
the ratio here runs a few hundredths above the timed one. Where valgrind is missing, one
line says so and nothing is measured.

    python benchmarks/fault_instructions.py [--mib 4]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.kvm_compare import (FAST_PF_TARGET, SLOT, check,  # noqa: E402
                                    vmmu_logged_guest)
from benchmarks.report import emit, row  # noqa: E402
from vmmu.server.kvm import resched  # noqa: E402

MiB = 1 << 20
# A child runs up to its phase: "setup", "first" (+ the first pass), "harvested"
# (+ GET_DIRTY_LOG), "fast" / "slow" (+ the second pass, fast page fault on / off).
PHASES = ("setup", "first", "harvested", "fast", "slow")


# Under valgrind Python runs about this many times slower: the children's timeslice is
# as much longer, so that the loop yields (`resched`) about as often per fault as natively
# (with the native 2 ms slice it ended every few faults, and the count took in an event-loop
# turn per few faults that a native run takes once per hundred or more).
VALGRIND_SLOWDOWN = 100


async def child(phase: str, size: int) -> None:
    """kvm_compare's vmmu workload, run up to `phase`."""
    resched.TIMESLICE_NS *= VALGRIND_SLOWDOWN
    vm, vcpu, batch = await vmmu_logged_guest(size, fast_page_fault=phase != "slow")
    n = len(batch)
    if phase == "setup":
        return
    check((await vcpu.run(batch)).completed == n, "the first pass did not complete")
    if phase == "first":
        return
    await vm.get_dirty_log(SLOT)
    if phase == "harvested":
        return
    check((await vcpu.run(batch)).completed == n, "the second pass did not complete")
    check(vcpu.stat.pf_fast == (n if phase == "fast" else 0),
          f"the second pass took the fast path {vcpu.stat.pf_fast} times")


def instructions(phase: str, mib: int) -> int:
    env = dict(os.environ, PYTHONHASHSEED="0")
    done = subprocess.run(["valgrind", "--tool=cachegrind", "--cache-sim=no",
                           "--cachegrind-out-file=/dev/null", sys.executable, __file__,
                           "--child", phase, "--mib", str(mib)],
                          env=env, capture_output=True, text=True, check=True)
    found = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count from valgrind:\n{done.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=4)
    parser.add_argument("--child", choices=PHASES)
    args = parser.parse_args()
    if args.child:
        asyncio.run(child(args.child, args.mib * MiB))
        return
    if shutil.which("valgrind") is None:
        row(benchmark="fault_instructions", skipped="valgrind is not installed")
        return
    pages = args.mib * MiB // 4096
    ir = {phase: instructions(phase, args.mib) for phase in PHASES}
    fast = (ir["fast"] - ir["harvested"]) / pages
    slow = (ir["slow"] - ir["harvested"]) / pages
    emit("fault_instructions.fast_page_fault", fast, "instructions/page",
         "vmmu second pass, fast_page_fault off", slow, limit=FAST_PF_TARGET, digits=0,
         size_mib=args.mib,
         first_pass=round((ir["first"] - ir["setup"]) / pages),
         harvest=round((ir["harvested"] - ir["first"]) / pages))

if __name__ == "__main__":
    main()
