"""No write is lost by dirty logging under concurrent vCPUs, harvests, flag toggles and
invalidations: the no-lost-dirty-page oracle checks every harvest, the stale-translation
oracle every access."""

import asyncio
import errno
import random

import pytest

from vmmu.server.kvm import (KVM_MEM_LOG_DIRTY_PAGES, AccessBatch, AccessKind, Backing,
                             ExitReason, Kvm, KvmError, VmConfig)

MIB = 1 << 20
VCPUS = 4
ROUNDS = 10
SIZE = 4 * MIB


async def _writer(vcpu, rng: random.Random, vm) -> int:
    done = 0
    for _ in range(ROUNDS):
        batch = AccessBatch.build((rng.randrange(SIZE >> 12) << 12, AccessKind.WRITE, 8, None)
                                  for _ in range(48))
        result = await vcpu.run(batch)
        while result.exit.reason is ExitReason.DIRTY_RING_FULL:
            for cpu in vm.vcpus():
                vm.harvest_dirty_ring(cpu.id)
            await vm.reset_dirty_rings()
            result = await vcpu.run(batch)
        assert result.exit.reason is ExitReason.DONE, result.exit
        done += result.completed
        await asyncio.sleep(0)
    return done


@pytest.mark.parametrize("mmu", ["tdp", "legacy"])
@pytest.mark.parametrize("mode", ["bitmap", "manual_protect", "ring"])
@pytest.mark.parametrize("schedule_seed", [None, 11])
async def test_every_guest_write_reaches_the_next_harvest(mode, schedule_seed, mmu):
    config = {"bitmap": {}, "manual_protect": {"manual_dirty_log_protect": 1},
              "ring": {"dirty_ring_size": 4096}}[mode]
    vm = Kvm().create_vm(VmConfig(max_vcpus=VCPUS, sanitizers=True, name="dirty-stress",
                                  schedule_seed=schedule_seed, mmu=mmu, **config))
    region = vm.mmap(SIZE, Backing.THP)
    await vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, SIZE, region.hva)
    vcpus = [vm.create_vcpu(i) for i in range(VCPUS)]
    stop = asyncio.Event()
    rng = random.Random(3)
    counts = {"harvests": 0, "toggles": 0, "migrations": 0, "while_off": 0}

    async def harvester():
        while not stop.is_set():
            if mode == "ring":
                for cpu in vcpus:
                    vm.harvest_dirty_ring(cpu.id)
                await vm.reset_dirty_rings()
            else:
                try:
                    bitmap = await vm.get_dirty_log(0)
                    if mode == "manual_protect":
                        await vm.clear_dirty_log(0, 0, SIZE >> 12, bitmap)
                except KvmError as e:
                    assert e.errno == errno.ENOENT    # the toggler has logging off right now
                    counts["while_off"] += 1
            counts["harvests"] += 1
            await asyncio.sleep(0)

    async def toggler():
        while not stop.is_set():
            for _ in range(30):
                await asyncio.sleep(0)
            await vm.set_user_memory_region(0, 0, 0, SIZE, region.hva)
            await asyncio.sleep(0)
            await vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, SIZE, region.hva)
            counts["toggles"] += 1

    async def host():
        while not stop.is_set():
            await vm.migrate_pages(region.hva + rng.randrange(SIZE >> 12) * 4096, 4096)
            counts["migrations"] += 1
            for _ in range(5):
                await asyncio.sleep(0)

    async def writers():
        try:
            return await asyncio.gather(*(_writer(v, random.Random(i), vm)
                                          for i, v in enumerate(vcpus)))
        finally:
            stop.set()

    done, *_ = await asyncio.wait_for(
        asyncio.gather(writers(), harvester(), toggler(), host()), timeout=120)
    assert not vm.info().dead, vm.death
    assert all(n == ROUNDS * 48 for n in done)
    assert counts["harvests"] > 0 and counts["migrations"] > 0
    assert vm.sanitizers.accesses_checked >= VCPUS * ROUNDS * 48
    # The no-lost-dirty-page oracle had the guest's writes to check at the harvests.
    assert vm.sanitizers.dirty_pages_checked >= VCPUS * ROUNDS
    await vm.destroy()
