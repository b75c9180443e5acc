"""grpc.aio settings on the calls they would change, each against today's settings: a
`vmmu serve` process on 127.0.0.1 per setting, started once, and the runs interleaved
(the order rotates every run).

- `gzip`: the server's response compression (`grpc.aio.server(compression=Gzip)`);
- `frame_16m`: HTTP/2 frames of up to 16 MiB instead of 16 KiB (`grpc.http2.max_frame_size`
  on the server and the client's channel: each side announces what it receives);
- `keepalive_600s`: `vmmu serve --keepalive 600` (a ping every 300 s) instead of the
  default 2 s (a ping every 1 s on every connection).

On these calls:

- `grpc_options.read_hva_16m_{zeros,random}`: ReadHva of 16 MiB (the largest reply the
  default limits allow) of never-written memory, and of memory filled with random bytes;
- `grpc_options.get_dirty_log_256m`: GET_DIRTY_LOG of a 256 MiB slot with every page
  dirty (an 8 KiB bitmap), the pages dirtied again between harvests (not timed);
- `grpc_options.run_batch_1m`: RunBatch of the largest batch, 2^20 translation-only reads
  that all hit the TLB (a 9 MiB request; the largest message a client sends).

One line per setting and call: the value is the setting's MiB/s (harvests/s, accesses/s),
the baseline today's, the ratio the setting's throughput over today's (medians of the
runs); beside them the server's CPU seconds in that call over all runs (from
/proc/PID/stat, in clock ticks) and the client's over all of each side's calls.

    python benchmarks/grpc_options.py [--runs N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import emit  # noqa: E402
from vmmu.client import KVM_MEM_LOG_DIRTY_PAGES, Backing, Batch, BatchBuilder, Client  # noqa
from vmmu.client import _base as _channel_options  # noqa: E402

MiB = 1 << 20
RUN_ACCESSES = 1 << 20
READ = 16 * MiB
DIRTY_SLOT = 256 * MiB
FRAME = 16 * MiB - 1                   # HTTP/2's largest frame (2^24 - 1)
BASELINE = "today"
# setting -> (server compression, extra options of the server and the client, serve args)
SETTINGS = {BASELINE: ("none", [], []),
            "gzip": ("gzip", [], []),
            "frame_16m": ("none", [("grpc.http2.max_frame_size", FRAME)], []),
            "keepalive_600s": ("none", [], ["--keepalive", "600"])}

# `vmmu serve` with the server's response compression argv[1] and the extra channel
# options of the JSON argv[2], then the serve arguments after them.
_SERVER = """
import json, sys, grpc
compression = {"none": grpc.Compression.NoCompression, "gzip": grpc.Compression.Gzip}[
    sys.argv[1]]
extra = [tuple(option) for option in json.loads(sys.argv[2])]
make_server = grpc.aio.server
def server(*args, options=(), **kwargs):
    return make_server(*args, options=[*options, *extra], compression=compression, **kwargs)
grpc.aio.server = server
from vmmu.cli import main
sys.exit(main(["serve", "--listen", "127.0.0.1:0", *sys.argv[3:]]))
"""


def _start(setting: str) -> tuple[subprocess.Popen, int]:
    compression, options, args = SETTINGS[setting]
    proc = subprocess.Popen([sys.executable, "-c", _SERVER, compression, json.dumps(options),
                             *args], stdout=subprocess.PIPE, text=True)
    return proc, int(proc.stdout.readline().rsplit(":", 1)[1])


def _connect(setting: str, port: int) -> Client:
    """A client whose channel carries the setting's extra options."""
    extra = SETTINGS[setting][1]
    saved = list(_channel_options.CHANNEL_OPTIONS)
    _channel_options.CHANNEL_OPTIONS[:] = saved + extra
    try:
        return Client(f"127.0.0.1:{port}")
    finally:
        _channel_options.CHANNEL_OPTIONS[:] = saved


class Guest:
    """A VM with a zero region, a random region and a dirty-logged 256 MiB slot, and the
    batch of TLB hits it runs."""

    def __init__(self, client: Client, hits: Batch, server_pid: int) -> None:
        self.server_pid = server_pid
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
        self.hits = hits
        self.vcpu.run(hits)                    # maps the pages: every later access hits

    def timed(self, call, *args) -> tuple[object, float, float]:
        """call(*args)'s result, wall seconds and the server's CPU seconds."""
        cpu, start = _cpu_s(self.server_pid), time.perf_counter()
        result = call(*args)
        return result, time.perf_counter() - start, _cpu_s(self.server_pid) - cpu

    def read(self, hva: int) -> tuple[float, float]:
        data, wall, cpu = self.timed(self.vm.read_hva, hva, READ)
        assert len(data) == READ
        return wall, cpu

    def harvest(self) -> tuple[float, float]:
        self.vcpu.run(self.dirty)
        bitmap, wall, cpu = self.timed(self.vm.get_dirty_log, 0)
        assert bitmap.count(0xff) == len(bitmap) == DIRTY_SLOT // 4096 // 8
        return wall, cpu

    def run_batch(self) -> tuple[float, float]:
        result, wall, cpu = self.timed(self.vcpu.run, self.hits)
        assert result.completed == RUN_ACCESSES
        return wall, cpu


def _cpu_s(pid: int) -> float:
    """The CPU seconds (user and system) process `pid` has used: /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


CALLS = {"zeros": ("read_hva_16m_zeros", "MiB/s", READ / MiB),
         "random": ("read_hva_16m_random", "MiB/s", READ / MiB),
         "dirty": ("get_dirty_log_256m", "harvests/s", 1),
         "run": ("run_batch_1m", "accesses/s", RUN_ACCESSES)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    names = list(SETTINGS)
    servers = {s: _start(s) for s in names}
    samples = {(s, what): [] for s in names for what in CALLS}
    server_cpu = {(s, what): 0.0 for s in names for what in CALLS}
    cpu = {s: 0.0 for s in names}
    clients = {}
    try:
        clients = {s: _connect(s, port) for s, (_, port) in servers.items()}
        hits = BatchBuilder()
        for i in range(RUN_ACCESSES):
            hits.read(i % 512 * 4096, 8)
        guests = {s: Guest(c, hits.build(), servers[s][0].pid) for s, c in clients.items()}
        for i in range(args.runs):
            for s in names[i % len(names):] + names[:i % len(names)]:
                g = guests[s]
                cpu0 = time.process_time()
                for what, (wall, spent) in (("zeros", g.read(g.zeros.hva)),
                                            ("random", g.read(g.random.hva)),
                                            ("dirty", g.harvest()), ("run", g.run_batch())):
                    samples[s, what].append(wall)
                    server_cpu[s, what] += spent
                cpu[s] += time.process_time() - cpu0
    finally:
        for c in clients.values():
            c.close()
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
    for s in names[1:]:
        for what, (name, unit, amount) in CALLS.items():
            t, base = (statistics.median(samples[side, what]) for side in (s, BASELINE))
            emit(f"grpc_options.{name}", amount / t, unit, "today's settings", amount / base,
                 ratio=base / t, digits=1, runs=args.runs, setting=s,
                 server_cpu_s=round(server_cpu[s, what], 2),
                 baseline_server_cpu_s=round(server_cpu[BASELINE, what], 2),
                 client_cpu_s=round(cpu[s], 2), baseline_client_cpu_s=round(cpu[BASELINE], 2),
                 server="separate process on 127.0.0.1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
