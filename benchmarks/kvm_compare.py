"""The fast-page-fault seed's dirty-logging workload on the host's real KVM and on vmmu.

One run on either side is a fresh VM with one slot logged from creation
(KVM_MEM_LOG_DIRTY_PAGES) over host memory populated up front (MAP_POPULATE on real KVM,
madvise(MADV_POPULATE_WRITE) on vmmu: every page allocated, so no pass pays for that):

1. first pass: the guest writes one byte to every 4 KiB page (a demand fault per page);
2. harvest: KVM_GET_DIRTY_LOG, which clears the log and write-protects every dirty page;
3. second pass: the guest writes every page again (a write-protect fault per page);
4. second harvest.

Real KVM runs through `benchmarks.kvmhost` (a 64-bit CPL-3 guest; time spent in KVM_RUN);
vmmu runs in-process (time spent in `Vcpu.run` over one batch of 1-byte writes, sanitizers
off). vmmu runs each round twice, with the fast page fault on and off, so the seed's own
claim can be checked on the model: the second pass with it on should take at most 0.37 of
the time with it off (532 ms -> 196 ms in the seed).

Every result is one JSON line; each value is the median ns per page over the runs:

    kvm_compare.<phase>           vmmu (fast page fault on) against real KVM, target for the
                                  two passes: ratio <= 2
    kvm_compare.fast_page_fault   vmmu's second pass with the fast page fault on against
                                  off, target: ratio <= 0.37

Both sides check what they measure: every harvest reports every page dirty, and vmmu's
second pass goes through `pf_fast` exactly when the fast page fault is on. Without a usable
/dev/kvm a `kvm_compare.realkvm` line says why and only the vmmu half runs.

    python benchmarks/kvm_compare.py [--size-mib 256] [--runs 3] [--kvm-runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from array import array
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.kvmhost import KvmUnavailable, PHASES, kvm_dirty_log_workload  # noqa: E402
from benchmarks.kvmhost.workload import FAULT_STATS  # noqa: E402
from benchmarks.report import delta, emit  # noqa: E402
from vmmu.server.kvm import (KVM_MEM_LOG_DIRTY_PAGES, AccessBatch, AccessKind,  # noqa: E402
                             Backing, ExitReason, Kvm, VmConfig, make_op)

MiB = 1 << 20
PAGE_SIZE = 4096
SLOT = 1
SLOT_GPA = 1 << 30

PASS_TARGET = 2.0            # vmmu ns/page at most twice real KVM's, for each pass
FAST_PF_TARGET = 0.37        # the seed: 195864447 / 532473698 ns
PASSES = ("first_pass", "second_pass")


def check(ok: bool, message: str) -> None:
    # Not `assert`: the checks must hold under `python -O` too.
    if not ok:
        raise AssertionError(message)


# -- vmmu ----------------------------------------------------------------------------------

def _write_every_page(npages: int) -> AccessBatch:
    gpas = array("Q", range(SLOT_GPA, SLOT_GPA + npages * PAGE_SIZE, PAGE_SIZE)).tobytes()
    ops = bytes([make_op(AccessKind.WRITE, 1, True)]) * npages
    return AccessBatch.from_wire(gpas, ops, b"\x01" * npages)


async def vmmu_logged_guest(size: int, fast_page_fault: bool, name: str = ""):
    """The workload's VM on vmmu: `size` bytes of populated 4K host memory in a logged
    slot at SLOT_GPA, one vCPU, and the batch that writes one byte to every page:
    (vm, vcpu, batch). The caller destroys the VM."""
    vm = Kvm().create_vm(VmConfig(sanitizers=False, fast_page_fault=fast_page_fault,
                                  name=name))
    try:
        region = vm.mmap(size, Backing.PAGE_4K)
        await vm.madvise_populate_write(region.hva, size)      # as MAP_POPULATE on KVM's side
        await vm.set_user_memory_region(SLOT, KVM_MEM_LOG_DIRTY_PAGES, SLOT_GPA, size,
                                        region.hva)
        return vm, vm.create_vcpu(0), _write_every_page(size // PAGE_SIZE)
    except BaseException:
        await vm.destroy()
        raise


async def _vmmu_run(size: int, fast_page_fault: bool
                    ) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """One run of the workload on a fresh vmmu VM: ns per phase, fault counters per pass."""
    npages = size // PAGE_SIZE
    vm, vcpu, batch = await vmmu_logged_guest(
        size, fast_page_fault, name=f"kvm_compare fast_page_fault={fast_page_fault}")
    try:
        elapsed: dict[str, int] = {}
        stats = [vcpu.stats()]
        for phase in PHASES:
            start = time.perf_counter_ns()
            if phase in PASSES:
                result = await vcpu.run(batch)
                elapsed[phase] = time.perf_counter_ns() - start
                check(result.exit.reason is ExitReason.DONE,
                       f"vmmu {phase}: {result.completed} of {npages} writes, exit {result.exit}")
                stats.append(vcpu.stats())
            else:
                bitmap = await vm.get_dirty_log(SLOT)
                elapsed[phase] = time.perf_counter_ns() - start
                dirty = int.from_bytes(bitmap, "little").bit_count()
                check(dirty == npages,
                       f"vmmu {phase}: {dirty} dirty pages of {npages} written")
    finally:
        await vm.destroy()
    return elapsed, {"first_pass": delta(stats[0], stats[1], FAULT_STATS),
                     "second_pass": delta(stats[1], stats[2], FAULT_STATS)}


def _check_second_pass_path(stats: dict[str, int], fast_page_fault: bool, npages: int) -> None:
    # `pf_fixed` counts every RET_PF_FIXED, fast path or slow (reference §8.2); `pf_fast`
    # counts only the fast path's.
    fast = npages if fast_page_fault else 0
    check(stats["pf_fixed"] == npages and stats["pf_fast"] == fast,
           f"fast page fault {'on' if fast_page_fault else 'off'}: the second pass should fix "
           f"{npages} pages, {fast} of them in the fast path; counters {stats}")


async def vmmu_dirty_log_workload(size: int, runs: int) -> dict[bool, dict]:
    """{fast_page_fault: {"ns_per_page", "samples", "vcpu_stats"}} for on and off; the two
    configurations alternate run by run so that drift on the host hits both alike."""
    npages = size // PAGE_SIZE
    out: dict[bool, dict] = {fast: {"samples": {phase: [] for phase in PHASES}, "vcpu_stats": {}}
                             for fast in (True, False)}
    for _ in range(runs):
        for fast in (True, False):
            elapsed, vcpu_stats = await _vmmu_run(size, fast)
            _check_second_pass_path(vcpu_stats["second_pass"], fast, npages)
            for phase, ns in elapsed.items():
                out[fast]["samples"][phase].append(ns / npages)
            out[fast]["vcpu_stats"] = vcpu_stats
    for result in out.values():
        result["ns_per_page"] = {phase: statistics.median(v)
                                 for phase, v in result["samples"].items()}
    return out


# -- the comparison ------------------------------------------------------------------------

def real_kvm(size: int, runs: int) -> dict | None:
    """The workload on real KVM, or None (after saying why) where /dev/kvm is unusable."""
    try:
        return kvm_dirty_log_workload(size, runs)
    except (KvmUnavailable, OSError) as e:
        print(json.dumps({"benchmark": "kvm_compare.realkvm", "available": False,
                          "reason": str(e)}), flush=True)
        return None


def report(size_mib: int, kvm: dict | None, vmmu: dict[bool, dict], runs: int) -> None:
    on, off = vmmu[True], vmmu[False]
    common = {"size_mib": size_mib, "runs": runs}
    for phase in PHASES:
        extra = dict(common, samples=_rounded(on["samples"][phase]))
        if phase in on["vcpu_stats"]:
            extra["vcpu_stats"] = on["vcpu_stats"][phase]
        target = PASS_TARGET if phase in PASSES else None
        if kvm is None:
            emit(f"kvm_compare.{phase}", on["ns_per_page"][phase], "ns/page", None, None,
                 limit=target, digits=1, **extra)
            continue
        extra.update(baseline_runs=kvm["runs"],
                     baseline_samples=_rounded(kvm["samples"][phase]),
                     host=kvm["host"])
        if phase in kvm["vcpu_stats"]:
            extra["baseline_vcpu_stats"] = kvm["vcpu_stats"][phase]
        emit(f"kvm_compare.{phase}", on["ns_per_page"][phase], "ns/page", "realkvm",
             kvm["ns_per_page"][phase], limit=target, digits=1, **extra)
    emit("kvm_compare.fast_page_fault", on["ns_per_page"]["second_pass"], "ns/page",
         "vmmu second pass, fast_page_fault off", off["ns_per_page"]["second_pass"],
         limit=FAST_PF_TARGET, digits=1, **common,
         samples=_rounded(on["samples"]["second_pass"]),
         baseline_samples=_rounded(off["samples"]["second_pass"]),
         vcpu_stats=on["vcpu_stats"]["second_pass"],
         baseline_vcpu_stats=off["vcpu_stats"]["second_pass"],
         seed="532473698 ns -> 195864447 ns")


def _rounded(values: list[float]) -> list[float]:
    return [round(v, 1) for v in values]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3, help="vmmu runs (each: on and off)")
    parser.add_argument("--kvm-runs", type=int, default=5)
    args = parser.parse_args(argv)
    if args.size_mib < 1 or args.runs < 1 or args.kvm_runs < 1:
        parser.error("--size-mib, --runs and --kvm-runs must be at least 1")
    size = args.size_mib * MiB
    kvm = real_kvm(size, args.kvm_runs)
    vmmu = asyncio.run(vmmu_dirty_log_workload(size, args.runs))
    report(args.size_mib, kvm, vmmu, args.runs)


if __name__ == "__main__":
    main()
