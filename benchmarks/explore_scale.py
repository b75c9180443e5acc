"""Schedule exploration scaled out: seeds per second on 1 process, K processes, Ray.

The same clean exploration (every seed runs to the end) is timed in one process (the
model's explorer, the baseline), on K local worker processes and as Ray tasks on a local
cluster of K CPUs, the three interleaved in every run so that they see the same load;
pools are started once, before the timed runs (their start is reported on its own).
Ray's own cost is measured with an empty task: its round trip alone, and the driver's
and workers' cost per task with 2K in flight. The per-seed cost of every scenario
(one process, in CPU time) is what docs/scale-out.md builds its estimate on.

Wall-clock scaling needs free cores. On a machine shared by other sessions, Linux's
autogroup scheduling gives a session one share however many processes it runs, so the
pool's own cost is also measured in CPU time: seeds per CPU-second of the driver and its
workers against one process's (`explore_scale.processes_cpu`; `scaling_if_cores_free` is
K times that ratio). The machine's own answer is measured alongside, in every run: bare
busy loops in K processes against one (`explore_scale.bare_loops`); the pool cannot scale
better than that, and `explore_scale.processes_of_machine` is the pool's wall-clock
scaling over the bare loops' in the same run (1.0: all the machine gave). Every line
carries the CPUs this process may use (`affinity`), whether autogroup is on, and the load.

One JSON line per result: `value` the median, `baseline_value` the baseline's median,
`ratio` the median of the per-run ratios (each against the baseline of the same run).

    python benchmarks/explore_scale.py [--runs 5] [--seeds 200] [--workers K] [--no-ray]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import emit  # noqa: E402
from vmmu.server.explore_pool import RayMissing, default_workers, open_workers  # noqa: E402
from vmmu.server.kvm.explore import SCENARIOS, explore  # noqa: E402

SCENARIO = "fault_vs_invalidate"
LOOP_S = 2.0
BARE_LOOP = ("import time\nn, end = 0, time.monotonic() + {s}\n"
             "while time.monotonic() < end:\n    sum(range(1000)); n += 1\nprint(n)")
PER_SEED_SEEDS = 20
EMPTY_TASKS = 400
SCALING = 0.8              # the process pool's target: 0.8 x K one process's rate


def emit_loaded(name: str, value: float, unit: str, baseline: str | None = None,
                baseline_value: float | None = None, **extra) -> None:
    """One result line with the machine's load averages: the pools' rates follow them."""
    emit(name, value, unit, baseline, baseline_value, **extra,
         load=[round(x, 2) for x in os.getloadavg()])


def machine() -> dict:
    """What the machine gives this run: the CPUs this process may use, whether the
    scheduler groups a session's processes (autogroup), and the load when it starts."""
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled") as f:
            autogroup = f.read().strip() == "1"
    except OSError:
        autogroup = None
    return {"cores": os.cpu_count(), "affinity": sorted(os.sched_getaffinity(0)),
            "autogroup": autogroup, "load_at_start": [round(x, 2) for x in os.getloadavg()]}


def cpu_seconds(pool) -> float:
    """CPU time of this process and of the pool's worker processes (Ray's: not counted)."""
    ticks = 0
    for proc in getattr(pool.pool, "_procs", {}).values():
        with open(f"/proc/{proc.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])                   # utime, stime
    return time.process_time() + ticks / os.sysconf("SC_CLK_TCK")


async def seeds_per_second(pool, seeds: int, first_seed: int, batch: int = 0
                           ) -> tuple[float, float]:
    """Seeds per second of wall time, and per second of CPU time (see cpu_seconds)."""
    started, cpu = time.perf_counter(), cpu_seconds(pool)
    async for step in pool.explore_steps(SCENARIO, seeds, frozenset(), first_seed, 0, batch):
        pass
    assert step.first_violation is None and step.seeds_run == seeds
    return seeds / (time.perf_counter() - started), seeds / (cpu_seconds(pool) - cpu)


async def bare_loops(processes: int) -> int:
    """Iterations of a busy loop, summed over `processes` processes running LOOP_S."""
    procs = [await asyncio.create_subprocess_exec(
        sys.executable, "-c", BARE_LOOP.format(s=LOOP_S), stdout=asyncio.subprocess.PIPE)
        for _ in range(processes)]
    return sum([int((await proc.communicate())[0]) for proc in procs])


async def started(workers: int, ray: str | None, stack) -> tuple[object, float]:
    """A pool, warmed by one seed per lane; the seconds that took."""
    begun = time.perf_counter()
    pool = await stack.enter_async_context(open_workers(workers, ray))
    await seeds_per_second(pool, pool.lanes, 10_000_000, batch=1)
    return pool, time.perf_counter() - begun


async def ray_task_cost(cpus: int) -> tuple[float, float, float]:
    """Seconds per empty task: one at a time (round trip), and 2 x cpus in flight; and
    the driver's CPU seconds per task (this process: submit, await, fetch the result)."""
    import ray

    @ray.remote(num_cpus=1)
    def empty() -> None:
        return None

    await asyncio.gather(*(empty.remote() for _ in range(2 * cpus)))     # warm workers
    begun = time.perf_counter()
    for _ in range(EMPTY_TASKS // 4):
        await empty.remote()
    latency = (time.perf_counter() - begun) / (EMPTY_TASKS // 4)
    begun, driver = time.perf_counter(), time.process_time()
    refs = [empty.remote() for _ in range(2 * cpus)]
    for _ in range(EMPTY_TASKS):
        await refs.pop(0)
        refs.append(empty.remote())
    await asyncio.gather(*refs)
    return (latency, (time.perf_counter() - begun) / EMPTY_TASKS,
            (time.process_time() - driver) / EMPTY_TASKS)


async def main(runs: int, seeds: int, workers: int, use_ray: bool) -> None:
    from contextlib import AsyncExitStack
    shared = {"scenario": SCENARIO, "seeds": seeds, "workers": workers, "runs": runs,
              **machine()}
    for name in sorted(SCENARIOS):
        begun, cpu = time.perf_counter(), time.process_time()
        await explore(name, PER_SEED_SEEDS, frozenset(), 20_000_000)
        emit_loaded(f"explore_scale.per_seed.{name}",
                    (time.process_time() - cpu) / PER_SEED_SEEDS * 1e3, "cpu-ms/seed",
                    wall_ms=round((time.perf_counter() - begun) / PER_SEED_SEEDS * 1e3, 3),
                    seeds=PER_SEED_SEEDS)
    async with AsyncExitStack() as stack:
        pools = {"one_process": (await started(1, None, stack))[0]}
        pools["processes"], start_s = await started(workers, None, stack)
        emit_loaded("explore_scale.processes_start", start_s, "s", **shared)
        if use_ray:
            try:
                pools["ray"], start_s = await started(workers, "", stack)
                emit_loaded("explore_scale.ray_start", start_s, "s", **shared)
            except RayMissing as missing:
                emit_loaded("explore_scale.ray", 0, "seeds/s", skipped=str(missing))
        rates: dict[str, list[float]] = {mode: [] for mode in pools}
        per_cpu: dict[str, list[float]] = {"one_process": [], "processes": []}
        loops: list[float] = []
        if "ray" in pools:
            rates["ray_batch1"] = []
        for run in range(runs):
            loops.append(await bare_loops(workers) / await bare_loops(1))
            first_seed = run * seeds
            for mode, pool in pools.items():
                rate, cpu_rate = await seeds_per_second(pool, seeds, first_seed)
                rates[mode].append(rate)
                if mode in per_cpu:
                    per_cpu[mode].append(cpu_rate)
            if "ray" in pools:
                rates["ray_batch1"].append(
                    (await seeds_per_second(pools["ray"], seeds, first_seed, batch=1))[0])
        emit_loaded("explore_scale.bare_loops", statistics.median(loops), "x one process",
                    samples=[round(r, 2) for r in loops], **shared)
        one = rates["one_process"]
        efficiency = statistics.median(
            p / b for p, b in zip(per_cpu["processes"], per_cpu["one_process"]))
        emit_loaded("explore_scale.processes_cpu", statistics.median(per_cpu["processes"]),
                    "seeds/cpu-s", "one_process", statistics.median(per_cpu["one_process"]),
                    ratio=efficiency, samples=[round(r, 2) for r in per_cpu["processes"]],
                    cpu_ms_per_seed=round(1e3 / statistics.median(per_cpu["processes"]), 3),
                    one_process_cpu_ms_per_seed=round(
                        1e3 / statistics.median(per_cpu["one_process"]), 3),
                    scaling_if_cores_free=round(workers * efficiency, 2), **shared)
        emit_loaded("explore_scale.one_process", statistics.median(one), "seeds/s",
                    samples=[round(r, 2) for r in one], **shared)
        for mode, floor in (("processes", SCALING * workers), ("ray", None)):
            if mode in rates:
                emit_loaded(f"explore_scale.{mode}", statistics.median(rates[mode]),
                            "seeds/s", "one_process", statistics.median(one),
                            ratio=statistics.median(r / b for r, b in zip(rates[mode], one)),
                            floor=floor, target=None if floor is None else
                            f"ratio >= {floor:.1f} ({SCALING} x K)",
                            samples=[round(r, 2) for r in rates[mode]], **shared)
        emit_loaded("explore_scale.processes_of_machine", statistics.median(
            r / b / loop for r, b, loop in zip(rates["processes"], one, loops)),
            "x bare loops' ratio", samples=[round(r / b / loop, 2) for r, b, loop
                                            in zip(rates["processes"], one, loops)],
            **shared)
        if "ray" in pools:
            emit_loaded("explore_scale.ray_batch1", statistics.median(rates["ray_batch1"]),
                        "seeds/s", "ray", statistics.median(rates["ray"]),
                        ratio=statistics.median(r / b for r, b in zip(rates["ray_batch1"],
                                                                      rates["ray"])),
                        samples=[round(r, 2) for r in rates["ray_batch1"]], **shared)
            latency, in_flight, driver = await ray_task_cost(workers)
            emit_loaded("explore_scale.ray_task_round_trip", latency * 1e3, "ms/task",
                        tasks=EMPTY_TASKS // 4)
            emit_loaded("explore_scale.ray_task_cost", in_flight * 1e3, "ms/task",
                        tasks=EMPTY_TASKS, in_flight=2 * workers)
            emit_loaded("explore_scale.ray_driver_cpu", driver * 1e3, "ms/task",
                        tasks=EMPTY_TASKS, in_flight=2 * workers)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.seeds, args.workers, not args.no_ray))
