"""`vmmu calibrate`: the cost table of virtual time, measured on the host's /dev/kvm.

A guest (`vmmu.kvmhost`) runs on the real KVM and these are timed, each the median of
`runs` runs, per 4K page where it says so:

    exit_round_trip    a KVM_RUN whose guest leaves at once by OUT (KVM_EXIT_IO): VM entry,
                       exit and the return to userspace; the median of `exits` of them
    demand_fault       per page: the guest writes one byte to every page of a dirty-logged
                       slot whose host memory is populated: one EPT violation each, fixed
                       in KVM (`kvm_dirty_log_workload`'s first pass)
    host_fault         the same over host memory not populated: the demand fault and the
                       host mm's fault behind it (4K pages unless THP is "always")
    wp_fault           per page: the same writes again after GET_DIRTY_LOG write-protected
                       every page (its second pass)
    get_dirty_log      per page: KVM_GET_DIRTY_LOG of that slot

and become the costs the model charges for the same steps (docs/virtual-time.md), the
others keeping their defaults:

    vmexit_entry       = exit_round_trip
    fault_base         = demand_fault - exit_round_trip - what the model's fault path
                         charges besides (FAULT_PATH_REST at their defaults)
    gup_slow, page_alloc_4k, page_zero_4k
                       = host_fault - demand_fault, shared in the defaults' proportions
    fast_pf            = wp_fault - exit_round_trip - fault_base - FAST_PATH_REST, only if
                       KVM fixed most write-protect faults on its fast path (`pf_fast`);
                       else the wp fault took the slow path, and is only recorded
    dirty_bitmap_word  = 64 x get_dirty_log per page

A difference below zero is 0. The exit round trip includes the return to userspace, which
a fault handled in KVM does not pay: where that return dominates (PVM, whose exits are
world switches), a demand fault can cost less than the round trip and `fault_base` comes
out 0, the exit cost being an upper bound. The file is {"costs": {name: ns}, "measured": {...}}, which
`load_cost_file` (model and client) reads.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping

from vmmu.kvmhost import RealVm, kvm_dirty_log_workload
from vmmu.kvmhost.abi import KVM_MEM_LOG_DIRTY_PAGES
from vmmu.kvmhost.vm import PAGE_SIZE
from vmmu.kvmhost.workload import host_facts
from vmmu.server.kvm.costs import DEFAULT_COSTS, check_costs

__all__ = ["measure", "costs_of", "calibrate", "dumps", "FAULT_PATH_REST", "FAST_PATH_REST",
           "HOST_FAULT_SHARES"]

MiB = 1 << 20
SLOT, SLOT_GPA = 1, 1 << 30
# What the model charges on a 4K demand fault (4-level EPT) besides its exit and
# `fault_base`, cost name -> times: the memslot lookup, GUP-fast, mmu_lock taken and
# released, the walk from the root to the 4K level, the new leaf built and installed.
FAULT_PATH_REST = {"memslot_lookup": 1, "gup_fast": 1, "lock_acquire": 2,
                   "tdp_walk_level": 4, "make_spte": 1, "spte_cmpxchg": 1}
# ... and on a fast page fault besides its exit, `fault_base` and `fast_pf`.
FAST_PATH_REST = {"memslot_lookup": 1, "spte_cmpxchg": 1}
HOST_FAULT_SHARES = ("gup_slow", "page_alloc_4k", "page_zero_4k")


def measure(size: int = 64 * MiB, runs: int = 3, exits: int = 2000) -> dict:
    """The raw numbers (ns; per page where per page), and the host they come from.
    Raises KvmUnavailable without a usable /dev/kvm, OSError if an ioctl fails."""
    with RealVm() as vm:
        exit_round_trip = statistics.median(vm.write_stride(0, 0) for _ in range(exits))
    workload = kvm_dirty_log_workload(size, runs)
    per_page = workload["ns_per_page"]
    host_fault = statistics.median(_host_fault(size) for _ in range(runs))
    second_pass = workload["vcpu_stats"]["second_pass"]
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="ascii") as f:
            thp = f.read().strip()
    except OSError:
        thp = None
    return {"exit_round_trip": exit_round_trip, "demand_fault": per_page["first_pass"],
            "host_fault": host_fault, "wp_fault": per_page["second_pass"],
            "get_dirty_log": per_page["harvest"],
            "wp_fault_fast": second_pass.get("pf_fast", 0),
            "wp_fault_taken": second_pass.get("pf_taken", 0),
            "size": size, "runs": runs, "exits": exits,
            "host": {**host_facts(), "transparent_hugepage": thp}}


def _host_fault(size: int) -> float:
    """ns per page of a first write to host memory that is not populated yet."""
    with RealVm() as vm:
        slot = vm.add_slot(SLOT, SLOT_GPA, size, KVM_MEM_LOG_DIRTY_PAGES)
        return vm.write_stride(slot.gpa, slot.gpa + size) / (size // PAGE_SIZE)


def costs_of(measured: Mapping) -> dict[str, int]:
    """The cost overrides the numbers of `measure` give (the rules of the docstring)."""
    d = DEFAULT_COSTS
    exit_ns = measured["exit_round_trip"]
    fault_base = measured["demand_fault"] - exit_ns - _charged(FAULT_PATH_REST)
    host = measured["host_fault"] - measured["demand_fault"]
    shares = sum(d[n] for n in HOST_FAULT_SHARES)
    costs = {"vmexit_entry": exit_ns, "fault_base": fault_base,
             **{n: host * d[n] / shares for n in HOST_FAULT_SHARES},
             "dirty_bitmap_word": 64 * measured["get_dirty_log"]}
    if measured["wp_fault_fast"] * 2 > measured["wp_fault_taken"]:
        costs["fast_pf"] = (measured["wp_fault"] - exit_ns - max(fault_base, 0) -
                            _charged(FAST_PATH_REST))
    costs = {name: max(0, round(ns)) for name, ns in costs.items()}
    check_costs(costs)
    return costs


def _charged(times: Mapping[str, int]) -> int:
    return sum(DEFAULT_COSTS[name] * n for name, n in times.items())


def calibrate(size: int = 64 * MiB, runs: int = 3, exits: int = 2000) -> dict:
    """The cost file's contents: {"costs": {name: ns}, "measured": {...}}."""
    measured = measure(size, runs, exits)
    return {"costs": costs_of(measured), "measured": measured}


def dumps(cost_file: Mapping) -> str:
    """A cost file as JSON text, keys sorted."""
    return json.dumps(cost_file, indent=2, sort_keys=True) + "\n"
