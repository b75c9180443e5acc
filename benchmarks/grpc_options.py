"""grpc.aio server settings on the calls they would change: the server's response
compression (gzip against none) on large ReadHva and GetDirtyLog replies, against a
`vmmu serve` process on 127.0.0.1, each setting's server started once and the runs
interleaved (which goes first alternates).

- `grpc_options.read_hva_16m_{zeros,random}`: ReadHva of 16 MiB (the largest reply the
  default limits allow) of never-written memory, and of memory filled with random bytes;
- `grpc_options.get_dirty_log_256m`: GET_DIRTY_LOG of a 256 MiB slot with every page
  dirty (an 8 KiB bitmap), the pages dirtied again between harvests (not timed).

The value is the gzip server's MiB/s (harvests/s), the baseline today's server (no
compression); the ratio is gzip's throughput over none's. The server under test applies
the compression through `grpc.aio.server(compression=...)`; vmmu itself sets none.

    python benchmarks/grpc_options.py [--runs N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import emit  # noqa: E402
from vmmu.client import KVM_MEM_LOG_DIRTY_PAGES, Backing, BatchBuilder, Client  # noqa: E402

MiB = 1 << 20
READ = 16 * MiB
DIRTY_SLOT = 256 * MiB
SETTINGS = ("none", "gzip")

# `vmmu serve` with the server's response compression set to argv[1].
_SERVER = """
import functools, sys, grpc
grpc.aio.server = functools.partial(grpc.aio.server, compression={
    "none": grpc.Compression.NoCompression, "gzip": grpc.Compression.Gzip}[sys.argv[1]])
from vmmu.cli import main
sys.exit(main(["serve", "--listen", "127.0.0.1:0"]))
"""


def _start(setting: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-c", _SERVER, setting], stdout=subprocess.PIPE,
                            text=True)
    return proc, int(proc.stdout.readline().rsplit(":", 1)[1])


class Guest:
    """A VM with a zero region, a random region and a dirty-logged 256 MiB slot."""

    def __init__(self, client: Client) -> None:
        self.vm = client.create_vm(max_vcpus=1)
        self.zeros = self.vm.mmap(READ, Backing.PAGE_4K)
        self.random = self.vm.mmap(READ, Backing.PAGE_4K)
        data = os.urandom(READ)
        for off in range(0, READ, 4 * MiB):
            self.vm.write_hva(self.random.hva + off, data[off:off + 4 * MiB])
        logged = self.vm.mmap(DIRTY_SLOT, Backing.PAGE_4K)
        self.vm.set_user_memory_region(slot=0, flags=KVM_MEM_LOG_DIRTY_PAGES,
                                       guest_phys_addr=0, memory_size=DIRTY_SLOT,
                                       userspace_addr=logged.hva)
        self.vcpu = self.vm.create_vcpu(0)
        dirty = BatchBuilder()
        for gpa in range(0, DIRTY_SLOT, 4096):
            dirty.write(gpa, 1)
        self.dirty = dirty.build()

    def read(self, hva: int) -> float:
        start = time.perf_counter()
        data = self.vm.read_hva(hva, READ)
        elapsed = time.perf_counter() - start
        assert len(data) == READ
        return elapsed

    def harvest(self) -> float:
        self.vcpu.run(self.dirty)
        start = time.perf_counter()
        bitmap = self.vm.get_dirty_log(0)
        elapsed = time.perf_counter() - start
        assert bitmap.count(0xff) == len(bitmap) == DIRTY_SLOT // 4096 // 8
        return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    servers = {s: _start(s) for s in SETTINGS}
    clients = {s: Client(f"127.0.0.1:{port}") for s, (_, port) in servers.items()}
    samples = {(s, what): [] for s in SETTINGS for what in ("zeros", "random", "dirty")}
    cpu = {s: 0.0 for s in SETTINGS}
    try:
        guests = {s: Guest(c) for s, c in clients.items()}
        for i in range(args.runs):
            for s in SETTINGS if i % 2 == 0 else SETTINGS[::-1]:
                g = guests[s]
                cpu0 = time.process_time()
                samples[s, "zeros"].append(g.read(g.zeros.hva))
                samples[s, "random"].append(g.read(g.random.hva))
                samples[s, "dirty"].append(g.harvest())
                cpu[s] += time.process_time() - cpu0
    finally:
        for c in clients.values():
            c.close()
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
    for what, name in (("zeros", "read_hva_16m_zeros"), ("random", "read_hva_16m_random")):
        t = {s: statistics.median(samples[s, what]) for s in SETTINGS}
        emit(f"grpc_options.{name}", READ / MiB / t["gzip"], "MiB/s", "no_compression",
             READ / MiB / t["none"], ratio=t["none"] / t["gzip"], digits=1, runs=args.runs,
             server="separate process on 127.0.0.1", setting="server compression gzip")
    t = {s: statistics.median(samples[s, "dirty"]) for s in SETTINGS}
    emit("grpc_options.get_dirty_log_256m", 1 / t["gzip"], "harvests/s", "no_compression",
         1 / t["none"], ratio=t["none"] / t["gzip"], digits=1, runs=args.runs,
         client_cpu_s=round(cpu["gzip"], 2), baseline_client_cpu_s=round(cpu["none"], 2),
         setting="server compression gzip", every_page_dirty=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
