"""uvloop against asyncio's default loop (vmmu/event_loop.py), interleaved run by run.

- `event_loop.simulator`: the virtual-time demand-fault workload of `vmmu scale`
  (`scale.demand_faults`, design read+rcu), `--vcpus` x `--pages`, on each loop in turn:
  faults per CPU second (and per wall second beside); `identical` says whether the
  virtual-time results were byte-identical on both loops (they must be);
- `event_loop.run_stream_busy_core`: foundation's Run stream (10k-access batches, one and
  four in flight) against a `vmmu serve` process on each loop, the client on the same
  loop, while another process keeps one core busy; the ratio to in-process is the figure
  foundation reports, and the line's `ratio` is uvloop's throughput over asyncio's.

    python benchmarks/event_loop.py [--runs N] [--vcpus V] [--pages P] [--no-stream]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.foundation import (STREAM_BATCH, _busy_core, _stream_pipelined,  # noqa: E402
                                   _vm_with_slot, _wire, access_pattern)
from benchmarks.report import emit, row  # noqa: E402
from vmmu import event_loop  # noqa: E402
from vmmu.scale import demand_faults  # noqa: E402
from vmmu.server.kvm import AccessBatch, AccessKind, Backing, make_op  # noqa: E402

LOOPS = ("asyncio", "uvloop")


def simulator(runs: int, vcpus: int, pages: int) -> None:
    cpu: dict[str, list[float]] = {name: [] for name in LOOPS}
    wall: dict[str, list[float]] = {name: [] for name in LOOPS}
    results: dict[str, set[str]] = {name: set() for name in LOOPS}
    for i in range(runs):
        for name in LOOPS if i % 2 == 0 else LOOPS[::-1]:     # alternate which goes first
            start, cpu0 = time.perf_counter(), time.process_time()
            out = event_loop.run(demand_faults(vcpus, pages, "read+rcu"), name)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - cpu0)
            results[name].add(json.dumps(out, sort_keys=True))
    faults = vcpus * pages
    per_cpu = {name: faults / statistics.median(cpu[name]) for name in LOOPS}
    identical = len(results["asyncio"] | results["uvloop"]) == 1
    emit("event_loop.simulator", per_cpu["uvloop"], "faults/cpu_s", "asyncio",
         per_cpu["asyncio"], digits=0, runs=runs, vcpus=vcpus, pages=pages,
         design="read+rcu", cpu_s=round(statistics.median(cpu["uvloop"]), 2),
         baseline_cpu_s=round(statistics.median(cpu["asyncio"]), 2),
         wall_s=round(statistics.median(wall["uvloop"]), 2),
         baseline_wall_s=round(statistics.median(wall["asyncio"]), 2),
         faults_per_wall_s=round(faults / statistics.median(wall["uvloop"])),
         baseline_faults_per_wall_s=round(faults / statistics.median(wall["asyncio"])),
         identical=identical)


def _start_server(loop: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "vmmu.cli", "serve", "--listen",
                             "127.0.0.1:0", "--event-loop", loop], stdout=subprocess.PIPE,
                            text=True)
    return proc, int(proc.stdout.readline().rsplit(":", 1)[1])


async def _prepare(port: int, npages: int) -> int:
    from vmmu.client import AsyncClient, Backing as ClientBacking, BatchBuilder
    async with AsyncClient(f"127.0.0.1:{port}") as client:
        vm = await client.create_vm(max_vcpus=1)
        region = await vm.mmap(npages << 12, ClientBacking.PAGE_4K)
        await vm.set_user_memory_region(slot=0, flags=0, guest_phys_addr=0,
                                        memory_size=npages << 12, userspace_addr=region.hva)
        vcpu = await vm.create_vcpu(0)
        warm = BatchBuilder()
        for g in range(npages):
            warm.read(g << 12, 1)
        await vcpu.run(warm.build())
        return vm.id


async def _in_process(batches: list, npages: int, runs: int) -> list[float]:
    _, _, vcpu = await _vm_with_slot(npages << 12, Backing.PAGE_4K)
    for gpas, ops in batches:
        await vcpu.run(AccessBatch.from_wire(gpas, ops))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        for gpas, ops in batches:
            await vcpu.run(AccessBatch.from_wire(gpas, ops))
        times.append(time.perf_counter() - start)
    return times


def run_stream_busy_core(runs: int, n: int) -> None:
    npages = 4096
    gfns = access_pattern(n, npages)
    op = make_op(AccessKind.READ, 8, False)
    batches = [_wire(gfns[i:i + STREAM_BATCH], op) for i in range(0, n, STREAM_BATCH)]
    servers = {name: _start_server(name) for name in LOOPS}
    load = _busy_core()
    samples = {(name, depth): [] for name in LOOPS for depth in (1, 4)}
    local: list[float] = []
    try:
        vm_ids = {name: event_loop.run(_prepare(port, npages), name)
                  for name, (_, port) in servers.items()}
        for i in range(runs):
            local += event_loop.run(_in_process(batches, npages, 1), "asyncio")
            for name in LOOPS if i % 2 == 0 else LOOPS[::-1]:
                port = servers[name][1]
                for depth in (1, 4):
                    samples[name, depth].append(event_loop.run(
                        _stream_pipelined(port, vm_ids[name], batches, depth), name))
    finally:
        for child in (load, *(proc for proc, _ in servers.values())):
            child.terminate()
            child.wait(timeout=30)
    base = statistics.median(local)
    for depth in (1, 4):
        t = {name: statistics.median(samples[name, depth]) for name in LOOPS}
        emit("event_loop.run_stream_busy_core", n / t["uvloop"], "accesses/s", "asyncio",
             n / t["asyncio"], ratio=t["asyncio"] / t["uvloop"], digits=0, runs=runs,
             in_flight=depth, batch=STREAM_BATCH,
             of_in_process=round(base / t["uvloop"], 3),
             baseline_of_in_process=round(base / t["asyncio"], 3),
             in_process_loop="asyncio", load="another process keeps one core busy")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--vcpus", type=int, default=256)
    parser.add_argument("--pages", type=int, default=256)
    parser.add_argument("--accesses", type=int, default=200_000)
    parser.add_argument("--no-stream", action="store_true")
    parser.add_argument("--no-simulator", action="store_true")
    args = parser.parse_args()
    if event_loop.loop_name("auto") != "uvloop":
        row(benchmark="event_loop", skipped=f"uvloop is not installed: {event_loop.FAST_INSTALL}")
        return 0
    if not args.no_simulator:
        simulator(args.runs, args.vcpus, args.pages)
    if not args.no_stream:
        run_stream_busy_core(args.runs, args.accesses)
    return 0


if __name__ == "__main__":
    sys.exit(main())
