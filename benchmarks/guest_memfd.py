"""Private memory benchmarks: the demand fault served from a guest_memfd, the shared fault
of a VM that has private memory elsewhere, and an attribute conversion with its refault.

Each result is the median of several runs with its ratio to a baseline measured in the same
run, alternating: the 4K shared demand fault of a VM that never used private memory.

    python benchmarks/guest_memfd.py [--runs 5] [--faults 16384]
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

from benchmarks.report import emit  # noqa: E402
from vmmu.server.kvm import AccessBatch, AccessKind, Backing, Kvm, VmConfig, make_op  # noqa: E402
from vmmu.server.kvm.mem_attributes import KVM_MEMORY_ATTRIBUTE_PRIVATE  # noqa: E402
from vmmu.server.kvm.memslots import KVM_MEM_GUEST_MEMFD  # noqa: E402

PAGE = 4096


def _writes(faults: int) -> AccessBatch:
    gpas = array("Q", [g * PAGE for g in range(faults)]).tobytes()
    return AccessBatch.from_wire(gpas, bytes([make_op(AccessKind.WRITE, 8, False)]) * faults)


async def _vm(faults: int, case: str):
    """A fresh VM with one slot of `faults` pages at gpa 0: `shared` without private
    memory, `private` all private from a guest_memfd, `shared_elsewhere` a guest_memfd slot
    with one private page past the measured range."""
    vm = Kvm().create_vm(VmConfig(sanitizers=False))
    size = (faults + 1) * PAGE
    region = vm.mmap(size, Backing.PAGE_4K)
    if case == "shared":
        await vm.set_user_memory_region(0, 0, 0, size, region.hva)
    else:
        fd = vm.create_guest_memfd(size).fd
        await vm.set_user_memory_region(0, KVM_MEM_GUEST_MEMFD, 0, size, region.hva, fd, 0)
        start = 0 if case == "private" else faults * PAGE
        await vm.set_memory_attributes(start, size - start, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    return vm, vm.create_vcpu(0)


async def _fault_ns(faults: int, case: str) -> float:
    vm, vcpu = await _vm(faults, case)
    batch = _writes(faults)
    start = time.perf_counter()
    result = await vcpu.run(batch)
    ns = (time.perf_counter() - start) / faults * 1e9
    assert result.completed == faults and vcpu.stats()["pf_fixed"] == faults
    return ns


async def demand_faults(runs: int, faults: int) -> None:
    samples: dict[str, list[float]] = {"shared": [], "private": [], "shared_elsewhere": []}
    for _ in range(runs):
        for case in samples:                      # alternating, so that noise is shared
            samples[case].append(await _fault_ns(faults, case))
    base = statistics.median(samples["shared"])
    for case, name in (("private", "private_demand_fault_4k"),
                       ("shared_elsewhere", "shared_demand_fault_4k_with_private_memory")):
        ns = statistics.median(samples[case])
        emit(name, 1e9 / ns, "faults/s", "shared_demand_fault_4k", 1e9 / base,
             ratio=ns / base, runs=runs, ns_per_fault=round(ns, 1),
             baseline_ns_per_fault=round(base, 1))


async def conversions(runs: int, faults: int) -> None:
    """Make every page private (one call: zap, then the store), then refault them all:
    per page, against the shared demand fault."""
    ours, bare = [], []
    for _ in range(runs):
        vm, vcpu = await _vm(faults, "shared_elsewhere")
        batch = _writes(faults)
        await vcpu.run(batch)
        start = time.perf_counter()
        await vm.set_memory_attributes(0, faults * PAGE, KVM_MEMORY_ATTRIBUTE_PRIVATE)
        result = await vcpu.run(batch)
        ours.append((time.perf_counter() - start) / faults * 1e9)
        assert result.completed == faults
        bare.append(await _fault_ns(faults, "shared"))
    ns, base = statistics.median(ours), statistics.median(bare)
    emit("convert_to_private_and_refault_4k", 1e9 / ns, "pages/s", "shared_demand_fault_4k",
         1e9 / base, ratio=ns / base, runs=runs, ns_per_page=round(ns, 1))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--faults", type=int, default=16384)
    args = parser.parse_args()
    await demand_faults(args.runs, args.faults)
    await conversions(args.runs, args.faults)


if __name__ == "__main__":
    asyncio.run(main())
