"""The legacy MMU's shadow-page limit (KVM_SET_NR_MMU_PAGES) and the MMU shrinker over the
wire, with both clients; bad input refused with nothing changed."""

from __future__ import annotations

import pytest

from vmmu.client import Backing, BatchBuilder, ExitReason, InvalidArgument, NotFound

MIB = 1 << 20
SPREAD = 2 * MIB                       # one 4K shadow page per 2 MiB touched


async def spread_guest(client, mmu: str, size: int = 256 * MIB):
    vm = await client.create_vm(mmu=mmu)
    region = await vm.mmap(size, Backing.PAGE_4K)
    await vm.set_user_memory_region(slot=0, flags=0, guest_phys_addr=0, memory_size=size,
                                    userspace_addr=region.hva)
    return vm, await vm.create_vcpu(0)


async def read_spread(vcpu, n: int) -> None:
    batch = BatchBuilder()
    for i in range(n):
        batch.read(i * SPREAD)
    assert (await vcpu.run(batch.build())).exit.reason is ExitReason.DONE


async def test_the_limit_zaps_the_oldest_shadow_pages_and_faults_stay_below_it(client):
    vm, vcpu = await spread_guest(client, "legacy")
    await read_spread(vcpu, 100)
    stats = await vm.stats()
    assert stats["mmu_shadow_pages"] == 103 and stats["mmu_shadow_zapped"] == 0
    await vm.set_nr_mmu_pages(80)
    stats = await vm.stats()
    assert stats["mmu_shadow_zapped"] >= 23
    zapped = stats["mmu_shadow_zapped"]
    await read_spread(vcpu, 120)             # new pages: the oldest make room for them
    assert (await vm.stats())["mmu_shadow_zapped"] > zapped


async def test_the_shrinker_zaps_the_oldest_shadow_pages(client):
    vm, vcpu = await spread_guest(client, "legacy", 64 * MIB)
    await read_spread(vcpu, 16)
    assert await vm.mmu_shrink_scan(10) == 10
    assert (await vm.stats())["mmu_shadow_zapped"] == 10
    assert await vm.mmu_shrink_scan(0) == 0
    await read_spread(vcpu, 16)              # the guest goes on: the pages fault back


async def test_the_tdp_mmu_is_not_limited_nor_shrunk(client):
    vm, vcpu = await spread_guest(client, "tdp", 64 * MIB)
    await read_spread(vcpu, 16)
    before = await vm.stats()
    await vm.set_nr_mmu_pages(64)
    assert await vm.mmu_shrink_scan(1000) == 0
    assert await vm.stats() == before


async def test_bad_limits_and_scans_are_refused_and_change_nothing(client):
    vm, vcpu = await spread_guest(client, "legacy")
    await read_spread(vcpu, 100)
    before = await vm.stats()
    with pytest.raises(InvalidArgument, match="below 64"):
        await vm.set_nr_mmu_pages(63)
    with pytest.raises(InvalidArgument, match="below 64"):
        await vm.set_nr_mmu_pages(0)
    with pytest.raises(ValueError):
        await vm.set_nr_mmu_pages(-1)        # not a u64: refused before it is sent
    with pytest.raises(ValueError):
        await vm.mmu_shrink_scan(-1)
    assert await vm.stats() == before
    await read_spread(vcpu, 100)             # no limit was set: nothing zapped
    assert (await vm.stats())["mmu_shadow_zapped"] == 0
    await vm.set_nr_mmu_pages(1 << 63)       # a limit no VM reaches
    assert (await vm.stats())["mmu_shadow_zapped"] == 0
    gone = client.vm(10_000)
    with pytest.raises(NotFound):
        await gone.set_nr_mmu_pages(64)
    with pytest.raises(NotFound):
        await gone.mmu_shrink_scan(1)
