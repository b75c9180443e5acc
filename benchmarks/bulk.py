"""Bulk SPTE operations against the per-SPTE paths, measured in the same run.

The TDP MMU takes its per-SPTE paths when tracing wants an event per SPTE; here they are
selected directly (`per_spte()`), so both paths run on the same VM state, alternating run
by run. young_bitmap has no per-SPTE path left in the model: the walk it replaced is kept
below as `young_bitmap_per_spte`.

    bulk.get_dirty_log       GET_DIRTY_LOG, every page of a 256 MiB slot dirty (ns/page)
    bulk.enable_dirty_log    enabling logging on a 256 MiB slot mapped at 4K (ns/page)
    bulk.young_bitmap        young_bitmap over 1 GiB mapped at 4K, every page young
    bulk.zap_leafs           the MMU notifier's leaf zap of 1 GiB mapped at 4K (ns/SPTE)

Each line: the bulk path's median against the per-SPTE path's (ratio = bulk / per-SPTE;
target for young_bitmap and the zap: <= 0.1, ten times faster). The 1 GiB VM is mapped
at 2M (512 faults) and split to 4K leaves by enabling dirty logging (eager splitting):
262144 young 4K leaves without 262144 faults.

    python benchmarks/bulk.py [--runs 5] [--zap-gib 1] [--log-mib 256]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
from array import array
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import emit  # noqa: E402
from vmmu.server.kvm import (KVM_MEM_LOG_DIRTY_PAGES, AccessBatch, AccessKind,  # noqa: E402
                             Backing, Kvm, VmConfig, make_op)
from vmmu.server.kvm import aging  # noqa: E402
from vmmu.server.kvm import spte as S  # noqa: E402
from vmmu.server.kvm.tdp_iter import TdpIter  # noqa: E402
from vmmu.server.kvm.tdp_mmu import TdpMmu  # noqa: E402
from vmmu.server.kvm.types import PAGE_SHIFT, pages_per_level  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30
TEN_TIMES = 0.1


def emit_bulk(name: str, bulk: list[float], per_spte: list[float], unit: str,
              limit: float | None, **extra) -> None:
    """The bulk path's median against the per-SPTE path's, with both runs' samples."""
    emit(name, statistics.median(bulk), unit, "per-SPTE path", statistics.median(per_spte),
         limit=limit, digits=1, ratio_digits=4, samples=[round(v, 1) for v in bulk],
         baseline_samples=[round(v, 1) for v in per_spte], **extra)


def check(ok: bool, message: str) -> None:
    if not ok:                           # not `assert`: must hold under python -O too
        raise AssertionError(message)


@contextlib.contextmanager
def per_spte(mmu: type = TdpMmu):
    """The MMU's per-SPTE paths (the TDP MMU's unless another MMU class is given), as
    with tracing on (without emitting events)."""
    saved = mmu.bulk
    mmu.bulk = property(lambda self: False)
    try:
        yield
    finally:
        mmu.bulk = saved


def young_bitmap_per_spte(vm, start: int, end: int) -> bytes:
    """young_bitmap as it was before the bulk walk: the iterator over every SPTE."""
    first_page = start >> PAGE_SHIFT
    npages = ((end - 1) >> PAGE_SHIFT) + 1 - first_page
    bits = bytearray((npages + 7) // 8)
    for slot, first, last in aging._gfn_ranges(vm, start, end):
        for root in list(vm.tdp.roots):
            if root.as_id != slot.as_id or root.invalid:
                continue
            for it in TdpIter(root, first, last):
                if not (S.is_leaf_present(it.old_spte, it.level) and
                        S.is_accessed(it.old_spte)):
                    continue
                lo = max(it.gfn, first)
                hi = min(it.gfn + pages_per_level(it.level), last)
                page = (slot.gfn_to_hva(lo) >> PAGE_SHIFT) - first_page
                for i in range(page, page + hi - lo):
                    bits[i >> 3] |= 1 << (i & 7)
    return bytes(bits)


def _accesses(size: int, stride: int, kind: AccessKind) -> AccessBatch:
    gpas = array("Q", range(0, size, stride)).tobytes()
    n = size // stride
    write = kind is AccessKind.WRITE
    return AccessBatch.from_wire(gpas, bytes([make_op(kind, 1, write)]) * n,
                                 b"\x01" * n if write else b"")


async def split_guest(size: int):
    """A VM with `size` bytes of THP memory in slot 0 at gpa 0, every 2M frame faulted in
    and then split to 4K leaves by enabling dirty logging: (vm, vcpu, region)."""
    vm = Kvm().create_vm(VmConfig(sanitizers=False, name="bench-bulk"))
    region = vm.mmap(size, Backing.THP)
    await vm.set_user_memory_region(0, 0, 0, size, region.hva)
    vcpu = vm.create_vcpu(0)
    await vcpu.run(_accesses(size, 2 * MiB, AccessKind.READ))
    await vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, size, region.hva)
    check(vm.stat.pages_4k == size >> 12, f"{vm.stat.pages_4k} 4K leaves, not {size >> 12}")
    return vm, vcpu, region


async def young_and_zap(size: int, runs: int) -> None:
    npages = size >> 12
    young = {True: [], False: []}
    zap = {True: [], False: []}
    for run in range(runs):
        for bulk in (True, False) if run % 2 == 0 else (False, True):
            vm, _, region = await split_guest(size)
            with contextlib.nullcontext() if bulk else per_spte():
                start = time.perf_counter_ns()
                if bulk:
                    bitmap = vm.young_bitmap(region.hva, region.hva + size)
                else:
                    bitmap = young_bitmap_per_spte(vm, region.hva, region.hva + size)
                young[bulk].append((time.perf_counter_ns() - start) / npages)
                check(bitmap == b"\xff" * (npages // 8), "every page should be young")
                async with vm.mmu_lock.write:
                    start = time.perf_counter_ns()
                    flush = await vm.tdp.unmap_gfn_range(0, 0, npages)
                    zap[bulk].append((time.perf_counter_ns() - start) / npages)
                check(flush and vm.stat.pages_4k == 0, "the zap should leave no leaf")
            await vm.destroy()
    common = {"size_mib": size >> 20, "runs": runs}
    emit_bulk("bulk.young_bitmap", young[True], young[False], "ns/page", TEN_TIMES, **common)
    emit_bulk("bulk.zap_leafs", zap[True], zap[False], "ns/spte", TEN_TIMES, **common)


async def dirty_log(size: int, runs: int) -> None:
    npages = size >> 12
    get = {True: [], False: []}
    enable = {True: [], False: []}
    writes = _accesses(size, 4096, AccessKind.WRITE)
    for run in range(runs):
        for bulk in (True, False) if run % 2 == 0 else (False, True):
            vm = Kvm().create_vm(VmConfig(sanitizers=False, name="bench-bulk-log"))
            region = vm.mmap(size, Backing.PAGE_4K)
            await vm.madvise_populate_write(region.hva, size)
            await vm.set_user_memory_region(0, 0, 0, size, region.hva)
            vcpu = vm.create_vcpu(0)
            await vcpu.run(writes)
            with contextlib.nullcontext() if bulk else per_spte():
                start = time.perf_counter_ns()
                await vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, size,
                                                region.hva)
                enable[bulk].append((time.perf_counter_ns() - start) / npages)
                await vcpu.run(writes)
                start = time.perf_counter_ns()
                bitmap = await vm.get_dirty_log(0)
                get[bulk].append((time.perf_counter_ns() - start) / npages)
            check(bitmap == b"\xff" * (npages // 8), "every page should be dirty")
            check(not any(leaf.writable for leaf in vm.walk(0)[-1:]), "page 0 protected")
            await vm.destroy()
    common = {"size_mib": size >> 20, "runs": runs}
    emit_bulk("bulk.get_dirty_log", get[True], get[False], "ns/page", None, **common)
    emit_bulk("bulk.enable_dirty_log", enable[True], enable[False], "ns/page", None, **common)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--zap-gib", type=int, default=1)
    parser.add_argument("--log-mib", type=int, default=256)
    args = parser.parse_args(argv)
    if min(args.runs, args.zap_gib, args.log_mib) < 1:
        parser.error("--runs, --zap-gib and --log-mib must be at least 1")
    asyncio.run(young_and_zap(args.zap_gib * GiB, args.runs))
    asyncio.run(dirty_log(args.log_mib * MiB, args.runs))


if __name__ == "__main__":
    main()
