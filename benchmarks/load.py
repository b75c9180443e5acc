"""Load: many clients, each with a VM of 4 vCPUs, half driving them by unary RunBatch
calls and half by Run streams, against one `vmmu serve` process, for a bounded time.

One JSON line per result, each with its same-run baseline:
- `load_unary_p99_ms` / `load_unary_p50_ms`: RunBatch latency, against the Run streams'
  latency for the same batches (target: p99 within 3x);
- `load_stream_p99_ms` / `load_stream_p50_ms`: Run stream step latency (the baseline of
  the above), against the same step on the idle server;
- `load_throughput`: batches per second, unary and streaming, against the idle server's
  one-vCPU rate;
- `load_probe_max_ms`: the longest a GetVm from a separate process waited, every 20 ms
  through the run, against its p50 on the idle server (target: under 50 ms: no call
  waits long behind any single request);
- `load_loop_busy_max_ms`: the most CPU the server's event loop thread spent between two
  timers of its loop watch (`vmmu_event_loop_busy_seconds`, 5 ms apart, scraped from
  `--metrics` when the measured time starts and ends), as the upper bound of its
  histogram bucket, against the 50 ms target: no step of a request spans two timers, so
  no call waited more than that much work behind any single request; and
  `load_loop_lag_max_ms`, the latest such a timer ran, against the same (it also counts
  the loop thread's waits for a CPU);
- `load_rss_mib`: the server's resident memory at the end, against its value after the
  warm-up (target: flat), with the samples taken every second.

Every line also carries the host's load average over the measured time and how long the
server's event loop thread ran and waited for a CPU then (`/proc/PID/schedstat`): on a
shared host, what the loop waits for a CPU every call waits too.

    python benchmarks/load.py [--clients 64] [--duration 60] [--warmup 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import re
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from benchmarks.report import emit  # noqa: E402
from vmmu.client import AsyncClient, Backing, BatchBuilder  # noqa: E402

MiB = 1 << 20
VCPUS = 4
MEMORY = 16 * MiB
BATCH = 64              # accesses per batch: a write and a read of 8 bytes, 32 times
PROBE_PERIOD = 0.02
TARGET_MS = 50          # no call waits longer than this behind any single request

# The probe runs in its own process, so that its waits are the server's, not this
# process's event loop's: it calls GetVm every PROBE_PERIOD until its stdin closes.
PROBE = """
import json, sys, threading, time
from vmmu.client import Client
client = Client(sys.argv[1])
vm = client.vm(int(sys.argv[2]))
period = float(sys.argv[3])
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
waits = []
while not stop.is_set():
    start = time.perf_counter()
    vm.info()
    waits.append(time.perf_counter() - start)
    time.sleep(period)
print(json.dumps(waits), flush=True)
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def schedstat_s(pid: int) -> tuple[float, float]:
    """Seconds the process's main thread (the event loop's) has run, and waited to run."""
    ran, waited, _ = Path(f"/proc/{pid}/schedstat").read_text().split()
    return int(ran) / 1e9, int(waited) / 1e9


def loop_histograms(metrics_port: int) -> dict[str, dict[float, float]]:
    """The server's event-loop histograms: name -> {bucket upper bound: count}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30) as r:
        text = r.read().decode()
    out: dict[str, dict[float, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name in ("vmmu_event_loop_busy_seconds", "vmmu_event_loop_lag_seconds"):
            out[family.name] = {float(sample.labels["le"]): sample.value
                                for sample in family.samples
                                if sample.name.endswith("_bucket")}
    return out


def gained(before: dict[float, float], after: dict[float, float]) -> dict[float, float]:
    """The observations each bucket of one histogram gained between two scrapes."""
    return {le: count - before.get(le, 0) for le, count in after.items()}


def highest_bucket_ms(gained: dict[float, float]) -> float:
    """The upper bound (ms) of the highest bucket in `gained` with an observation (inf:
    above the last bound; 0: none)."""
    total = gained[float("inf")]
    if not total:
        return 0.0
    return min(le for le, count in gained.items() if count == total) * 1e3


def batch(rng: random.Random) -> object:
    builder = BatchBuilder()
    for _ in range(BATCH // 2):
        gpa = rng.randrange(0, MEMORY, 8)
        builder.write(gpa, data=rng.randbytes(8)).read(gpa, 8, with_data=True)
    return builder.build()


async def make_vm(client: AsyncClient):
    vm = await client.create_vm(max_vcpus=VCPUS)
    region = await vm.mmap(MEMORY, Backing.PAGE_4K)
    await vm.set_user_memory_region(slot=0, flags=0, guest_phys_addr=0, memory_size=MEMORY,
                                    userspace_addr=region.hva)
    await vm.madvise_populate_write(region.hva, MEMORY)     # RSS then stays flat unless leaking
    return vm, [await vm.create_vcpu(i) for i in range(VCPUS)]


class Driver:
    """One vCPU's loop: run a fresh batch, record the latency, again, until `until`."""

    def __init__(self, vcpu, streaming: bool, seed: int) -> None:
        self.vcpu, self.streaming = vcpu, streaming
        self.rng = random.Random(seed)
        self.latencies: list[tuple[float, float]] = []      # (end time, seconds)

    async def run(self, until: float) -> None:
        batches = [batch(self.rng) for _ in range(8)]
        if self.streaming:
            async with self.vcpu.stream() as stream:
                await self._loop(stream.run, batches, until)
        else:
            await self._loop(self.vcpu.run, batches, until)

    async def _loop(self, run, batches, until: float) -> None:
        i = 0
        while time.time() < until:       # wall clock: `until` is shared by processes
            began = time.perf_counter()
            await run(batches[i % len(batches)])
            self.latencies.append((time.time(), time.perf_counter() - began))
            i += 1


async def idle_baselines(address: str) -> dict[str, float]:
    """One vCPU on the idle server: unary and streaming step latency, GetVm latency."""
    async with AsyncClient(address) as client:
        vm, vcpus = await make_vm(client)
        out = {}
        for streaming in (False, True):
            driver = Driver(vcpus[0], streaming, seed=1)
            await driver.run(time.time() + 2.0)
            out["stream" if streaming else "unary"] = statistics.median(
                s for _, s in driver.latencies)
            out[("stream" if streaming else "unary") + "_rate"] = len(driver.latencies) / 2.0
        waits = []
        for _ in range(100):
            start = time.perf_counter()
            await vm.info()
            waits.append(time.perf_counter() - start)
        out["probe"] = statistics.median(waits)
        await vm.destroy()
    return out


async def drive(address: str, first: int, count: int, streaming: bool, pipe) -> None:
    """Clients first..first+count-1, all unary or all streaming: make their VMs, say so
    on `pipe`, receive the time to stop at, drive, send [streaming, end, seconds] per run."""
    connections = [AsyncClient(address) for _ in range(count)]
    vms = [await make_vm(client) for client in connections]
    drivers = [Driver(vcpu, streaming, seed=(first + c) * VCPUS + i)
               for c, (_, vcpus) in enumerate(vms) for i, vcpu in enumerate(vcpus)]
    pipe.send("ready")
    until = await asyncio.to_thread(pipe.recv)
    cpu_start = time.process_time()
    await asyncio.gather(*(d.run(until) for d in drivers))
    for client in connections:
        await client.close()
    pipe.send(([[d.streaming, end, s] for d in drivers for end, s in d.latencies],
               time.process_time() - cpu_start))


def worker(address: str, first: int, count: int, streaming: bool, pipe) -> None:
    """A client process of one kind, with its own event loop: what a caller of one kind
    waits for is the server, not the other kind's client work in the same process."""
    asyncio.run(drive(address, first, count, streaming, pipe))
    pipe.close()


async def load(address: str, server_pid: int, metrics_port: int, clients: int, workers: int,
               duration: float, warmup: float) -> None:
    idle_loop = await asyncio.to_thread(loop_histograms, metrics_port)
    idle = await idle_baselines(address)
    idle_loop = {name: highest_bucket_ms(gained(idle_loop[name], after)) for name, after in
                 (await asyncio.to_thread(loop_histograms, metrics_port)).items()}
    async with AsyncClient(address) as client:
        probe_vm, _ = await make_vm(client)
    probe = subprocess.Popen([sys.executable, "-c", PROBE, address, str(probe_vm.id),
                              str(PROBE_PERIOD)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    context = multiprocessing.get_context("spawn")
    pipes, processes = [], []
    for w in range(workers):
        first, count = w * clients // workers, (w + 1) * clients // workers - w * clients // workers
        pipe, theirs = context.Pipe()
        process = context.Process(target=worker, args=(address, first, count, w % 2 == 1, theirs))
        process.start()
        pipes.append(pipe)
        processes.append(process)
    for pipe in pipes:
        assert await asyncio.to_thread(pipe.recv) == "ready"     # every VM made, populated
    start = time.time()
    until = start + warmup + duration
    for pipe in pipes:
        pipe.send(until)
    rss: list[tuple[float, float]] = []
    sched = load_average = None
    while time.time() < until:
        if sched is None and time.time() >= start + warmup:
            sched, load_average = schedstat_s(server_pid), os.getloadavg()[0]
            loop_start = await asyncio.to_thread(loop_histograms, metrics_port)
        rss.append((round(time.time() - start, 1), round(rss_mib(server_pid), 1)))
        await asyncio.sleep(1.0)
    ran, waited = (now - then for now, then in zip(schedstat_s(server_pid), sched))
    loop_end = await asyncio.to_thread(loop_histograms, metrics_port)
    load_average = (load_average, os.getloadavg()[0])
    results = [await asyncio.to_thread(pipe.recv) for pipe in pipes]
    runs = [run for worker_runs, _ in results for run in worker_runs]
    client_cpu = {kind: round(sum(cpu for w, (_, cpu) in enumerate(results)
                                  if (w % 2 == 1) is (kind == "stream")), 1)
                  for kind in ("unary", "stream")}
    for process in processes:
        process.join()
    probe.stdin.close()
    waits = json.loads(probe.stdout.read())
    probe.wait()

    measured_from = start + warmup
    kinds = {kind: [s for streaming, end, s in runs if streaming is (kind == "stream")
                    and end >= measured_from] for kind in ("unary", "stream")}
    common = {"clients": clients, "vcpus_per_client": VCPUS, "client_processes": workers,
              "duration_s": duration, "warmup_s": warmup, "batch_accesses": BATCH,
              "host_load_average": load_average, "server_loop_ran_s": round(ran, 1),
              "server_loop_waited_s": round(waited, 1)}
    stream_p99, stream_p50 = percentile(kinds["stream"], 0.99), percentile(kinds["stream"], 0.5)
    emit("load_unary_p99_ms", percentile(kinds["unary"], 0.99) * 1e3, "ms",
         "stream p99 under the same load", stream_p99 * 1e3, limit=3, **common)
    emit("load_unary_p50_ms", percentile(kinds["unary"], 0.5) * 1e3, "ms",
         "stream p50 under the same load", stream_p50 * 1e3, **common)
    emit("load_stream_p99_ms", stream_p99 * 1e3, "ms", "stream step on the idle server",
         idle["stream"] * 1e3, **common)
    emit("load_stream_p50_ms", stream_p50 * 1e3, "ms", "stream step on the idle server",
         idle["stream"] * 1e3, **common)
    for kind in ("unary", "stream"):
        emit(f"load_throughput_{kind}", len(kinds[kind]) / duration, "batches/s",
             f"one vCPU, {kind}, idle server", idle[f"{kind}_rate"],
             client_cpu_s=client_cpu[kind], **common)
    emit("load_probe_max_ms", max(waits) * 1e3, "ms", "GetVm p50 on the idle server",
         idle["probe"] * 1e3, target="< 50 ms", probe_calls=len(waits),
         probe_p99_ms=round(percentile(waits, 0.99) * 1e3, 3), **common)
    for what, name in (("busy", "vmmu_event_loop_busy_seconds"),
                       ("lag", "vmmu_event_loop_lag_seconds")):
        measured = gained(loop_start[name], loop_end[name])
        emit(f"load_loop_{what}_max_ms", highest_bucket_ms(measured), "ms",
             f"the target: {TARGET_MS} ms", TARGET_MS, limit=1.0,
             intervals=measured[float("inf")],
             intervals_over_target=measured[float("inf")] - measured[TARGET_MS / 1e3],
             idle_server_max_ms=idle_loop[name], bucket_upper_bound=True, **common)
    after_warmup = next((mib for t, mib in rss if t >= warmup), rss[0][1])
    emit("load_rss_mib", rss[-1][1], "MiB", "RSS after the warm-up", after_warmup,
         target="flat", samples=rss, **common)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--workers", type=int, default=4,
                        help="client processes (even: half unary, half streaming)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds measured")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds not measured")
    args = parser.parse_args()
    server = subprocess.Popen([sys.executable, "-m", "vmmu.cli", "serve", "--listen",
                               "127.0.0.1:0", "--metrics", "127.0.0.1:0"],
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "VMMU_SANITIZERS": "0"})
    try:
        port = int(server.stdout.readline().rsplit(":", 1)[1])
        metrics_port = int(server.stdout.readline().rsplit(":", 1)[1].split("/")[0])
        asyncio.run(load(f"127.0.0.1:{port}", server.pid, metrics_port, args.clients,
                         args.workers, args.duration, args.warmup))
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
