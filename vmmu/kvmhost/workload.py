"""The fast-page-fault seed's dirty-logging workload, run on the host's real KVM.

One run is a fresh VM with one logged slot (KVM_MEM_LOG_DIRTY_PAGES from creation) over
host memory populated up front, so no pass pays for host page faults:

1. first pass: the guest writes one byte to every 4 KiB page: one demand fault per page
   (a writable 4K SPTE is made and the page marked dirty; a logged slot never gets huge
   SPTEs);
2. harvest: KVM_GET_DIRTY_LOG (get-and-clear: every dirty page is write-protected again);
3. second pass: the guest writes every page again: one write-protect fault per page;
4. second harvest.

Both harvests must report every page dirty, or the run raises. Each phase is reported in ns
per page, median over the runs; a pass's time is the time spent in KVM_RUN, including the
one KVM_EXIT_IO that ends it. The vCPU's fault counters over each pass (`FAULT_STATS`, from
the last run) say which path KVM took: `pf_fast` counts the lockless fast page fault of the
seed, `pf_fixed` the slow path.
"""

from __future__ import annotations

import glob
import os
import statistics
import time

from .stats import delta
from . import abi, guest
from .vm import PAGE_SIZE, RealVm

__all__ = ["MiB", "PHASES", "FAULT_STATS", "kvm_dirty_log_workload", "host_facts"]

MiB = 1 << 20
PHASES = ("first_pass", "harvest", "second_pass", "second_harvest")
FAULT_STATS = ("exits", "pf_taken", "pf_fast", "pf_fixed", "pf_spurious", "pf_emulate")

_SLOT = 1
_SLOT_GPA = 1 << 30


def kvm_dirty_log_workload(size: int = 256 * MiB, runs: int = 5) -> dict:
    """Run the workload `runs` times over a `size`-byte slot.

    Returns {"size", "pages", "runs", "ns_per_page": {phase: median}, "samples":
    {phase: [ns/page per run]}, "vcpu_stats": {"first_pass"|"second_pass": {stat: count}},
    "host": host_facts()} with phases `PHASES` and stats `FAULT_STATS`.
    """
    if size <= 0 or size % PAGE_SIZE or _SLOT_GPA + size > guest.MAPPED_LIMIT:
        raise ValueError(f"size {size:#x}: must be whole pages, at most "
                         f"{(guest.MAPPED_LIMIT - _SLOT_GPA) >> 20} MiB")
    if runs < 1:
        raise ValueError(f"runs {runs}: must be at least 1")
    samples: dict[str, list[float]] = {phase: [] for phase in PHASES}
    pages = size // PAGE_SIZE
    for _ in range(runs):
        elapsed, vcpu_stats = _one_run(size)
        for phase, ns in elapsed.items():
            samples[phase].append(ns / pages)
    return {"size": size, "pages": pages, "runs": runs,
            "ns_per_page": {phase: statistics.median(v) for phase, v in samples.items()},
            "samples": samples, "vcpu_stats": vcpu_stats, "host": host_facts()}


def _one_run(size: int) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    with RealVm() as vm:
        slot = vm.add_slot(_SLOT, _SLOT_GPA, size, abi.KVM_MEM_LOG_DIRTY_PAGES, populate=True)
        end = slot.gpa + slot.size
        before = vm.vcpu_stats()
        first = vm.write_stride(slot.gpa, end)
        after_first = vm.vcpu_stats()
        harvest = _timed_harvest(vm, slot.npages)
        second = vm.write_stride(slot.gpa, end)
        after_second = vm.vcpu_stats()
        second_harvest = _timed_harvest(vm, slot.npages)
    elapsed = dict(zip(PHASES, (first, harvest, second, second_harvest)))
    return elapsed, {"first_pass": delta(before, after_first, FAULT_STATS),
                     "second_pass": delta(after_first, after_second, FAULT_STATS)}


def _timed_harvest(vm: RealVm, npages: int) -> int:
    start = time.perf_counter_ns()
    bitmap = vm.get_dirty_log(_SLOT)
    elapsed = time.perf_counter_ns() - start
    dirty = int.from_bytes(bitmap, "little").bit_count()
    if dirty != npages:
        raise RuntimeError(f"harvest reported {dirty} dirty pages of {npages} written")
    return elapsed


def host_facts() -> dict:
    """What the host's KVM is, as far as the host tells: kernel release, the MMU that
    builds the guest's page tables (shadow paging or TDP, and with PVM always shadow),
    whether it runs nested (the CPU's `hypervisor` flag), the A/D and PML switches, and
    every parameter of the loaded kvm modules (/sys/module/kvm*/parameters)."""
    params: dict[str, dict[str, str]] = {}
    for module in sorted(glob.glob("/sys/module/kvm*")):
        values = {}
        for path in sorted(glob.glob(os.path.join(module, "parameters", "*"))):
            try:
                with open(path) as f:
                    values[os.path.basename(path)] = f.read().strip()
            except OSError:
                continue
        params[os.path.basename(module)] = values
    kvm, intel, amd = (params.get(m, {}) for m in ("kvm", "kvm_intel", "kvm_amd"))
    pvm = "kvm_pvm" in params
    tdp = not pvm and (intel.get("ept") == "Y" or amd.get("npt") in ("1", "Y"))
    try:
        with open("/proc/cpuinfo") as f:
            nested = any(line.startswith("flags") and " hypervisor" in line for line in f)
    except OSError:
        nested = None
    return {"kernel": os.uname().release, "tdp_mmu": kvm.get("tdp_mmu"), "pvm": pvm,
            "paging": "tdp" if tdp else "shadow", "nested": nested,
            "ept_ad": intel.get("eptad") if tdp else None,
            "pml": intel.get("pml") if tdp else None,
            "eager_page_split": kvm.get("eager_page_split"), "module_parameters": params}
