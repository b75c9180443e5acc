"""GPC refresh latency under a storm of invalidations that never touch the cache's page.

Host threads invalidate other pages of the guest over and over, each staying a few event
loop turns between invalidate_range_start and _end (as a migration copying a page does),
several at once, so that `mn_active_invalidate_count` is zero in a quarter of the loop
turns (light storm), seldom (medium) or never (heavy); `count_zero_share` is measured
for each storm before the timed runs. Meanwhile one task invalidates the cache's own page
and times the refresh that follows. The `global` policy waits for the count to reach
zero; the `range` policy only for invalidations of the cache's page, of which none is in
flight.

One JSON line per storm: `value` is the median refresh latency with the `global` policy,
`baseline_value` the same workload with the `range` policy, `ratio` their quotient
(medians of the per-run medians). A refresh that does not finish within the bound is a
livelock: its median is null and "livelock" (global) or "baseline_livelock" (range) true.

    python benchmarks/gpc.py [--runs 5] [--refreshes 200] [--bound-s 2]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import emit  # noqa: E402
from vmmu.server.kvm import Backing, Kvm, VmConfig  # noqa: E402

PAGE = 4096
PAGES = 256
CACHE_GPA = 0x10           # in guest page 0; the storm invalidates pages 8..255

# name -> (invalidators, window turns (min, max), gap turns (min, max))
STORMS = {
    "none": (0, (0, 0), (0, 0)),
    "light": (2, (1, 3), (0, 4)),
    "medium": (3, (1, 4), (0, 3)),
    "heavy": (6, (2, 6), (0, 1)),
}
CALIBRATION_TURNS = 5000


async def _turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def _invalidator(vm, hva: int, rng: random.Random, window: tuple[int, int],
                       gap: tuple[int, int], count: list[int]) -> None:
    notifier = vm.notifier
    while True:
        start = hva + rng.randrange(8, PAGES) * PAGE
        await notifier.invalidate_range_start(start, start + PAGE)
        await _turns(rng.randint(*window))
        await notifier.invalidate_range_end(start, start + PAGE)
        count[0] += 1
        await _turns(rng.randint(*gap))


async def _guest(policy: str):
    kvm = Kvm()
    vm = kvm.create_vm(VmConfig(sanitizers=False, gpc_policy=policy, name=f"gpc-{policy}"))
    region = vm.mmap(PAGES * PAGE, Backing.PAGE_4K)
    await vm.set_user_memory_region(0, 0, 0, PAGES * PAGE, region.hva)
    return kvm, vm, region.hva


def _start_storm(vm, hva: int, storm: str, seed: int, count: list[int]) -> list[asyncio.Task]:
    invalidators, window, gap = STORMS[storm]
    rng = random.Random(seed)
    return [asyncio.create_task(_invalidator(vm, hva, random.Random(rng.random()), window,
                                             gap, count))
            for _ in range(invalidators)]


async def _stop(tasks: list[asyncio.Task]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def count_zero_share(storm: str) -> float:
    """The share of event loop turns in which mn_active_invalidate_count is zero."""
    kvm, vm, hva = await _guest("global")
    tasks = _start_storm(vm, hva, storm, 0, [0])
    zero = 0
    for _ in range(CALIBRATION_TURNS):
        await asyncio.sleep(0)
        zero += vm.notifier.mn_active_invalidate_count == 0
    await _stop(tasks)
    await kvm.shutdown()
    return zero / CALIBRATION_TURNS


async def _watchdog(measurer: asyncio.Task, started: list[float], bound_s: float) -> None:
    """Cancel `measurer` once one refresh has run for `bound_s` (costs the timed
    refreshes nothing, unlike a timeout around each)."""
    while True:
        await asyncio.sleep(bound_s / 20)
        if started[0] and time.perf_counter() - started[0] > bound_s:
            measurer.cancel()
            return


async def _one_run(policy: str, storm: str, refreshes: int, bound_s: float, seed: int
                   ) -> tuple[float | None, int]:
    """(median refresh latency in us, or None on a livelock; storm invalidations
    meanwhile)."""
    kvm, vm, hva = await _guest(policy)
    gpc = await vm.gpcs.create(CACHE_GPA, 8)
    count, started, latencies = [0], [0.0], []
    tasks = _start_storm(vm, hva, storm, seed, count)
    rng = random.Random(seed)

    async def measure() -> None:
        await _turns(10)
        for _ in range(refreshes):
            await vm.notifier.invalidate_range_start(hva, hva + PAGE)   # the cache's page
            await vm.notifier.invalidate_range_end(hva, hva + PAGE)
            assert not gpc.valid
            started[0] = time.perf_counter()
            await gpc.refresh(8)
            latencies.append((time.perf_counter() - started[0]) * 1e6)
            started[0] = 0.0
            await _turns(rng.randint(0, 3))

    measurer = asyncio.create_task(measure())
    watchdog = asyncio.create_task(_watchdog(measurer, started, bound_s))
    try:
        await measurer
        livelock = False
    except asyncio.CancelledError:
        livelock = True
    await _stop([watchdog, *tasks])
    await kvm.shutdown()
    return (None if livelock else statistics.median(latencies)), count[0]


async def refresh_under_storm(storm: str, runs: int, refreshes: int, bound_s: float) -> None:
    zero_share = await count_zero_share(storm)
    medians: dict[str, list[float]] = {"global": [], "range": []}
    livelock = {"global": False, "range": False}
    invalidations = []
    for run in range(runs):
        for policy in medians:
            if livelock[policy]:
                continue
            median, storm_count = await _one_run(policy, storm, refreshes, bound_s, seed=run)
            invalidations.append(storm_count)
            if median is None:
                livelock[policy] = True
            else:
                medians[policy].append(median)
    value = None if livelock["global"] else statistics.median(medians["global"])
    base = None if livelock["range"] else statistics.median(medians["range"])
    emit(f"gpc_refresh_storm_{storm}", value, "us", "range_policy", base, digits=1,
         runs=runs, refreshes_per_run=refreshes, livelock=livelock["global"],
         baseline_livelock=livelock["range"], bound_s=bound_s,
         invalidators=STORMS[storm][0], count_zero_share=round(zero_share, 3),
         storm_invalidations_median=statistics.median(invalidations))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--refreshes", type=int, default=200)
    parser.add_argument("--bound-s", type=float, default=2.0)
    args = parser.parse_args()
    for storm in STORMS:
        await refresh_under_storm(storm, args.runs, args.refreshes, args.bound_s)


if __name__ == "__main__":
    asyncio.run(main())
