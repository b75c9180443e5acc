"""Foundation benchmarks: TLB hits, demand faults, the gRPC Run stream, page-table memory.

Every result is one JSON line with the median of several runs and its ratio to a baseline
measured in the same run:
- `bare_loop`: a CPython loop doing one `array('Q')` index per access over the same gfns;
- `in_process`: the same batches run through the model without gRPC (the Run stream
  also with another process keeping one core busy: `grpc_stream_*_busy_core`).

    python benchmarks/foundation.py [--runs 5] [--accesses 200000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from array import array
from pathlib import Path

import grpc

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import emit  # noqa: E402
from vmmu.client import Backing as ClientBacking  # noqa: E402
from vmmu.client import BatchBuilder, Client  # noqa: E402
from vmmu.server.kvm import (AccessBatch, AccessKind, Backing, Kvm, VmConfig,  # noqa: E402
                             make_op)
from vmmu.v1 import vcpu_pb2, vcpu_pb2_grpc  # noqa: E402

MiB = 1 << 20
STREAM_BATCH = 10_000


def median_of(samples: list[float]) -> float:
    return statistics.median(samples)


def bare_loop_ns(gfns: list[int], npages: int) -> float:
    """ns per access of `for g in gfns: table[g]`."""
    table = array("Q", range(npages))
    start = time.perf_counter()
    for g in gfns:
        table[g]
    return (time.perf_counter() - start) / len(gfns) * 1e9


def access_pattern(n: int, npages: int, stride: int = 7919) -> list[int]:
    return [(i * stride) % npages for i in range(n)]


async def _vm_with_slot(size: int, backing: Backing, config: VmConfig | None = None):
    kvm = Kvm()
    vm = kvm.create_vm(config or VmConfig())
    region = vm.mmap(size, backing)
    await vm.set_user_memory_region(0, 0, 0, size, region.hva)
    return kvm, vm, vm.create_vcpu(0)


def _wire(gfns: list[int], op: int) -> tuple[bytes, bytes]:
    return array("Q", [g << 12 for g in gfns]).tobytes(), bytes([op]) * len(gfns)


async def tlb_hits(runs: int, n: int) -> None:
    npages = 4096
    gfns = access_pattern(n, npages)
    variants = {
        "tlb_hit_translate": make_op(AccessKind.READ, 8, False),
        "tlb_hit_read_data": make_op(AccessKind.READ, 8, True),
    }
    for name, op in variants.items():
        gpas, ops = _wire(gfns, op)
        _, vm, vcpu = await _vm_with_slot(npages << 12, Backing.PAGE_4K)
        await vcpu.run(AccessBatch.from_wire(gpas, ops))          # fault everything in
        ours, bare = [], []
        for _ in range(runs):
            start = time.perf_counter()
            batch = AccessBatch.from_wire(gpas, ops)
            result = await vcpu.run(batch)
            ours.append((time.perf_counter() - start) / n * 1e9)
            assert result.completed == n
            bare.append(bare_loop_ns(gfns, npages))
        assert vcpu.stats()["pf_taken"] == npages, "every access after warm-up must hit"
        ns, base = median_of(ours), median_of(bare)
        emit(name, 1e9 / ns, "accesses/s", "bare_loop", 1e9 / base, ratio=ns / base,
             target="<= 3 (time per access vs bare loop)" if name == "tlb_hit_translate"
             else None, runs=runs, ns_per_access=round(ns, 1), bare_ns_per_access=round(base, 1),
             includes="batch decode + run")


async def demand_faults(runs: int) -> None:
    cases = {"demand_fault_4k": (Backing.PAGE_4K, 16384, 1),
             "demand_fault_2m": (Backing.THP, 256, 512)}
    for name, (backing, faults, step) in cases.items():
        gfns = [i * step for i in range(faults)]
        gpas, ops = _wire(gfns, make_op(AccessKind.WRITE, 8, False))
        ours, bare = [], []
        for _ in range(runs):
            _, vm, vcpu = await _vm_with_slot((faults * step) << 12, backing)
            batch = AccessBatch.from_wire(gpas, ops)
            start = time.perf_counter()
            result = await vcpu.run(batch)
            ours.append((time.perf_counter() - start) / faults * 1e9)
            assert result.completed == faults
            level = "pages_4k" if step == 1 else "pages_2m"
            assert vm.stats()[level] == faults, vm.stats()
            assert vcpu.stats()["pf_fixed"] == faults
            bare.append(bare_loop_ns(gfns, faults * step))
        ns, base = median_of(ours), median_of(bare)
        emit(name, 1e9 / ns, "faults/s", "bare_loop", 1e9 / base, ratio=ns / base,
             runs=runs, ns_per_fault=round(ns, 1))


async def page_table_memory() -> None:
    npages = 65536                                   # 256 MiB mapped at 4K
    _, vm, vcpu = await _vm_with_slot(npages << 12, Backing.PAGE_4K)
    gpas, ops = _wire(list(range(npages)), make_op(AccessKind.READ, 1, False))
    await vcpu.run(AccessBatch.from_wire(gpas, ops))
    stats = vm.stats()
    assert stats["pages_4k"] == npages
    tables = list(vm.tdp.tables.by_pfn.values())
    ept_bytes = len(tables) * 4096
    python_bytes = sum(sys.getsizeof(t.spt) + sys.getsizeof(t) +
                       (sys.getsizeof(t.children) if t.children is not None else 0)
                       for t in tables)
    emit("page_table_bytes_per_4k_page", python_bytes / npages, "bytes", "ept_4k_tables",
         ept_bytes / npages, target="<= 10 bytes", runs=1,
         tables=len(tables), mapped_4k_pages=npages,
         note="value counts the array, children list and MmuPage objects as Python holds them; "
              "baseline_value counts 4 KiB per table as the hardware would")


def _start_server() -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "vmmu.cli", "serve", "--listen",
                             "127.0.0.1:0"], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    return proc, int(line.rsplit(":", 1)[1])


async def _stream_pipelined(port: int, vm_id: int, batches: list, depth: int) -> float:
    """Throughput of the Run stream with `depth` batches in flight; returns seconds."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = vcpu_pb2_grpc.VcpuServiceStub(channel)
        call = stub.Run()
        requests = [vcpu_pb2.RunRequest(vm_id=vm_id, vcpu_id=0,
                                        batch=vcpu_pb2.AccessBatch(gpas=g, ops=o))
                    for g, o in batches]
        start = time.perf_counter()
        sent = received = 0
        while received < len(requests):
            while sent < len(requests) and sent - received < depth:
                await call.write(requests[sent])
                sent += 1
            response = await call.read()
            assert response.result.exit.reason == vcpu_pb2.EXIT_REASON_DONE
            received += 1
        elapsed = time.perf_counter() - start
        await call.done_writing()
        return elapsed


BUSY_BOUND_S = 600            # the longest a busy-core load may run, whatever happens


def _busy_core() -> subprocess.Popen:
    """Another process that keeps one core busy (a Python loop), for at most
    BUSY_BOUND_S seconds; the caller terminates it."""
    loop = f"import time\nend = time.monotonic() + {BUSY_BOUND_S}\n" \
        "while time.monotonic() < end:\n    pass\n"
    return subprocess.Popen([sys.executable, "-c", loop])


async def grpc_stream(runs: int, n: int, busy_core: bool = False) -> None:
    """The Run stream against in-process; with `busy_core`, both while another process
    keeps one core busy."""
    npages = 4096
    gfns = access_pattern(n, npages)
    op = make_op(AccessKind.READ, 8, False)
    batches = [_wire(gfns[i:i + STREAM_BATCH], op) for i in range(0, n, STREAM_BATCH)]

    _, _, vcpu = await _vm_with_slot(npages << 12, Backing.PAGE_4K)
    for gpas, ops in batches:
        await vcpu.run(AccessBatch.from_wire(gpas, ops))

    proc, port = _start_server()
    load = _busy_core() if busy_core else None
    try:
        with Client(f"127.0.0.1:{port}") as client:
            vm = client.create_vm(max_vcpus=1)
            region = vm.mmap(npages << 12, ClientBacking.PAGE_4K)
            vm.set_user_memory_region(slot=0, flags=0, guest_phys_addr=0,
                                      memory_size=npages << 12, userspace_addr=region.hva)
            remote = vm.create_vcpu(0)
            warm = BatchBuilder()
            for g in range(npages):
                warm.read(g << 12, 1)
            remote.run(warm.build())
            vm_id = vm.id
        local, sequential, pipelined = [], [], []
        for _ in range(runs):
            start = time.perf_counter()
            for gpas, ops in batches:
                await vcpu.run(AccessBatch.from_wire(gpas, ops))
            local.append(time.perf_counter() - start)
            sequential.append(await _stream_pipelined(port, vm_id, batches, depth=1))
            pipelined.append(await _stream_pipelined(port, vm_id, batches, depth=4))
    finally:
        for child in filter(None, (load, proc)):
            child.terminate()
            child.wait(timeout=30)
    base = median_of(local)
    suffix = "_busy_core" if busy_core else ""
    for name, samples in (("grpc_stream_sequential", sequential),
                          ("grpc_stream_pipelined", pipelined)):
        t = median_of(samples)
        emit(name + suffix, n / t, "accesses/s", "in_process", n / base, ratio=base / t,
             target=">= 0.75 (throughput vs in-process)", runs=runs, batch=STREAM_BATCH,
             in_flight=1 if name.endswith("sequential") else 4,
             server="separate process on 127.0.0.1",
             load="another process keeps one core busy" if busy_core else "none")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--accesses", type=int, default=200_000)
    args = parser.parse_args()
    await tlb_hits(args.runs, args.accesses)
    await demand_faults(args.runs)
    await grpc_stream(args.runs, args.accesses)
    await grpc_stream(args.runs, args.accesses, busy_core=True)
    await page_table_memory()


if __name__ == "__main__":
    asyncio.run(main())
