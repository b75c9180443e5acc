"""Concurrency benchmarks: invalidation cycles, big zaps, mmu_lock, preemption points.

One JSON line per result, medians of several runs, each with its same-run baseline:
- `invalidate_refault_per_page`: invalidate_range_start/end of one mapped page and the
  vCPU's refault of it, against a first-touch demand fault;
- `zap_1g_4k`: munmap of 1 GiB mapped at 4K (262144 leaf SPTEs), ns per SPTE, alone and
  with a reader waiting for mmu_lock (then it yields), against a bare loop over the SPTEs;
- `mmu_lock_uncontended`: read and write acquire/release against `await asyncio.sleep(0)`;
- `preemption_points`: demand-fault cost with the fault path's preemption points, against
  the same fault path compiled with the points removed (target <= 1.05x).

    python benchmarks/concurrency.py [--runs 5]
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import inspect
import statistics
import sys
import time
import types
from array import array
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import emit  # noqa: E402
from vmmu.server.kvm import (AccessBatch, AccessKind, Backing, Kvm, VmConfig,  # noqa: E402
                             make_op)
from vmmu.server.kvm import mmu as mmu_module  # noqa: E402
from vmmu.server.kvm import vcpu as vcpu_module  # noqa: E402

GiB = 1 << 30


async def guest(pages: int, backing: Backing = Backing.PAGE_4K):
    vm = Kvm().create_vm(VmConfig(sanitizers=False, name="bench"))
    region = vm.mmap(pages << 12, backing)
    await vm.set_user_memory_region(0, 0, 0, pages << 12, region.hva)
    return vm, vm.create_vcpu(0), region


def reads(gfns) -> AccessBatch:
    gfns = list(gfns)
    return AccessBatch.from_wire(array("Q", [g << 12 for g in gfns]).tobytes(),
                                 bytes([make_op(AccessKind.READ, 8, False)]) * len(gfns))


async def invalidate_refault(runs: int, pages: int = 4096) -> None:
    cycle, first = [], []
    for _ in range(runs):
        vm, vcpu, region = await guest(pages)
        start = time.perf_counter()
        await vcpu.run(reads(range(pages)))
        first.append((time.perf_counter() - start) / pages * 1e9)
        one = [reads([g]) for g in range(pages)]
        start = time.perf_counter()
        for g in range(pages):
            hva = region.hva + (g << 12)
            await vm.notifier.invalidate_range_start(hva, hva + 4096)
            await vm.notifier.invalidate_range_end(hva, hva + 4096)
            await vcpu.run(one[g])
        cycle.append((time.perf_counter() - start) / pages * 1e9)
        assert vcpu.stats()["pf_fixed"] == 2 * pages
    emit("invalidate_refault_per_page", statistics.median(cycle), "ns", "demand_fault",
         statistics.median(first), digits=2, runs=runs, pages=pages)


async def zap_1g(runs: int) -> None:
    pages = GiB >> 12
    alone, contended, bare, yields = [], [], [], []
    for contend in (False, True) * runs:
        vm, vcpu, region = await guest(pages)
        await vcpu.run(reads(range(pages)))
        assert vm.stat.pages_4k == pages
        waiter = None
        if contend:
            await vm.mmu_lock.acquire_read()
        start = time.perf_counter()
        zap = asyncio.create_task(vm.munmap(region.hva, region.size))
        if contend:
            await asyncio.sleep(0)
            waiter = asyncio.create_task(_reader_loop(vm, zap))
            await asyncio.sleep(0)
            vm.mmu_lock.release_read()
        await zap
        elapsed = (time.perf_counter() - start) / pages * 1e9
        if waiter:
            await waiter
        assert vm.stat.pages_4k == 0
        (contended if contend else alone).append(elapsed)
        if contend:
            yields.append(vm.stats()["tdp_mmu_yields"])
        spt = array("Q", [0]) * 512
        start = time.perf_counter()
        for _ in range(pages // 512):
            for i in range(512):
                spt[i] = spt[i] | 1
        bare.append((time.perf_counter() - start) / pages * 1e9)
    base = statistics.median(bare)
    emit("zap_1g_4k", statistics.median(alone), "ns/spte", "bare_loop_rmw", base, digits=2,
         runs=runs, yielded=False)
    emit("zap_1g_4k_reader_waiting", statistics.median(contended), "ns/spte",
         "bare_loop_rmw", base, digits=2, runs=runs, yields_median=statistics.median(yields))


async def _reader_loop(vm, zap: asyncio.Task) -> None:
    """A reader that wants mmu_lock for as long as the zap runs."""
    while not zap.done():
        async with vm.mmu_lock.read:
            pass
        await asyncio.sleep(0)


async def lock_uncontended(runs: int, n: int = 100_000) -> None:
    vm = Kvm().create_vm(VmConfig(sanitizers=False))
    lock = vm.mmu_lock
    results = {"read": [], "write": [], "sleep0": []}
    for _ in range(runs):
        for mode in ("read", "write"):
            guard = lock.read if mode == "read" else lock.write
            start = time.perf_counter()
            for _ in range(n):
                async with guard:
                    pass
            results[mode].append((time.perf_counter() - start) / n * 1e9)
        start = time.perf_counter()
        for _ in range(n):
            await asyncio.sleep(0)
        results["sleep0"].append((time.perf_counter() - start) / n * 1e9)
    base = statistics.median(results["sleep0"])
    for mode in ("read", "write"):
        emit(f"mmu_lock_uncontended_{mode}", statistics.median(results[mode]), "ns",
             "await_asyncio_sleep_0", base, digits=2, runs=runs)


def _without_points(module: types.ModuleType) -> types.ModuleType:
    """`module` recompiled with every `await ...sched.point(...)` statement removed."""
    tree = ast.parse(inspect.getsource(module))

    class Strip(ast.NodeTransformer):
        def visit_Expr(self, node):
            value = node.value
            if isinstance(value, ast.Await) and isinstance(value.value, ast.Call) and \
                    isinstance(value.value.func, ast.Attribute) and \
                    value.value.func.attr == "point":
                return ast.Pass()
            return node

    stripped = types.ModuleType(module.__name__ + "_without_points")
    stripped.__package__ = module.__package__
    code = compile(ast.fix_missing_locations(Strip().visit(tree)), "<stripped>", "exec")
    exec(code, stripped.__dict__)
    return stripped


async def _fault_ns(pages: int) -> float:
    vm, vcpu, _ = await guest(pages)
    batch = reads(range(pages))
    start = time.perf_counter()
    await vcpu.run(batch)
    return (time.perf_counter() - start) / pages * 1e9


async def preemption_points(runs: int, pages: int = 8192) -> None:
    bare_mmu = _without_points(mmu_module)
    original = vcpu_module.page_fault
    with_points, without = [], []
    for run in range(runs):
        # Which configuration goes first alternates, so that drift hits both alike.
        for stripped in (False, True) if run % 2 == 0 else (True, False):
            vcpu_module.page_fault = bare_mmu.page_fault if stripped else original
            try:
                (without if stripped else with_points).append(await _fault_ns(pages))
            finally:
                vcpu_module.page_fault = original
    emit("preemption_points_demand_fault", statistics.median(with_points), "ns/fault",
         "fault_path_without_points", statistics.median(without), limit=1.05, digits=2,
         runs=runs, points_per_fault=3)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    await lock_uncontended(args.runs)
    await preemption_points(args.runs)
    await invalidate_refault(args.runs)
    await zap_1g(max(1, args.runs // 2))


if __name__ == "__main__":
    asyncio.run(main())
