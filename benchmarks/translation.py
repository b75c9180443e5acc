"""Per-access translation and the demand fault, each beside the floor CPython sets for it.

    translation.random_tlb       translation-only reads of random gfns over a working set
                                 a quarter larger than the TLB's reach (in pages, each
                                 page taking the entries a read fills): hits are not one
                                 set operation over the batch, and misses walk the EPT.
                                 ns per access (wall, and CPU time: `cpu_ratio`) with
                                 the TLB hit rate seen; baseline: the bare `array('Q')`
                                 loop (one index per access), target <= 3x; beside it, a
                                 bare 4-level walk over the VM's own tables for every
                                 access.
    translation.data_read        8-byte reads returning their data, contiguous over 1024
    translation.data_write       pages that all hit the TLB, against translation-only
                                 reads of the same gpas: target <= 2x (a run of accesses
                                 moves its bytes in one copy)
    translation.demand_fault     kvm_compare's first pass (a 1-byte write to every 4 KiB
                                 page of a logged slot over populated host memory, so one
                                 demand fault per page) against a minimal Python 4-level
                                 walk-and-install over `array('Q')` tables of 512 entries:
                                 ns per page (wall, and CPU time: `cpu_ratio`), target
                                 <= 8x. With --instructions, the same
                                 two counted by valgrind (instructions per page).

Runs alternate between the two sides; each value is the median of the runs.

    python benchmarks/translation.py [--runs 5] [--accesses 200000] [--fault-mib 64]
                                     [--instructions]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from array import array
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.kvm_compare import check, vmmu_logged_guest  # noqa: E402
from benchmarks.fault_instructions import VALGRIND_SLOWDOWN  # noqa: E402
from benchmarks.report import emit, row  # noqa: E402
from vmmu.server.kvm import resched  # noqa: E402
from vmmu.server.kvm import AccessBatch, AccessKind, Backing, Kvm, VmConfig, make_op  # noqa
from vmmu.server.kvm.spte import BASE_ADDR_MASK, make_leaf, make_nonleaf  # noqa: E402
from vmmu.server.kvm.vcpu import TLB_CAPACITY  # noqa: E402

MiB = 1 << 20
TRANSLATE_TARGET = 3.0
FAULT_TARGET = 8.0
DATA_TARGET = 2.0
_FRESH = array("Q", [1 << 63]) * 512


# -- translation ---------------------------------------------------------------------------

def bare_index_ns(gfns: list[int], npages: int) -> tuple[float, float]:
    """ns per access of `for g in gfns: table[g]`, wall and CPU."""
    table = array("Q", range(npages))
    start, cpu = time.perf_counter_ns(), time.process_time_ns()
    for g in gfns:
        table[g]
    return ((time.perf_counter_ns() - start) / len(gfns),
            (time.process_time_ns() - cpu) / len(gfns))


def bare_walk_ns(root, gfns: list[int]) -> float:
    """ns per access of a 4-level walk to the leaf's pfn over the VM's own tables."""
    start = time.perf_counter_ns()
    for g in gfns:
        table = root.children[g >> 27 & 511].children[g >> 18 & 511].children[g >> 9 & 511]
        (table.spt[g & 511] & BASE_ADDR_MASK) >> 12
    return (time.perf_counter_ns() - start) / len(gfns)


async def random_tlb(runs: int, n: int) -> None:
    mapped = TLB_CAPACITY * 5 // 4             # at least a quarter more than the TLB holds
    vm = Kvm().create_vm(VmConfig(sanitizers=False, name="bench-translate"))
    region = vm.mmap(mapped << 12, Backing.PAGE_4K)
    await vm.set_user_memory_region(0, 0, 0, mapped << 12, region.hva)
    vcpu = vm.create_vcpu(0)
    op = make_op(AccessKind.READ, 8, False)
    everything = array("Q", range(0, mapped << 12, 4096)).tobytes()
    await vcpu.run(AccessBatch.from_wire(everything, bytes([op]) * mapped))   # all mapped
    vcpu.flush_tlb()
    await vcpu.run(AccessBatch.from_wire(everything[:8], bytes([op])))
    per_page = len(vcpu.tlb)                   # the entries a read fills for one page
    npages = TLB_CAPACITY // per_page * 5 // 4  # a quarter more pages than the TLB holds
    rng = random.Random(1)
    gfns = [rng.randrange(npages) for _ in range(n)]
    gpas, ops = array("Q", [g << 12 for g in gfns]).tobytes(), bytes([op]) * n

    fills = 0
    fill = vcpu._tlb_fill

    def counting_fill(gpa: int, op: int):
        nonlocal fills
        fills += 1
        return fill(gpa, op)

    vcpu.flush_tlb()
    vcpu._tlb_fill = counting_fill             # a run that counts the walks, untimed
    check((await vcpu.run(AccessBatch.from_wire(gpas, ops))).completed == n, "short run")
    del vcpu._tlb_fill
    hit_rate = 1 - fills / n
    ours, ours_cpu, index, index_cpu, walk = [], [], [], [], []
    root = vcpu.root
    for _ in range(runs):
        vcpu.flush_tlb()                       # every run starts as the counting run did
        start, cpu = time.perf_counter_ns(), time.process_time_ns()
        result = await vcpu.run(AccessBatch.from_wire(gpas, ops))
        ours.append((time.perf_counter_ns() - start) / n)
        ours_cpu.append((time.process_time_ns() - cpu) / n)
        check(result.completed == n, "short run")
        wall, cpu = bare_index_ns(gfns, npages)
        index.append(wall)
        index_cpu.append(cpu)
        walk.append(bare_walk_ns(root, gfns))
    check(vcpu.stats()["pf_taken"] == mapped, "no access after warm-up may fault")
    ns, cpu, base_cpu = (statistics.median(v) for v in (ours, ours_cpu, index_cpu))
    emit("translation.random_tlb", ns, "ns/access", "bare array('Q') index loop",
         statistics.median(index), limit=TRANSLATE_TARGET, digits=1, runs=runs, accesses=n,
         working_set_pages=npages, tlb_capacity=TLB_CAPACITY, tlb_entries_per_page=per_page,
         tlb_pages=TLB_CAPACITY // per_page, tlb_hit_rate=round(hit_rate, 4),
         bare_walk_ns=round(statistics.median(walk), 1),
         ratio_to_bare_walk=round(ns / statistics.median(walk), 3),
         cpu_ns=round(cpu, 1), baseline_cpu_ns=round(base_cpu, 1),
         cpu_ratio=round(cpu / base_cpu, 3), includes="batch decode + run")
    await vm.destroy()


async def data_path(runs: int) -> None:
    npages = 1024
    vm = Kvm().create_vm(VmConfig(sanitizers=False, name="bench-data"))
    region = vm.mmap(npages << 12, Backing.PAGE_4K)
    await vm.set_user_memory_region(0, 0, 0, npages << 12, region.hva)
    vcpu = vm.create_vcpu(0)
    n = npages * 512
    gpas = array("Q", range(0, npages << 12, 8)).tobytes()
    variants = {"translate": (make_op(AccessKind.READ, 8, False), b""),
                "data_read": (make_op(AccessKind.READ, 8, True), b""),
                "data_write": (make_op(AccessKind.WRITE, 8, True),
                               bytes(range(256)) * (n // 32))}
    for op, data in variants.values():                 # map every page writable, dirty
        await vcpu.run(AccessBatch.from_wire(gpas, bytes([op]) * n, data))
    warm = vcpu.stats()["pf_taken"]
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(runs):
        for name, (op, data) in variants.items():
            start = time.perf_counter_ns()
            result = await vcpu.run(AccessBatch.from_wire(gpas, bytes([op]) * n, data))
            samples[name].append((time.perf_counter_ns() - start) / n)
            check(result.completed == n, "short run")
            if name == "data_read":
                check(result.read_data == bytes(range(256)) * (n // 32), "data read back")
    check(vcpu.stats()["pf_taken"] == warm, "no fault after warm-up")
    base = statistics.median(samples["translate"])
    for name in ("data_read", "data_write"):
        emit(f"translation.{name}", statistics.median(samples[name]), "ns/access",
             "translation-only read, same gpas", base, limit=DATA_TARGET, digits=1,
             runs=runs, accesses=n,
             samples=[round(v, 1) for v in samples[name]],
             baseline_samples=[round(v, 1) for v in samples["translate"]],
             includes="batch decode + run")
    await vm.destroy()


# -- the demand fault ----------------------------------------------------------------------

class _Table:
    __slots__ = ("spt", "children", "pfn")

    def __init__(self, pfn: int) -> None:
        self.spt, self.children, self.pfn = array("Q", _FRESH), [None] * 512, pfn


def floor_faults(npages: int, first_gfn: int, host_pfns: dict[int, int]) -> None:
    """The floor: for each page, walk 4 levels of `array('Q')` tables from the root,
    linking a fresh table where none is, and install a writable leaf for the pfn the
    host maps there (a dict lookup)."""
    next_pfn = 0x1000
    root = _Table(next_pfn)
    for gfn in range(first_gfn, first_gfn + npages):
        table = root
        for shift in (27, 18, 9):
            i = gfn >> shift & 511
            child = table.children[i]
            if child is None:
                next_pfn += 1
                child = table.children[i] = _Table(next_pfn)
                table.spt[i] = make_nonleaf(next_pfn, True)
            table = child
        table.spt[gfn & 511] = make_leaf(host_pfns[gfn], 1, True, True, True)


def _host_pfns(vm, slot_gfn: int, hva: int, npages: int) -> dict[int, int]:
    return {slot_gfn + i: vm.host.current_pfn(hva + (i << 12)) for i in range(npages)}


async def demand_fault(runs: int, size: int) -> tuple[float, float]:
    """Wall and CPU time of both sides: on a host with more runnable processes than
    cores the scheduler shares the CPU fairly over vmmu's long pass (about a second at
    64 MiB) but not over the floor's short burst, so under load the CPU-time ratio is
    the one to read."""
    npages = size >> 12
    ours, floor, ours_cpu, floor_cpu = [], [], [], []
    for _ in range(runs):
        vm, vcpu, batch = await vmmu_logged_guest(size, fast_page_fault=True)
        try:
            slot = vm.memslot_sets[0].by_id[1]
            pfns = _host_pfns(vm, slot.base_gfn, slot.userspace_addr, npages)
            start, cpu = time.perf_counter_ns(), time.process_time_ns()
            floor_faults(npages, slot.base_gfn, pfns)
            floor.append((time.perf_counter_ns() - start) / npages)
            floor_cpu.append((time.process_time_ns() - cpu) / npages)
            start, cpu = time.perf_counter_ns(), time.process_time_ns()
            result = await vcpu.run(batch)
            ours.append((time.perf_counter_ns() - start) / npages)
            ours_cpu.append((time.process_time_ns() - cpu) / npages)
            check(result.completed == npages and vcpu.stat.pf_fixed == npages,
                  f"{result.completed} writes, {vcpu.stat.pf_fixed} faults fixed")
        finally:
            await vm.destroy()
    ns, base = statistics.median(ours), statistics.median(floor)
    cpu, base_cpu = statistics.median(ours_cpu), statistics.median(floor_cpu)
    emit("translation.demand_fault", ns, "ns/page", "Python 4-level walk-and-install",
         base, limit=FAULT_TARGET, digits=1, runs=runs, size_mib=size >> 20,
         samples=[round(v) for v in ours], baseline_samples=[round(v) for v in floor],
         cpu_ns=round(cpu, 1), baseline_cpu_ns=round(base_cpu, 1),
         cpu_ratio=round(cpu / base_cpu, 3))
    return ns, base


# -- instructions (valgrind) ---------------------------------------------------------------

async def child(pages: int, walk: bool) -> None:
    """A fresh logged guest of `pages` pages and its host pfns, then the floor over every
    page if `walk` (two children differ only by the floor's walks)."""
    resched.TIMESLICE_NS *= VALGRIND_SLOWDOWN        # as fault_instructions' children
    vm, _, _ = await vmmu_logged_guest(pages << 12, fast_page_fault=True)
    slot = vm.memslot_sets[0].by_id[1]
    pfns = _host_pfns(vm, slot.base_gfn, slot.userspace_addr, pages)
    if walk:
        floor_faults(pages, slot.base_gfn, pfns)


def floor_instructions(pages: int, walk: bool) -> int:
    env = dict(os.environ, PYTHONHASHSEED="0")
    done = subprocess.run(["valgrind", "--tool=cachegrind", "--cache-sim=no",
                           "--cachegrind-out-file=/dev/null", sys.executable, __file__,
                           "--child-pages", str(pages)] + (["--child-walk"] if walk else []),
                          env=env, capture_output=True, text=True, check=True)
    found = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count from valgrind:\n{done.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def instructions(mib: int) -> None:
    if shutil.which("valgrind") is None:
        row(benchmark="translation.demand_fault_instructions",
            skipped="valgrind is not installed")
        return
    from benchmarks.fault_instructions import instructions as vmmu_instructions
    pages = mib * MiB // 4096
    floor = (floor_instructions(pages, True) - floor_instructions(pages, False)) / pages
    ours = (vmmu_instructions("first", mib) - vmmu_instructions("setup", mib)) / pages
    emit("translation.demand_fault_instructions", ours, "instructions/page",
         "Python 4-level walk-and-install", floor, limit=FAULT_TARGET, digits=1,
         size_mib=mib)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--accesses", type=int, default=200_000)
    parser.add_argument("--fault-mib", type=int, default=64)
    parser.add_argument("--instructions", action="store_true",
                        help="also count instructions per page with valgrind (4 MiB)")
    parser.add_argument("--child-pages", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-walk", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_pages is not None:
        asyncio.run(child(args.child_pages, args.child_walk))
        return
    if min(args.runs, args.accesses, args.fault_mib) < 1:
        parser.error("--runs, --accesses and --fault-mib must be at least 1")
    asyncio.run(random_tlb(args.runs, args.accesses))
    asyncio.run(data_path(args.runs))
    asyncio.run(demand_fault(args.runs, args.fault_mib * MiB))
    if args.instructions:
        instructions(4)


if __name__ == "__main__":
    main()
