"""The legacy MMU against the TDP MMU, measured in the same run.

Every result is one JSON line (the median of several runs) with its ratio to the
baseline measured beside it:
- `demand_fault_legacy_vs_tdp`: µs per 4K demand fault (a write to an unmapped page);
- `wrprot_fault_legacy_vs_tdp`: µs per write fault on a page GET_DIRTY_LOG protected
  (the fast page fault fixes it on both);
- `get_dirty_log_legacy_vs_tdp`: ns per page of GET_DIRTY_LOG with every page dirty
  (harvest, re-protect through the rmaps or the TDP walk, flush), both in bulk;
- `get_dirty_log_legacy_bulk_vs_per_spte`: the same on the legacy MMU, its bulk
  write-protection (rmap_bulk) against `rmap_write_protect` head by head (as with
  tracing on), and `enable_logging_legacy_bulk_vs_per_spte`: ns per page of enabling
  logging on the slot (`kvm_mmu_slot_remove_write_access`), the same two paths;
- `aging_lockless_vs_write_lock`: clear_young of a fully mapped guest on the legacy MMU,
  the lockless walk (A/D bits on) against the write-lock walk (A/D bits off, which marks
  SPTEs for access tracking); ms for the whole range, scaled to 1 GiB in the line, the
  two measured alternately; target: the lockless walk no slower (ratio <= 1);
- `bytes_per_page_legacy` / `_tdp`: page-table + rmap bytes per mapped 4K page (KVM's
  layout: 4 KiB per table page, 8 bytes per rmap head and per descriptor entry; KVM's
  legacy MMU needs about 8 + 8; target <= 20), against the TDP MMU's page tables.

    python benchmarks/legacy_mmu.py [--runs 3] [--mib 64]

The runs alternate between the MMUs (and paths) so that they share the machine's noise;
each line is the median of its runs.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bulk import per_spte  # noqa: E402
from benchmarks.report import emit  # noqa: E402
from vmmu.server.kvm import AccessBatch, AccessKind, Backing, Kvm, VmConfig  # noqa: E402
from vmmu.server.kvm.memslots import KVM_MEM_LOG_DIRTY_PAGES  # noqa: E402
from vmmu.server.kvm.shadow_mmu import ShadowMmu  # noqa: E402
from vmmu.server.kvm.types import PAGE_SIZE  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30


def _batch(pages: int, kind: AccessKind) -> AccessBatch:
    return AccessBatch.build((g * PAGE_SIZE, kind, 8, None) for g in range(pages))


async def _guest(mmu: str, size: int, ad_bits: bool = True):
    kvm = Kvm()
    vm = kvm.create_vm(VmConfig(mmu=mmu, ad_bits=ad_bits, sanitizers=False))
    region = vm.mmap(size, Backing.PAGE_4K)
    await vm.set_user_memory_region(0, 0, 0, size, region.hva)
    return kvm, vm, region, vm.create_vcpu(0)


async def faults(mmu: str, size: int) -> tuple[float, float, float, float]:
    """(µs per demand fault, µs per write-protect fault, ns per page of GET_DIRTY_LOG,
    ns per page of enabling logging)."""
    kvm, vm, region, vcpu = await _guest(mmu, size)
    pages = size // PAGE_SIZE
    writes = _batch(pages, AccessKind.WRITE)
    start = time.perf_counter()
    await vcpu.run(writes)
    demand = (time.perf_counter() - start) / pages * 1e6
    start = time.perf_counter()
    await vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, size, region.hva)
    enable = (time.perf_counter() - start) / pages * 1e9
    await vm.get_dirty_log(0)
    start = time.perf_counter()
    await vcpu.run(writes)                       # each write: a fast page fault
    wrprot = (time.perf_counter() - start) / pages * 1e6
    start = time.perf_counter()
    await vm.get_dirty_log(0)                    # every page dirty: all re-protected
    harvest = (time.perf_counter() - start) / pages * 1e9
    await kvm.shutdown()
    return demand, wrprot, harvest, enable


async def legacy_per_spte(size: int) -> tuple[float, float, float, float]:
    with per_spte(ShadowMmu):
        return await faults("legacy", size)


async def aging(size: int, ad_bits: bool) -> float:
    """ms for clear_young over a fully mapped, young guest on the legacy MMU."""
    kvm, vm, region, vcpu = await _guest("legacy", size, ad_bits)
    await vcpu.run(_batch(size // PAGE_SIZE, AccessKind.READ))
    start = time.perf_counter()
    assert await vm.clear_young(region.hva, region.hva + size)
    elapsed = (time.perf_counter() - start) * 1e3
    await kvm.shutdown()
    return elapsed


async def bytes_per_page(mmu: str, size: int) -> float:
    kvm, vm, _, vcpu = await _guest(mmu, size)
    pages = size // PAGE_SIZE
    await vcpu.run(_batch(pages, AccessKind.READ))
    if mmu == "legacy":
        tables, rmaps = vm.shadow.memory_bytes()
    else:
        tables, rmaps = len(vm.tdp.tables) * PAGE_SIZE, 0
    await kvm.shutdown()
    return (tables + rmaps) / pages


async def main(runs: int, mib: int) -> None:
    size = mib * MiB
    kinds = {"tdp": lambda: faults("tdp", size), "legacy": lambda: faults("legacy", size),
             "legacy_per_spte": lambda: legacy_per_spte(size)}
    results: dict[str, list] = {kind: [] for kind in kinds}
    for _ in range(runs):                 # interleaved: the same noise for each
        for kind, run in kinds.items():
            results[kind].append(await run())
    med = {kind: [statistics.median(r[i] for r in rs) for i in range(4)]
           for kind, rs in results.items()}
    for i, (name, unit) in enumerate((("demand_fault", "us/fault"), ("wrprot_fault", "us/fault"),
                                      ("get_dirty_log", "ns/page"))):
        emit(f"{name}_legacy_vs_tdp", med["legacy"][i], unit, "tdp", med["tdp"][i],
             runs=runs, mib=mib)
    for i, name in ((2, "get_dirty_log"), (3, "enable_logging")):
        emit(f"{name}_legacy_bulk_vs_per_spte", med["legacy"][i], "ns/page", "per_spte",
             med["legacy_per_spte"][i], runs=runs, mib=mib)
    pairs = [(await aging(size, True), await aging(size, False)) for _ in range(runs)]
    lockless = statistics.median(p[0] for p in pairs)    # interleaved: the same noise
    locked = statistics.median(p[1] for p in pairs)
    scale = GiB / size
    emit("aging_lockless_vs_write_lock", lockless, "ms", "write_lock", locked, limit=1.0,
         runs=runs, mib=mib, lockless_ms_per_gib=round(lockless * scale, 1),
         write_lock_ms_per_gib=round(locked * scale, 1))
    tdp = await bytes_per_page("tdp", size)
    legacy = await bytes_per_page("legacy", size)
    emit("bytes_per_page_legacy", legacy, "bytes/4K page", "tdp", tdp, target="<= 20",
         runs=1, mib=mib)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mib", type=int, default=64, help="guest memory per run, MiB")
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.mib))
