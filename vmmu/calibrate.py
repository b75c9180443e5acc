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
others keeping their defaults. What the model charges on a fault besides the costs being
calibrated is not written down here: it is found by running the model's own fault path on
the same workload (`model_ns_per_page`: a 4 MiB dirty-logged slot over populated host
memory, written, harvested, written again, in virtual time), so that it follows whatever
the fault path charges:

    vmexit_entry       = exit_round_trip
    fault_base         = demand_fault - the model's first pass per page with fault_base 0
                         (and vmexit_entry as above): the model's demand fault then takes
                         what KVM's took
    gup_slow, page_alloc_4k, page_zero_4k
                       = host_fault - demand_fault, shared in the defaults' proportions
    fast_pf            = wp_fault - the model's second pass per page with fast_pf 0 (and
                         fault_base as above), only if KVM fixed most write-protect faults
                         on its fast path (`pf_fast`); else the wp fault took the slow
                         path, and is only recorded
    dirty_bitmap_word  = 64 x get_dirty_log per page

A difference below zero is 0. The exit round trip includes the return to userspace, which
a fault handled in KVM does not pay: where that return dominates (PVM, whose exits are
world switches), a demand fault can cost less than the round trip and `fault_base` comes
out 0, the exit cost being an upper bound. The file is {"costs": {name: ns}, "measured": {...}}, which
`load_cost_file` (model and client; the format is `vmmu.cost_file`) reads.
"""

from __future__ import annotations

import asyncio
import json
import statistics
from collections.abc import Mapping

from vmmu.kvmhost import RealVm, kvm_dirty_log_workload
from vmmu.kvmhost.abi import KVM_MEM_LOG_DIRTY_PAGES
from vmmu.kvmhost.vm import PAGE_SIZE
from vmmu.kvmhost.workload import host_facts
from vmmu.server.kvm import AccessBatch, AccessKind, Backing, Kvm, VmConfig
from vmmu.server.kvm.costs import DEFAULT_COSTS, check_costs

__all__ = ["measure", "costs_of", "calibrate", "dumps", "model_ns_per_page",
           "HOST_FAULT_SHARES"]

MiB = 1 << 20
SLOT, SLOT_GPA = 1, 1 << 30
MODEL_PAGES = 1024                    # the model's run of the workload: 4 MiB
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
    exit_ns = max(0, round(measured["exit_round_trip"]))
    first, _ = model_ns_per_page({"vmexit_entry": exit_ns, "fault_base": 0})
    fault_base = max(0, round(measured["demand_fault"] - first))
    host = measured["host_fault"] - measured["demand_fault"]
    shares = sum(d[n] for n in HOST_FAULT_SHARES)
    costs = {"vmexit_entry": exit_ns, "fault_base": fault_base,
             **{n: host * d[n] / shares for n in HOST_FAULT_SHARES},
             "dirty_bitmap_word": 64 * measured["get_dirty_log"]}
    if measured["wp_fault_fast"] * 2 > measured["wp_fault_taken"]:
        _, second = model_ns_per_page({"vmexit_entry": exit_ns, "fault_base": fault_base,
                                       "fast_pf": 0})
        costs["fast_pf"] = measured["wp_fault"] - second
    costs = {name: max(0, round(ns)) for name, ns in costs.items()}
    check_costs(costs)
    return costs


def model_ns_per_page(costs: Mapping[str, int]) -> tuple[float, float]:
    """Virtual ns per page that the model charges with `costs` on `measure`'s workload:
    one vCPU writes a byte to every page of a dirty-logged slot over populated host
    memory (a demand fault each), GET_DIRTY_LOG, and writes again (a write-protect fault
    each): (first pass, second pass)."""
    return asyncio.run(_model_passes(dict(costs)))


async def _model_passes(costs: dict[str, int]) -> tuple[float, float]:
    size = MODEL_PAGES * PAGE_SIZE
    kvm = Kvm()
    try:
        vm = kvm.create_vm(VmConfig(clock="virtual", sanitizers=False, costs=costs))
        region = vm.mmap(size, Backing.PAGE_4K)
        await vm.madvise_populate_write(region.hva, size)
        await vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, size, region.hva)
        vcpu = vm.create_vcpu(0)
        writes = AccessBatch.build([(page * PAGE_SIZE, AccessKind.WRITE, 1, b"x")
                                    for page in range(MODEL_PAGES)])
        first = await vcpu.run(writes)
        await vm.get_dirty_log(0)
        second = await vcpu.run(writes)
        return ((first.end_ns - first.start_ns) / MODEL_PAGES,
                (second.end_ns - second.start_ns) / MODEL_PAGES)
    finally:
        await kvm.shutdown()


def calibrate(size: int = 64 * MiB, runs: int = 3, exits: int = 2000) -> dict:
    """The cost file's contents: {"costs": {name: ns}, "measured": {...}}."""
    measured = measure(size, runs, exits)
    return {"costs": costs_of(measured), "measured": measured}


def dumps(cost_file: Mapping) -> str:
    """A cost file as JSON text, keys sorted."""
    return json.dumps(cost_file, indent=2, sort_keys=True) + "\n"
