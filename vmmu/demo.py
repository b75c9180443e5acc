"""`vmmu demo`: an in-process server on a free localhost port, driven through the client.

One VM, two memslots (256 MiB THP-backed at gpa 0, 2M aligned, so it maps 2M pages; 192 MiB
of 4K pages at 1 GiB), two vCPUs streaming batches of accesses concurrently: demand faults
at 2M and 4K, then TLB hits, data written by the guest and read back through the hva, and
one MMIO read outside every memslot completed by the client. Prints a short report.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

from vmmu import event_loop
from vmmu.client import AsyncClient, AsyncVcpu, Backing, BatchBuilder, ExitReason
from vmmu.server.rpc.app import start_server

__all__ = ["run_demo"]

MiB = 1 << 20
GiB = 1 << 30
THP_SLOT = (0, 0, 256 * MiB)           # slot, gpa, size
SMALL_SLOT = (1, 1 * GiB, 192 * MiB)
MMIO_GPA = 0xFEE0_0000                 # where a local APIC would be: no memslot
BATCH = 10_000


@dataclass
class _Workload:
    base: int
    size: int
    accesses: int
    seed: int


async def _drive(vcpu: AsyncVcpu, work: _Workload, with_mmio: bool) -> tuple[int, int]:
    """Stream the workload in batches; returns (accesses completed, MMIO exits handled)."""
    rng = random.Random(work.seed)
    pages = work.size >> 12
    done = mmio = 0
    async with vcpu.stream() as stream:
        for start in range(0, work.accesses, BATCH):
            builder = BatchBuilder()
            for i in range(start, min(start + BATCH, work.accesses)):
                gpa = work.base + (rng.randrange(pages) << 12) + 8 * rng.randrange(512)
                if i % 4 == 0:
                    builder.write(gpa, data=i.to_bytes(8, "little"))
                else:
                    builder.read(gpa, 8)
            if with_mmio and start == 0:
                builder.read(MMIO_GPA, 4, with_data=True)
            result = await stream.run(builder.build())
            while result.exit.reason is ExitReason.MMIO:
                mmio += 1
                reply = b"" if result.exit.is_write else (0x14).to_bytes(result.exit.length,
                                                                         "little")
                result = await stream.complete_mmio(reply)
            if result.exit.reason is not ExitReason.DONE:
                raise RuntimeError(f"vCPU {vcpu.id} stopped: {result.exit}")
            done += result.completed
    return done, mmio


async def _demo(accesses_per_vcpu: int, mmu: str) -> int:
    server = await start_server("127.0.0.1:0")
    try:
        async with AsyncClient(f"127.0.0.1:{server.port}") as client:
            return await _scenario(client, server.port, accesses_per_vcpu, mmu)
    finally:
        await server.stop()


async def _scenario(client: AsyncClient, port: int, accesses_per_vcpu: int, mmu: str) -> int:
    vm = await client.create_vm(max_vcpus=2, name="demo", mmu=mmu)
    regions = {}
    for (slot, gpa, size), backing in ((THP_SLOT, Backing.THP), (SMALL_SLOT, Backing.PAGE_4K)):
        region = regions[slot] = await vm.mmap(size, backing)
        await vm.set_user_memory_region(slot=slot, flags=0, guest_phys_addr=gpa,
                                        memory_size=size, userspace_addr=region.hva)
    vcpus = [await vm.create_vcpu(0), await vm.create_vcpu(1)]
    work = [_Workload(THP_SLOT[1], THP_SLOT[2], accesses_per_vcpu, seed=1),
            _Workload(SMALL_SLOT[1], SMALL_SLOT[2], accesses_per_vcpu, seed=2)]

    begin = time.perf_counter()
    outcomes = await asyncio.gather(*(_drive(v, w, with_mmio=(v.id == 0))
                                      for v, w in zip(vcpus, work)))
    elapsed = time.perf_counter() - begin

    # Nothing a guest wrote is lost: the VMM reads it back through the hva.
    probe = BatchBuilder().write(SMALL_SLOT[1] + 0x123000, data=b"vmmu-ok!").build()
    await vcpus[1].run(probe)
    echoed = await vm.read_hva(regions[1].hva + 0x123000, 8)

    vm_stats = await vm.stats()
    vcpu_stats = [await v.stats() for v in vcpus]
    total = sum(done for done, _ in outcomes)
    mmio = sum(n for _, n in outcomes)

    def col(name: str) -> str:
        return "".join(f"{s[name]:>12,}" for s in vcpu_stats)

    print(f"vmmu demo: server on 127.0.0.1:{port}, VM {vm.id}, 2 vCPUs, "
          f"{(THP_SLOT[2] + SMALL_SLOT[2]) // MiB} MiB in 2 memslots, the {mmu} MMU")
    print(f"  {'':24}{'vCPU 0':>12}{'vCPU 1':>12}")
    for name, label in (("accesses", "accesses"), ("ept_violations", "EPT violations"),
                        ("pf_taken", "faults taken"), ("pf_fixed", "  fixed"),
                        ("pf_spurious", "  spurious"), ("pf_emulate", "  emulated (MMIO)"),
                        ("pf_mmio_spte_created", "MMIO SPTEs created"),
                        ("mmio_exits", "MMIO exits")):
        print(f"  {label:24}{col(name)}")
    print("  pages mapped:  "
          f"4K {vm_stats['pages_4k']:,}   2M {vm_stats['pages_2m']:,}   "
          f"1G {vm_stats['pages_1g']:,}   (page-table pages "
          f"{vm_stats['tdp_mmu_pages' if mmu == 'tdp' else 'mmu_shadow_pages']:,})")
    print(f"  MMIO exits completed by the client: {mmio}")
    print(f"  guest write read back through the hva: {echoed!r}")
    print(f"  {total:,} accesses in {elapsed:.2f} s: {total / elapsed:,.0f} accesses/s "
          "over the gRPC Run stream")
    ok = (echoed == b"vmmu-ok!" and mmio == 1 and vm_stats["pages_2m"] > 0
          and vm_stats["pages_4k"] > 0)
    await vm.destroy()
    return 0 if ok else 1


def run_demo(accesses_per_vcpu: int = 200_000, mmu: str = "tdp") -> int:
    return event_loop.run(_demo(accesses_per_vcpu, mmu))
