"""Long walks yield mmu_lock the way `tdp_mmu_iter_cond_resched` does."""

import asyncio

from vmmu.server.kvm import AccessBatch, AccessKind, Backing, Kvm, VmConfig

MIB = 1 << 20


async def mapped_guest(pages: int):
    vm = Kvm().create_vm(VmConfig(name="yield"))
    region = vm.mmap(pages << 12, Backing.PAGE_4K)
    await vm.set_user_memory_region(0, 0, 0, pages << 12, region.hva)
    vcpu = vm.create_vcpu(0)
    result = await vcpu.run(AccessBatch.build((g << 12, AccessKind.READ, 1, None)
                                              for g in range(pages)))
    assert result.completed == pages
    return vm, vcpu, region


async def test_a_zap_yields_to_a_waiting_reader_and_still_zaps_everything():
    pages = 4 * 512                                    # 8 MiB at 4K: 4 leaf tables
    vm, vcpu, region = await mapped_guest(pages)
    log = []
    await vm.mmu_lock.acquire_read()                   # hold the lock: the zap must queue

    async def unmapper():
        await vm.munmap(region.hva, region.size)
        log.append(("unmapped", vm.stat.pages_4k))

    async def reader():
        async with vm.mmu_lock.read:                   # queues behind the zap's writer
            log.append(("reader", vm.stat.pages_4k))

    zap = asyncio.create_task(unmapper())
    await asyncio.sleep(0)                             # the invalidation waits for write
    assert vm.mmu_lock.statistics().waiters == 1
    read = asyncio.create_task(reader())
    await asyncio.sleep(0)
    vm.mmu_lock.release_read()                         # the zap runs, the reader waits
    await asyncio.gather(zap, read)
    assert vm.stats()["tdp_mmu_yields"] >= 1
    # The reader ran in the middle of the zap, when part of the range was still mapped.
    assert log[0][0] == "reader" and 0 < log[0][1] < pages
    assert log[-1] == ("unmapped", 0)
    assert vm.stats()["remote_tlb_flush_requests"] >= 2  # before the yield, and at the end


async def test_an_uncontended_zap_yields_only_after_a_batch():
    from vmmu.server.kvm.tdp_mmu import YIELD_BATCH
    pages = 2 * 512
    vm, _, region = await mapped_guest(pages)
    await vm.munmap(region.hva, region.size)
    assert vm.stat.pages_4k == 0
    # Visiting 2 tables' worth of SPTEs plus the upper levels stays under one batch.
    assert pages + 8 < YIELD_BATCH
    assert vm.stats()["tdp_mmu_yields"] == 0


async def test_a_yielded_walk_makes_progress_under_constant_contention():
    pages = 4 * 512
    vm, _, region = await mapped_guest(pages)
    stop = asyncio.Event()
    readers_done = 0

    async def hammer():
        nonlocal readers_done
        while not stop.is_set():
            async with vm.mmu_lock.read:
                readers_done += 1
            await asyncio.sleep(0)

    await vm.mmu_lock.acquire_read()
    zap = asyncio.create_task(vm.munmap(region.hva, region.size))
    await asyncio.sleep(0)
    hammers = [asyncio.create_task(hammer()) for _ in range(3)]
    await asyncio.sleep(0)
    vm.mmu_lock.release_read()
    await zap
    during_zap = readers_done
    stop.set()
    await asyncio.gather(*hammers)
    # The readers got the lock while the zap was under way, and the zap still finished:
    # after a yield it restarts from the root where it stopped, not from the start.
    assert vm.stat.pages_4k == 0
    assert vm.stats()["tdp_mmu_yields"] >= 1 and during_zap >= 3
