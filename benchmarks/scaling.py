"""Virtual time: the seeds' sweeps (vmmu.scale) and what the simulator itself costs.

One JSON line per result. The sweeps' lines are deterministic for a seed and a cost table;
the simulator's own lines (kind "simulator") are wall-clock measurements:

- `virtual_vs_wall`: the same one-vCPU workload (demand faults, then TLB hits) on a VM in
  wall time and one in virtual time, interleaved run by run; target <= 1.5;
- `events_per_s`: simulated events (preemption points passed, each a step of the
  simulation) per wall second at 1 and 256 vCPUs, and the actor switches among them;
- `scale_256`: 256 vCPUs x 4096 demand faults each, wall seconds; target <= 60 (with the
  process's CPU seconds beside: on a shared machine wall time also counts others' work);
- `deterministic`: a sweep run twice gives byte-identical JSON;
- `fanned_out`: the sweeps' configurations on K worker processes (or Ray) against one
  process, wall seconds of each and whether their JSON is byte-identical.

The sweeps' own lines run on `--workers K` processes (default: this machine's cores) or
`--ray [ADDRESS]`, as `vmmu scale` does.

    python benchmarks/scaling.py [--quick] [--runs N] [--sweeps seed002,...] [--plot DIR]
                                 [--workers K] [--ray [ADDRESS]]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import row  # noqa: E402
from vmmu.scale import QUICK, SWEEPS, demand_faults, run_sweep  # noqa: E402
from vmmu.server.kvm import AccessBatch, AccessKind, Backing, Kvm, VmConfig  # noqa: E402
from vmmu.server.pool import default_workers  # noqa: E402

PAGE = 4096


async def _one_vcpu(clock: str, pages: int) -> float:
    """Wall seconds of: fault `pages` pages in, then hit each 8 times in the TLB."""
    kvm = Kvm()
    vm = kvm.create_vm(VmConfig(clock=clock, sanitizers=False))
    region = vm.mmap(pages * PAGE, Backing.PAGE_4K)
    await vm.set_user_memory_region(0, 0, 0, pages * PAGE, region.hva)
    vcpu = vm.create_vcpu(0)
    faults = AccessBatch.build([(i * PAGE, AccessKind.WRITE, 1, b"w") for i in range(pages)])
    hits = AccessBatch.build([(i * PAGE, AccessKind.READ, 8, None)
                              for _ in range(8) for i in range(pages)])
    start = time.perf_counter()
    await vcpu.run(faults)
    await vcpu.run(hits)
    wall = time.perf_counter() - start
    await kvm.shutdown()
    return wall


def virtual_vs_wall(runs: int, pages: int) -> None:
    wall, virtual = [], []
    for _ in range(runs):                       # interleaved: both see the same noise
        wall.append(asyncio.run(_one_vcpu("wall", pages)))
        virtual.append(asyncio.run(_one_vcpu("virtual", pages)))
    ratio = statistics.median(v / w for v, w in zip(virtual, wall))
    row(kind="simulator", result="virtual_vs_wall", pages=pages, runs=runs,
         wall_s=round(statistics.median(wall), 4),
         virtual_s=round(statistics.median(virtual), 4), ratio=round(ratio, 3),
         target=1.5, met=ratio <= 1.5)


async def _events_per_s(vcpus: int, pages: int) -> tuple[float, float, int, float]:
    start, cpu = time.perf_counter(), time.process_time()
    result = await demand_faults(vcpus, pages, "read+rcu")
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return wall, cpu, result["points"], result["switches"]


def simulator_speed(pages: int, max_vcpus: int) -> None:
    for vcpus in sorted({1, max_vcpus}):
        wall, cpu, events, switches = asyncio.run(_events_per_s(vcpus, pages))
        row(kind="simulator", result="events_per_s", vcpus=vcpus, pages=pages,
             wall_s=round(wall, 2), cpu_s=round(cpu, 2), events=events, switches=switches,
             events_per_s=round(events / wall), faults_per_wall_s=round(vcpus * pages / wall))
        if vcpus == 256 and pages == 4096:
            row(kind="simulator", result="scale_256", vcpus=vcpus, pages=pages,
                 wall_s=round(wall, 2), cpu_s=round(cpu, 2), target_s=60, met=wall <= 60)


def determinism(quick: bool) -> None:
    options = dict(QUICK["seed002"], max_vcpus=8) if quick else dict(max_vcpus=16, pages=512)
    once = json.dumps(run_sweep("seed002", seed=7, **options), sort_keys=True)
    twice = json.dumps(run_sweep("seed002", seed=7, **options), sort_keys=True)
    row(kind="simulator", result="deterministic", sweep="seed002", identical=once == twice,
         met=once == twice)


def fanned_out(names: list[str], quick: bool, workers: int, ray: str | None) -> None:
    from vmmu.scale import main as sweeps
    lines, wall = {}, {}
    for mode, pool in (("one_process", dict(workers=1)),
                       ("fanned_out", dict(workers=workers, ray=ray))):
        out = io.StringIO()
        start = time.perf_counter()
        sweeps(names, quick=quick, out=out, **pool)
        wall[mode], lines[mode] = time.perf_counter() - start, out.getvalue()
    same = lines["one_process"] == lines["fanned_out"]
    row(kind="simulator", result="fanned_out", sweeps=names, workers=workers, ray=ray,
         wall_s=round(wall["fanned_out"], 2), one_process_wall_s=round(wall["one_process"], 2),
         ratio=round(wall["one_process"] / wall["fanned_out"], 3),
         load=[round(x, 2) for x in os.getloadavg()], identical=same, met=same)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sweeps", default=",".join(SWEEPS))
    parser.add_argument("--no-simulator", action="store_true",
                        help="only the sweeps, no wall-clock measurements")
    parser.add_argument("--plot", metavar="DIR", help="write PNG charts there")
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--ray", nargs="?", const="", metavar="ADDRESS")
    args = parser.parse_args()
    names = [n for n in args.sweeps.split(",") if n]
    from vmmu.scale import main as sweeps
    sweeps(names, quick=args.quick, plot=args.plot, workers=args.workers, ray=args.ray)
    if not args.no_simulator:
        fanned_out(names, args.quick, args.workers, args.ray)
        virtual_vs_wall(args.runs, 256 if args.quick else 2048)
        simulator_speed(256 if args.quick else 4096, 16 if args.quick else 256)
        determinism(args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
