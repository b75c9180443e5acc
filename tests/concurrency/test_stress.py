"""Stress: 8 vCPUs fault over several slots while everything that invalidates runs at once.

Host operations (migrate, dontneed, swap, mprotect, KSM, THP split and collapse),
client-held invalidations, aging and memslot changes all race the vCPUs; the sanitizers
(stale translation, no new mapping during invalidation, use-after-free, lock contracts)
must stay silent, and every vCPU must finish its rounds. Bounded in rounds and in time.
"""

import asyncio
import random

import pytest

from vmmu.server.kvm import PROT_READ, PROT_WRITE
from vmmu.server.kvm import (AccessBatch, AccessKind, Backing, ExitReason, KvmError, Kvm,
                             VmConfig)

MIB = 1 << 20
GIB = 1 << 30
VCPUS = 8
ROUNDS = 12
PAUSE_TURNS = 50        # event-loop turns the memslot and aging loops rest between rounds
SLOTS = [  # slot, gpa, size, backing
    (0, 0, 8 * MIB, Backing.THP),
    (1, 1 * GIB, 4 * MIB, Backing.PAGE_4K),
    (2, 2 * GIB, 4 * MIB, Backing.PAGE_4K),       # deleted and created again meanwhile
]


async def _vcpu_loop(vcpu, rng: random.Random, exits: dict) -> int:
    done = 0
    for _ in range(ROUNDS):
        accesses = []
        for _ in range(64):
            _, gpa, size, _ = rng.choice(SLOTS)
            page = gpa + rng.randrange(size >> 12) * 4096
            kind = rng.choice((AccessKind.READ, AccessKind.READ, AccessKind.WRITE))
            data = rng.randbytes(8) if kind is AccessKind.WRITE and rng.random() < .3 else None
            accesses.append((page + 8 * rng.randrange(512), kind, 8, data))
        result = await vcpu.run(AccessBatch.build(accesses))
        while result.exit.reason is not ExitReason.DONE:
            exits[result.exit.reason] = exits.get(result.exit.reason, 0) + 1
            if result.exit.reason is ExitReason.MMIO:       # slot 2 deleted right now
                result = await vcpu.run(mmio_data=b"" if result.exit.is_write
                                        else bytes(result.exit.length))
            elif result.exit.reason is ExitReason.MEMORY_FAULT:   # a write to mprotected memory
                done += result.completed + 1
                break
            else:
                raise AssertionError(f"vCPU {vcpu.id}: {result.exit}")
        else:
            done += result.completed
        await asyncio.sleep(0)
    return done


async def _host_loop(vm, regions, rng: random.Random, stop: asyncio.Event, ops: dict) -> None:
    while not stop.is_set():
        slot, _, size, backing = rng.choice(SLOTS[:2])
        region = regions[slot]
        hva = region.hva + rng.randrange(size >> 12) * 4096
        op = rng.choice(("migrate", "dontneed", "swap", "mprotect", "ksm", "split",
                         "collapse"))
        try:
            if op == "migrate":
                await vm.migrate_pages(hva, 4096)
            elif op == "dontneed":
                await vm.madvise_dontneed(hva, 4096)
            elif op == "swap":
                await vm.swap_out(hva, 4096)
            elif op == "mprotect":
                await vm.mprotect(hva, 4096, PROT_READ)
                await asyncio.sleep(0)
                await vm.mprotect(hva, 4096, PROT_READ | PROT_WRITE)
            elif op == "ksm":
                await vm.ksm_merge([hva, region.hva + rng.randrange(size >> 12) * 4096])
            elif op == "split" and backing is Backing.THP:
                await vm.thp_split(hva)
            elif op == "collapse" and backing is Backing.THP:
                await vm.thp_collapse(hva & ~(2 * MIB - 1))
            ops[op] = ops.get(op, 0) + 1
        except KvmError:
            ops["refused"] = ops.get("refused", 0) + 1   # e.g. nothing there to collapse
        await asyncio.sleep(0)


async def _held_loop(vm, regions, rng: random.Random, stop: asyncio.Event) -> int:
    held = 0
    while not stop.is_set():
        region = regions[rng.choice((0, 1))]
        start = region.hva + rng.randrange(region.size >> 12) * 4096
        handle = await vm.begin_invalidation(start, start + 8 * 4096, lease_s=5)
        for _ in range(rng.randrange(1, 4)):
            await asyncio.sleep(0)
        await vm.end_invalidation(handle)
        held += 1
    return held


async def _aging_loop(vm, regions, rng: random.Random, stop: asyncio.Event) -> int:
    rounds = 0
    while not stop.is_set():
        region = regions[rng.choice(list(regions))]
        start = region.hva + rng.randrange((region.size >> 12) - 64) * 4096
        await vm.clear_young(start, start + 64 * 4096)
        vm.young_bitmap(start, start + 64 * 4096)
        rounds += 1
        for _ in range(PAUSE_TURNS // 10):
            await asyncio.sleep(0)
    return rounds


async def _memslot_loop(vm, regions, stop: asyncio.Event) -> int:
    changes = 0
    slot, gpa, size, _ = SLOTS[2]
    while not stop.is_set():
        await vm.set_user_memory_region(slot, 0, 0, 0, 0)
        await asyncio.sleep(0)
        await vm.set_user_memory_region(slot, 0, gpa, size, regions[slot].hva)
        changes += 1
        for _ in range(PAUSE_TURNS):                  # let the vCPUs use the slot a while
            await asyncio.sleep(0)
    return changes


@pytest.mark.parametrize("mmu", ["tdp", "legacy"])
@pytest.mark.parametrize("schedule_seed", [None, 7])
async def test_everything_at_once_stays_sanitizer_clean(schedule_seed, mmu):
    """Free-running, and under a deterministic schedule that interleaves far more."""
    vm = Kvm().create_vm(VmConfig(max_vcpus=VCPUS, sanitizers=True,
                                  schedule_seed=schedule_seed, name="stress", mmu=mmu))
    regions = {}
    for slot, gpa, size, backing in SLOTS:
        regions[slot] = vm.mmap(size, backing)
        await vm.set_user_memory_region(slot, 0, gpa, size, regions[slot].hva)
    vcpus = [vm.create_vcpu(i) for i in range(VCPUS)]
    rng = random.Random(1234)
    stop = asyncio.Event()
    ops, exits = {}, {}

    async def vcpus_then_stop():
        try:
            return await asyncio.gather(*(_vcpu_loop(v, random.Random(i), exits)
                                          for i, v in enumerate(vcpus)))
        finally:
            stop.set()

    done, _, held, aged, changes = await asyncio.wait_for(asyncio.gather(
        vcpus_then_stop(),
        _host_loop(vm, regions, rng, stop, ops),
        _held_loop(vm, regions, random.Random(5), stop),
        _aging_loop(vm, regions, random.Random(6), stop),
        _memslot_loop(vm, regions, stop)), timeout=120)

    assert not vm.info().dead, vm.death
    assert all(n > 0 for n in done)
    assert vm.sanitizers.accesses_checked >= sum(done) - sum(exits.values())
    assert vm.sanitizers.mappings_checked > 0
    # Everything really did race: each kind of actor got work done during the run.
    assert held > 0 and aged > 0 and changes > 0
    assert sum(v for k, v in ops.items() if k != "refused") > 0
    assert vm.held_invalidations() == []
    assert vm.notifier.mn_active_invalidate_count == 0
    assert vm.notifier.mmu_invalidate_in_progress == 0
    await vm.destroy()
