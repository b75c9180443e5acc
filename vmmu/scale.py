"""`vmmu scale`: the seeds' claims about cost under concurrency, measured in virtual time.

Each sweep is a list of configurations, each one run of the model on a VM in virtual time
(server/kvm/clock.py) whose result is a dict of plain numbers, the same for the same seed
and cost table on any machine (no wall time in it); the sweep's rows are made from the
results in order. So the configurations can run anywhere, in any order: here
(`run_sweep`) or fanned out on worker processes or Ray (`sweeps`), with the same rows.
docs/virtual-time.md says what each sweep asks and what it found.

    seed002   demand faults of 1..256 vCPUs, each faulting its own memory, under four
              designs: faults under the read lock with RCU freeing, under the write lock,
              under the read lock freeing in a write-side section, and the legacy MMU
              (rmaps, faults under the write lock)
    seed003   GPC refresh latency while 0..8 invalidators storm other ranges, global
              retry against range-based
    seed000   demand-fault latency of vCPUs while aging sweeps memory, per aging_lock
    seed001   notifier invalidations of 4K..1G over memory mapped at 4K and 2M: what is
              zapped beyond the range, tables freed and made again, the refault time,
              leaf-only zaps against the old behaviour
    seed004   the dirty-logging workload (write all, harvest, write all again) with the
              fast page fault on and off
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

from vmmu import event_loop
from vmmu.server.kvm import (AccessBatch, AccessKind, Backing, Kvm, Vm, VmConfig,
                             KVM_MEM_LOG_DIRTY_PAGES)
from vmmu.server.pool import Call, Jobs, drive, open_pool

__all__ = ["SWEEPS", "Config", "run_sweep", "sweeps", "main"]

PAGE = 4096
MIB = 1 << 20
W, R = AccessKind.WRITE, AccessKind.READ


@dataclass
class _Guest:
    kvm: Kvm
    vm: Vm
    hva: int
    size: int


async def _guest(size: int, backing: Backing = Backing.PAGE_4K, vcpus: int = 1,
                 flags: int = 0, **config) -> _Guest:
    kvm = Kvm()
    vm = kvm.create_vm(VmConfig(max_vcpus=max(vcpus, 1), clock="virtual",
                                sanitizers=False, **config))
    region = vm.mmap(size, backing)
    await vm.set_user_memory_region(0, flags, 0, size, region.hva)
    for i in range(vcpus):
        vm.create_vcpu(i)
    return _Guest(kvm, vm, region.hva, size)


def _touch(first_gpa: int, pages: int, step: int = PAGE, kind=W) -> AccessBatch:
    data = b"x" if kind is W else b""
    return AccessBatch.build([(first_gpa + i * step, kind, 1, data) for i in range(pages)])


def _percentile(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- seed 002: faults under the read lock, RCU and the write-side section -------------

FAULT_DESIGNS = {           # name -> VmConfig policies
    "read+rcu": dict(fault_lock="read", table_free="rcu"),
    "write": dict(fault_lock="write", table_free="rcu"),
    "read+write_section": dict(fault_lock="read", table_free="write_section"),
    "legacy": dict(mmu="legacy", fault_lock="write", table_free="rcu"),   # tdp_mmu=0: rmaps
}


async def demand_faults(vcpus: int, pages: int, design: str, seed: int = 0,
                        costs: dict | None = None) -> dict:
    """`vcpus` vCPUs each write one byte in each of its own `pages` 4K pages (a demand
    fault each): aggregate faults per virtual second."""
    g = await _guest(vcpus * pages * PAGE, vcpus=vcpus, schedule_seed=seed,
                     fast_page_fault=False, aging_lock="read", costs=costs or {},
                     **FAULT_DESIGNS[design])
    results = await g.vm.clock.gather(*[
        g.vm.vcpu(i).run(_touch(i * pages * PAGE, pages)) for i in range(vcpus)])
    span = max(r.end_ns for r in results) - min(r.start_ns for r in results)
    stats = g.vm.stats()
    out = dict(vcpus=vcpus, pages=pages, design=design, virtual_ns=span,
               faults_per_s=round(vcpus * pages * 1e9 / span),
               lock_wait_ns=stats["mmu_lock_read_wait_ns"] + stats["mmu_lock_write_wait_ns"],
               lock_contended=stats["mmu_lock_read_contended"] +
               stats["mmu_lock_write_contended"], switches=stats["virtual_events"],
               points=g.vm.sched.points_passed)
    await g.kvm.shutdown()
    return out


HPAGE = 2 * MIB


async def huge_over_tables(vcpus: int, hugepages: int, design: str, seed: int = 0,
                           costs: dict | None = None) -> dict:
    """The case the thread is about: faults that unlink tables under the read lock. Each
    vCPU's `hugepages` THPs are first mapped through 4K tables (the host had split them),
    then collapsed by the host (leaf-only zaps keep the tables); the measured faults map
    each THP at 2M over its table, one fault per huge page."""
    size = vcpus * hugepages * HPAGE
    g = await _guest(size, Backing.THP, vcpus=vcpus, schedule_seed=seed,
                     fast_page_fault=False, aging_lock="read", costs=costs or {},
                     **FAULT_DESIGNS[design])
    vm = g.vm
    async with vm.clock.running(name="host") as host:
        for offset in range(0, size, HPAGE):
            await vm.madvise_populate_write(g.hva + offset, HPAGE)
            await vm.thp_split(g.hva + offset)
    await vm.clock.gather(*[vm.vcpu(i).run(_touch(i * hugepages * HPAGE, hugepages, HPAGE),
                                           start_ns=host.time) for i in range(vcpus)])
    async with vm.clock.running(name="host") as host:
        for offset in range(0, size, HPAGE):
            await vm.thp_collapse(g.hva + offset)
    start = max(host.time, *(vm.vcpu(i).actor.time for i in range(vcpus)))
    before = vm.stats()
    results = await vm.clock.gather(*[
        vm.vcpu(i).run(_touch(i * hugepages * HPAGE, hugepages, HPAGE), start_ns=start)
        for i in range(vcpus)])
    after = vm.stats()
    span = max(r.end_ns for r in results) - min(r.start_ns for r in results)
    out = dict(vcpus=vcpus, hugepages=hugepages, design=design, virtual_ns=span,
               faults_per_s=round(vcpus * hugepages * 1e9 / span),
               write_sections=after["mmu_lock_write_acquisitions"] -
               before["mmu_lock_write_acquisitions"],
               lock_wait_ns=after["mmu_lock_read_wait_ns"] + after["mmu_lock_write_wait_ns"] -
               before["mmu_lock_read_wait_ns"] - before["mmu_lock_write_wait_ns"],
               pages_2m=after["pages_2m"])
    await g.kvm.shutdown()
    return out


def seed002(max_vcpus: int = 256, pages: int = 4096, hugepages: int = 8, seed: int = 0,
            costs: dict | None = None) -> list[Config]:
    counts = [1 << k for k in range(max_vcpus.bit_length()) if 1 << k <= max_vcpus]
    return [Config(measure, (n, size, design, seed, costs))
            for measure, size in (("demand_faults", pages), ("huge_over_tables", hugepages))
            for design in FAULT_DESIGNS for n in counts]


def seed002_rows(configs: list[Config], results: list[dict]) -> Iterator[dict]:
    """Each result with its efficiency: per vCPU, against the first (fewest vCPUs) of the
    same workload and design."""
    one: dict[tuple[str, str], int] = {}
    for config, r in zip(configs, results):
        workload = WORKLOADS[config.measure]
        one.setdefault((workload, r["design"]), r["faults_per_s"])
        r = dict(r, efficiency=round(r["faults_per_s"] /
                                     (r["vcpus"] * one[workload, r["design"]]), 4))
        yield dict(sweep="seed002", workload=workload, **r)


WORKLOADS = {"demand_faults": "demand_4k", "huge_over_tables": "huge_over_tables"}


# -- seed 003: GPC refresh against an invalidation storm -----------------------------

STORM_NS = 2_000_000       # how long the invalidators storm, in virtual ns
STORM_GAP_NS = 1_000       # between two madvise calls of one invalidator (the syscall)


async def gpc_refresh_latency(invalidators: int, policy: str, refreshes: int = 40,
                              seed: int = 0, costs: dict | None = None) -> dict:
    """A GPC at the last page of the slot is refreshed `refreshes` times (each after an
    invalidation of its own page made it invalid) while `invalidators` host tasks
    invalidate 2 MiB ranges elsewhere again and again for STORM_NS of virtual time."""
    storm = 2 * MIB
    size = (invalidators + 1) * storm
    g = await _guest(size, gpc_policy=policy, schedule_seed=seed, costs=costs or {})
    vm, clock = g.vm, g.vm.clock
    gpc = await vm.gpcs.create(size - PAGE, 8)
    done = False
    latencies: list[int] = []

    async def invalidator(i: int) -> None:
        async with clock.running(name=f"invalidator{i}"):
            while not done and clock.time() < STORM_NS:
                await vm.migrate_pages(g.hva + i * storm, storm)
                await clock.sleep_until(clock.time() + STORM_GAP_NS)

    async def refresher() -> None:
        nonlocal done
        async with clock.running(name="refresher"):
            begin = clock.time()
            for i in range(refreshes):                # spread over the storm
                await clock.sleep_until(begin + i * STORM_NS // refreshes)
                await vm.migrate_pages(g.hva + size - PAGE, PAGE)   # the cache goes invalid
                start = clock.time()
                await gpc.refresh(8)
                latencies.append(clock.time() - start)
        done = True

    # The storm touches its memory first, so that migration has pages to move.
    for i in range(invalidators):
        await vm.madvise_populate_write(g.hva + i * storm, storm)
    await vm.madvise_populate_write(g.hva + size - PAGE, PAGE)
    await clock.gather(refresher(), *[invalidator(i) for i in range(invalidators)])
    out = dict(invalidators=invalidators, policy=policy, refreshes=refreshes,
               p50_us=statistics.median(latencies) / 1000,
               p99_us=_percentile(latencies, 0.99) / 1000,
               max_us=max(latencies) / 1000,
               mean_us=round(statistics.fmean(latencies) / 1000, 3),
               retries=vm.stats()["gpc_refresh_retries"])
    await g.kvm.shutdown()
    return out


def seed003(max_invalidators: int = 8, refreshes: int = 40, seed: int = 0,
            costs: dict | None = None) -> list[Config]:
    return [Config("gpc_refresh_latency", (k, policy, refreshes, seed, costs))
            for policy in ("global", "range") for k in range(max_invalidators + 1)]


# -- seed 000: faults while aging sweeps ---------------------------------------------

async def faults_while_aging(aging_lock: str, vcpus: int = 64, faults: int = 64,
                             sweep: int = 1 << 30, seed: int = 0,
                             costs: dict | None = None) -> dict:
    """`vcpus` vCPUs take `faults` demand faults each, one per run (its latency: the
    run's virtual span), while an ager sweeps `sweep` bytes with clear_young again and
    again."""
    g = await _guest(sweep, vcpus=vcpus, aging_lock=aging_lock, schedule_seed=seed,
                     costs=costs or {})
    vm, clock = g.vm, g.vm.clock
    done = 0
    latencies: list[int] = []
    sweeps = 0

    async def vcpu_loop(i: int) -> None:
        nonlocal done
        base = i * faults * PAGE
        vcpu = vm.vcpu(i)
        async with clock.running(vcpu.actor):    # in the simulation between runs too
            for k in range(faults):
                r = await vcpu.run(_touch(base + k * PAGE, 1))
                latencies.append(r.end_ns - r.start_ns)
        done += 1

    async def ager() -> None:
        nonlocal sweeps
        async with clock.running(name="ager"):
            while done < vcpus:
                await vm.clear_young(g.hva, g.hva + sweep)
                sweeps += 1
                await clock.point()          # between two calls from reclaim

    await clock.gather(ager(), *[vcpu_loop(i) for i in range(vcpus)])
    out = dict(aging_lock=aging_lock, vcpus=vcpus, faults=vcpus * faults,
               sweep_bytes=sweep, sweeps=sweeps,
               p50_us=statistics.median(latencies) / 1000,
               p99_us=_percentile(latencies, 0.99) / 1000)
    await g.kvm.shutdown()
    return out


def seed000(vcpus: int = 64, faults: int = 64, sweep: int = 1 << 30, seed: int = 0,
            costs: dict | None = None) -> list[Config]:
    return [Config("faults_while_aging", (aging_lock, vcpus, faults, sweep, seed, costs))
            for aging_lock in ("none", "read", "write")]


# -- seed 001: what an invalidation zaps, leaf-only or not ---------------------------

async def invalidate_and_refault(range_bytes: int, backing: Backing, leafs_only: bool,
                                 working_set: int, seed: int = 0,
                                 costs: dict | None = None) -> dict:
    """Map `working_set` (at 4K, or 2M on THP), hold an invalidation of its first
    `range_bytes` and end it, then refault the whole working set."""
    g = await _guest(working_set, backing, zap_leafs_only=leafs_only, schedule_seed=seed,
                     costs=costs or {})
    vm, vcpu = g.vm, g.vm.vcpu(0)
    pages = working_set // PAGE
    await vcpu.run(_touch(0, pages))
    before = vm.stats()
    freed_before = vm.tdp.tables.freed
    mapped_before = before["pages_4k"] + 512 * before["pages_2m"]
    await vm.begin_invalidation(g.hva, g.hva + range_bytes, 60.0)
    during = vm.stats()
    await vm.end_invalidation(vm.held_invalidations()[0].id)
    zapped = mapped_before - (during["pages_4k"] + 512 * during["pages_2m"])
    r = await vcpu.run(_touch(0, pages))
    after = vm.stats()
    out = dict(range_bytes=range_bytes, backing=backing.name, leafs_only=leafs_only,
               working_set=working_set, pages_zapped=zapped,
               zapped_beyond_range=zapped - min(range_bytes, working_set) // PAGE,
               tables_freed=vm.tdp.tables.freed - freed_before,
               tables_remade=after["tdp_mmu_pages"] - during["tdp_mmu_pages"],
               refault_us=(r.end_ns - r.start_ns) / 1000)
    await g.kvm.shutdown()
    return out


def seed001(working_set: int = 1 << 30, seed: int = 0,
            costs: dict | None = None) -> list[Config]:
    ranges = [r for r in (4096, 64 * 1024, 2 * MIB, 64 * MIB, 1 << 30) if r <= working_set]
    return [Config("invalidate_and_refault",
                   (range_bytes, backing.name, leafs_only, working_set, seed, costs))
            for backing in (Backing.PAGE_4K, Backing.THP) for range_bytes in ranges
            for leafs_only in (True, False)]


# -- seed 004: the dirty-logging workload, fast page fault on and off ----------------

async def dirty_logging(size: int, fast_page_fault: bool, seed: int = 0,
                        costs: dict | None = None) -> dict:
    """Write every page of a logged slot, harvest, write every page again: the second
    pass takes a write-protect fault per page."""
    g = await _guest(size, flags=KVM_MEM_LOG_DIRTY_PAGES, fast_page_fault=fast_page_fault,
                     schedule_seed=seed, costs=costs or {})
    vm, vcpu = g.vm, g.vm.vcpu(0)
    pages = size // PAGE
    first = await vcpu.run(_touch(0, pages))
    await vm.get_dirty_log(0)
    second = await vcpu.run(_touch(0, pages))
    out = dict(size=size, fast_page_fault=fast_page_fault,
               first_pass_ns_per_page=(first.end_ns - first.start_ns) / pages,
               second_pass_ns_per_page=(second.end_ns - second.start_ns) / pages)
    await g.kvm.shutdown()
    return out


def seed004(size: int = 256 * MIB, seed: int = 0,
            costs: dict | None = None) -> list[Config]:
    return [Config("dirty_logging", (size, fast_page_fault, seed, costs))
            for fast_page_fault in (True, False)]


def seed004_rows(configs: list[Config], results: list[dict]) -> Iterator[dict]:
    """One row: the second pass with the fast page fault on against off."""
    on, off = results
    yield dict(sweep="seed004", size=on["size"], on_ns_per_page=on["second_pass_ns_per_page"],
               off_ns_per_page=off["second_pass_ns_per_page"],
               ratio=round(on["second_pass_ns_per_page"] / off["second_pass_ns_per_page"], 4),
               seed_ratio=round(196 / 532, 4),
               first_pass_ns_per_page=on["first_pass_ns_per_page"])


def _rows_as_they_are(sweep: str) -> Callable[[list[Config], list[dict]], Iterator[dict]]:
    def rows(configs: list[Config], results: list[dict]) -> Iterator[dict]:
        return (dict(sweep=sweep, **r) for r in results)
    return rows


async def _invalidate_and_refault_by_name(range_bytes: int, backing: str,
                                          *args) -> dict:
    return await invalidate_and_refault(range_bytes, Backing[backing], *args)


@dataclass(frozen=True)
class Sweep:
    """A sweep's configurations (for its options, seed and cost table) and its rows
    (from the configurations' results, in the configurations' order)."""

    configs: Callable[..., list[Config]]
    rows: Callable[[list[Config], list[dict]], Iterator[dict]]


SWEEPS: dict[str, Sweep] = {
    "seed002": Sweep(seed002, seed002_rows),
    "seed003": Sweep(seed003, _rows_as_they_are("seed003")),
    "seed000": Sweep(seed000, _rows_as_they_are("seed000")),
    "seed001": Sweep(seed001, _rows_as_they_are("seed001")),
    "seed004": Sweep(seed004, seed004_rows),
}

MEASURES: dict[str, Callable[..., Awaitable[dict]]] = {
    "demand_faults": demand_faults, "huge_over_tables": huge_over_tables,
    "gpc_refresh_latency": gpc_refresh_latency, "faults_while_aging": faults_while_aging,
    "invalidate_and_refault": _invalidate_and_refault_by_name,
    "dirty_logging": dirty_logging,
}


@dataclass(frozen=True)
class Config:
    """One run of a sweep: a measure (MEASURES) and its arguments, JSON values (a
    backing by its name): what a worker process or a Ray task is handed."""

    measure: str
    args: tuple

    def call(self, number: int) -> Call:
        return Call(f"{__name__}:run_config", (self.measure, self.args), (number, 1))


def run_config(measure: str, args: list) -> dict:
    """A configuration's result, in a fresh event loop (a worker's call)."""
    return event_loop.run(MEASURES[measure](*args))


def run_sweep(name: str, **options) -> list[dict]:
    """The results of one sweep (SWEEPS), here, one configuration after another."""
    sweep = SWEEPS[name]
    configs = sweep.configs(**options)
    return list(sweep.rows(configs, [run_config(c.measure, c.args) for c in configs]))


async def sweeps(names: list[str], options: dict[str, dict], workers: int = 1,
                 ray: str | None = None) -> AsyncIterator[tuple[str, list[dict], int]]:
    """Each sweep's rows, in the order of `names`, as soon as it and the sweeps before it
    are done, with the workers lost so far; the configurations of all of them run on the
    pool (`pool.open_pool`), so the rows are those of `run_sweep` whatever the
    parallelism. Raises WorkerDied if a configuration's worker died ATTEMPTS times."""
    configs = [SWEEPS[name].configs(**options[name]) for name in names]
    ends = list(itertools.accumulate(map(len, configs)))
    calls = [config.call(number) for number, config in enumerate(itertools.chain(*configs))]
    plan = Jobs(len(calls))
    shown = 0

    def rows(i: int) -> tuple[str, list[dict], int]:
        results = plan.results[ends[i] - len(configs[i]):ends[i]]
        return names[i], list(SWEEPS[names[i]].rows(configs[i], results)), plan.workers_lost

    async with open_pool(workers, ray) as pool:
        async for _ in drive(pool, plan, calls.__getitem__):
            while shown < len(names) and plan.done_prefix() >= ends[shown]:
                yield rows(shown)
                shown += 1
    plan.raise_if_failed(lambda job: "{}{}".format(*calls[job].args))
    for i in range(shown, len(names)):
        yield rows(i)


def main(names: list[str], quick: bool = False, costs: dict | None = None, seed: int = 0,
         plot: str | None = None, out=sys.stdout, workers: int = 1,
         ray: str | None = None) -> int:
    """Print each result as a JSON line, a sweep at a time in the order of `names`; with
    `plot`, write a PNG per sweep there. The configurations run on `workers` local
    processes or Ray (`sweeps`); the lines do not depend on it."""
    size = QUICK if quick else {}
    options = {name: dict(seed=seed, costs=costs, **size.get(name, {})) for name in names}
    results: dict[str, list[dict]] = {}

    async def show() -> int:
        lost = 0
        async for name, rows, lost in sweeps(names, options, workers, ray):
            results[name] = rows
            for r in rows:
                print(json.dumps(r, sort_keys=True), file=out, flush=True)
        return lost

    lost = event_loop.run(show())
    if lost:
        print(f"{lost} worker(s) died; their configurations ran again", file=sys.stderr)
    if plot:
        from vmmu.scale_plot import plot_results
        for path in plot_results(results, plot):
            print(f"wrote {path}", file=sys.stderr)
    return 0


# Small sizes for a quick look (and for the tests): the same sweeps, fewer vCPUs and pages.
QUICK = {
    "seed002": dict(max_vcpus=8, pages=256, hugepages=4),
    "seed003": dict(max_invalidators=2, refreshes=10),
    "seed000": dict(vcpus=8, faults=16, sweep=64 * MIB),
    "seed001": dict(working_set=64 * MIB),
    "seed004": dict(size=8 * MIB),
}
