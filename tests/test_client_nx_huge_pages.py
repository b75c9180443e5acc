"""The NX huge page mitigation over the wire, with both clients: the VM option, fetches
mapped 4K, the stat, the recovery call, and bad input refused with nothing changed."""

from __future__ import annotations

import asyncio

import pytest

from vmmu.client import (Backing, BatchBuilder, ExitReason, FailedPrecondition,
                         InvalidArgument)

MIB = 1 << 20
PAGE = 4096


async def nx_guest(client, **config):
    """8 MiB of THP memory the host has written, at gpa 0."""
    vm = await client.create_vm(**config)
    region = await vm.mmap(8 * MIB, Backing.THP)
    await vm.madvise_populate_write(region.hva, 8 * MIB)
    await vm.set_user_memory_region(slot=0, flags=0, guest_phys_addr=0, memory_size=8 * MIB,
                                    userspace_addr=region.hva)
    return vm, await vm.create_vcpu(0)


async def run(vcpu, batch: BatchBuilder) -> None:
    assert (await vcpu.run(batch.build())).exit.reason is ExitReason.DONE


async def test_fetches_map_4k_and_recovery_lets_reads_map_huge(client):
    vm, vcpu = await nx_guest(client, nx_huge_pages=True)
    assert (await vm.info()).config.nx_huge_pages
    await run(vcpu, BatchBuilder().read(0).fetch(2 * MIB).fetch(4 * MIB))
    leaf = (await vm.walk(0))[-1]
    assert (leaf.level, leaf.executable) == (2, False)
    assert [(s.level, s.executable) for s in [(await vm.walk(2 * MIB))[-1]]] == [(1, True)]
    assert (await vm.stats())["nx_lpage_splits"] == 2

    assert await vm.recover_nx_huge_pages(2) == 1            # the oldest: 2 MiB
    assert (await vm.stats())["nx_lpage_splits"] == 1
    await run(vcpu, BatchBuilder().read(2 * MIB + PAGE).read(4 * MIB + PAGE))
    assert (await vm.walk(2 * MIB))[-1].level == 2
    assert (await vm.walk(4 * MIB))[-1].level == 1           # still disallowed


async def test_the_mitigation_is_off_by_default_and_its_bad_calls_change_nothing(client):
    vm, vcpu = await nx_guest(client)
    assert not (await vm.info()).config.nx_huge_pages
    await run(vcpu, BatchBuilder().fetch(0))
    assert (await vm.walk(0))[-1].level == 2
    with pytest.raises(FailedPrecondition, match="nx_huge_pages off"):
        await vm.recover_nx_huge_pages(1)

    nx, vcpu = await nx_guest(client, nx_huge_pages=True)
    await run(vcpu, BatchBuilder().fetch(0))
    with pytest.raises(InvalidArgument, match="EINVAL"):
        await nx.recover_nx_huge_pages(0)
    assert (await nx.stats())["nx_lpage_splits"] == 1


async def test_a_legacy_mmu_vm_takes_the_mitigation(client):
    vm, vcpu = await nx_guest(client, mmu="legacy", nx_huge_pages=True)
    assert (await vm.info()).config.nx_huge_pages
    await run(vcpu, BatchBuilder().fetch(0))
    assert (await vm.walk(0))[-1].level == 1
    assert (await vm.stats())["nx_lpage_splits"] == 1
    assert await vm.recover_nx_huge_pages(1) == 1
    await run(vcpu, BatchBuilder().read(PAGE))
    assert (await vm.walk(0))[-1].level == 2


async def test_the_recovery_worker_over_the_wire(client):
    vm, vcpu = await nx_guest(client, mmu="legacy", nx_huge_pages=True,
                              nx_huge_pages_recovery_ratio=1,
                              nx_huge_pages_recovery_period_ms=10)
    config = (await vm.info()).config
    assert (config.nx_huge_pages_recovery_ratio,
            config.nx_huge_pages_recovery_period_ms) == (1, 10)
    await run(vcpu, BatchBuilder().fetch(0))
    async with asyncio.timeout(5):
        while (await vm.stats())["nx_lpage_splits"]:
            await asyncio.sleep(0.01)
    await run(vcpu, BatchBuilder().read(PAGE))
    assert (await vm.walk(0))[-1].level == 2
    vms = len(await client.list_vms())
    for bad in (dict(nx_huge_pages_recovery_ratio=1),
                dict(nx_huge_pages=True, nx_huge_pages_recovery_period_ms=10),
                dict(nx_huge_pages=True, nx_huge_pages_recovery_ratio=1, clock="virtual")):
        with pytest.raises(InvalidArgument, match="nx_huge_pages_recovery|wall time"):
            await client.create_vm(**bad)
    assert len(await client.list_vms()) == vms
