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

The two sides alternate run by run (a real-KVM run, then vmmu with the fast page fault on
and off), so that drift on a shared host hits both alike. Every line says what the host's
KVM is (`host`: shadow paging or TDP, PVM, nested, A/D and PML where TDP, and whether its
second pass took the fast page fault) and how each side populated memory (`populate`); a
first `kvm_compare.host` line lists every kvm module parameter.
    kvm_compare.harvest           target: ratio <= 3 (GET_DIRTY_LOG, every page dirty)

    python benchmarks/kvm_compare.py [--size-mib 256] [--runs 3] [--kvm-runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from array import array
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.kvmhost import KvmUnavailable, PHASES, kvm_dirty_log_workload  # noqa: E402
from vmmu.kvmhost.workload import FAULT_STATS, host_facts  # noqa: E402
from benchmarks.report import delta, emit, row  # noqa: E402
from vmmu.server.kvm import (KVM_MEM_LOG_DIRTY_PAGES, AccessBatch, AccessKind,  # noqa: E402
                             Backing, ExitReason, Kvm, VmConfig, make_op)

MiB = 1 << 20
PAGE_SIZE = 4096
SLOT = 1
SLOT_GPA = 1 << 30

PASS_TARGET = 2.0            # vmmu ns/page at most twice real KVM's, for each pass
HARVEST_TARGET = 3.0         # GET_DIRTY_LOG of every page dirty: at most 3x real KVM's
# How each side has every host page allocated before the first pass.
POPULATE = {"realkvm": "mmap(MAP_POPULATE)", "vmmu": "madvise(MADV_POPULATE_WRITE)"}
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


def _new_vmmu_results() -> dict[bool, dict]:
    return {fast: {"samples": {phase: [] for phase in PHASES}, "vcpu_stats": {}}
            for fast in (True, False)}


async def vmmu_dirty_log_round(size: int, out: dict[bool, dict]) -> None:
    """One run with the fast page fault on and one with it off, added to `out`."""
    npages = size // PAGE_SIZE
    for fast in (True, False):
        elapsed, vcpu_stats = await _vmmu_run(size, fast)
        _check_second_pass_path(vcpu_stats["second_pass"], fast, npages)
        for phase, ns in elapsed.items():
            out[fast]["samples"][phase].append(ns / npages)
        out[fast]["vcpu_stats"] = vcpu_stats


def _medians(result: dict) -> dict:
    result["ns_per_page"] = {phase: statistics.median(v)
                             for phase, v in result["samples"].items()}
    return result


# -- the comparison ------------------------------------------------------------------------

def real_kvm_run(size: int) -> dict | None:
    """One run of the workload on real KVM, or None (after saying why) where /dev/kvm is
    unusable."""
    try:
        return kvm_dirty_log_workload(size, 1)
    except (KvmUnavailable, OSError) as e:
        row(benchmark="kvm_compare.realkvm", available=False, reason=str(e))
        return None


async def interleaved(size: int, runs: int, kvm_runs: int) -> tuple[dict | None, dict]:
    """Real-KVM runs and vmmu rounds alternated: (real KVM's results or None, vmmu's)."""
    kvm: dict | None = None
    kvm_ok = True
    vmmu = _new_vmmu_results()
    for round_ in range(max(runs, kvm_runs)):
        if kvm_ok and round_ < kvm_runs:
            one = real_kvm_run(size)
            if one is None:
                kvm_ok = False
            elif kvm is None:
                kvm = one
            else:
                for phase in PHASES:
                    kvm["samples"][phase] += one["samples"][phase]
                kvm["vcpu_stats"], kvm["runs"] = one["vcpu_stats"], kvm["runs"] + 1
        if round_ < runs:
            await vmmu_dirty_log_round(size, vmmu)
    for result in vmmu.values():
        _medians(result)
    return (_medians(kvm) if kvm is not None else None), vmmu


def describe_host(kvm: dict | None) -> dict:
    """The host's KVM in a few fields, for every line: `host_facts` without the module
    parameters, and whether its second pass took the fast page fault."""
    facts = host_facts()
    facts.pop("module_parameters")
    facts["fast_page_fault_taken"] = None if kvm is None else \
        kvm["vcpu_stats"]["second_pass"].get("pf_fast", 0) > 0
    return facts


def report(size_mib: int, kvm: dict | None, vmmu: dict[bool, dict], runs: int) -> None:
    on, off = vmmu[True], vmmu[False]
    common = {"size_mib": size_mib, "runs": runs, "host": describe_host(kvm),
              "populate": POPULATE, "interleaved": True}
    for phase in PHASES:
        extra = dict(common, samples=_rounded(on["samples"][phase]))
        if phase in on["vcpu_stats"]:
            extra["vcpu_stats"] = on["vcpu_stats"][phase]
        target = PASS_TARGET if phase in PASSES else HARVEST_TARGET
        if kvm is None:
            emit(f"kvm_compare.{phase}", on["ns_per_page"][phase], "ns/page", None, None,
                 limit=target, digits=1, **extra)
            continue
        extra.update(baseline_runs=kvm["runs"],
                     baseline_samples=_rounded(kvm["samples"][phase]))
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
    row(benchmark="kvm_compare.host", **host_facts(), populate=POPULATE)
    kvm, vmmu = asyncio.run(interleaved(size, args.runs, args.kvm_runs))
    report(args.size_mib, kvm, vmmu, args.runs)


if __name__ == "__main__":
    main()
