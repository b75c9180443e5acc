"""Client-held invalidations: faults retry and memslot updates wait while a range is held,
and every way a hold ends (by its client, by its lease, by its holder going away, by VM
teardown) runs invalidate_range_end exactly once."""

from __future__ import annotations

import asyncio
import errno
import math

import pytest

from vmmu.server.kvm import AccessBatch, AccessKind, ExitReason, KvmError, NoSuchObject
from vmmu.server.kvm.held import MAX_HELD, HeldInvalidationInfo, HoldState

MIB = 1 << 20
UNSLOTTED_HVA = 0x10_0000_0000      # below every region: hits no memslot


async def settle():
    for _ in range(10):
        await asyncio.sleep(0)


def read(gpa):
    return AccessBatch.build([(gpa, AccessKind.READ, 4, None)])


def quiet(vm) -> tuple[int, int]:
    """(mn_active_invalidate_count, mmu_invalidate_in_progress): (0, 0) when nothing holds."""
    return vm.notifier.mn_active_invalidate_count, vm.notifier.mmu_invalidate_in_progress


async def test_fault_in_a_held_range_retries_until_the_client_ends_it(kvm_guest):
    vm, vcpu, hva = kvm_guest.vm, kvm_guest.vcpu, kvm_guest.region.hva
    held_id = await vm.begin_invalidation(hva, hva + 2 * MIB, lease_s=30)
    assert vm.held_invalidations() == [
        HeldInvalidationInfo(held_id, hva, hva + 2 * MIB, HoldState.HELD, 30)]

    run = asyncio.create_task(vcpu.run(read(0x1000)))
    await settle()
    retries = vcpu.stats()["pf_retry"]
    await settle()
    # The fault retried, and the vCPU now sleeps until an invalidation ends: no spinning.
    assert not run.done() and vcpu.stats()["pf_retry"] == retries > 0

    await vm.end_invalidation(held_id)
    assert (await run).exit.reason is ExitReason.DONE
    assert vm.walk(0x1000)[-1].kind == "leaf"
    assert [(h.id, h.state) for h in vm.ended_invalidations()] == \
        [(held_id, HoldState.ENDED_BY_CLIENT)]
    assert vm.held_invalidations() == [] and quiet(vm) == (0, 0)
    assert vm.stats()["invalidations_held"] == 1


async def test_the_hold_zaps_the_range_when_it_begins(kvm_guest):
    vm, vcpu, hva = kvm_guest.vm, kvm_guest.vcpu, kvm_guest.region.hva
    await vcpu.run(read(0x1000))
    seq = vm.notifier.mmu_invalidate_seq
    held_id = await vm.begin_invalidation(hva, hva + 4096, lease_s=30)
    assert vm.walk(0x1000)[-1].kind == "non-present"
    assert quiet(vm) == (1, 1)
    await vm.end_invalidation(held_id)
    assert vm.notifier.mmu_invalidate_seq == seq + 1


async def test_a_lease_that_runs_out_ends_the_hold(kvm_guest):
    vm, vcpu, hva = kvm_guest.vm, kvm_guest.vcpu, kvm_guest.region.hva
    held_id = await vm.begin_invalidation(hva, hva + 2 * MIB, lease_s=0.05)
    result = await asyncio.wait_for(vcpu.run(read(0x1000)), timeout=5)

    assert result.exit.reason is ExitReason.DONE and vcpu.stats()["pf_retry"] > 0
    [ended] = vm.ended_invalidations()
    assert (ended.id, ended.state) == (held_id, HoldState.LEASE_EXPIRED)
    assert vm.stats()["invalidations_lease_expired"] == 1 and quiet(vm) == (0, 0)
    with pytest.raises(NoSuchObject, match="lease_expired"):
        await vm.end_invalidation(held_id)


async def test_memslot_update_waits_for_the_hold(kvm_guest):
    vm = kvm_guest.vm
    region = vm.mmap(2 * MIB, kvm_guest.region.backing)
    held_id = await vm.begin_invalidation(UNSLOTTED_HVA, UNSLOTTED_HVA + 4096, lease_s=30)
    assert quiet(vm) == (1, 0)          # no memslot hit: only the updaters' count is raised

    update = asyncio.create_task(vm.set_user_memory_region(1, 0, 64 * MIB, 2 * MIB, region.hva))
    await settle()
    assert not update.done() and len(vm.memslots()) == 1
    await vm.end_invalidation(held_id)
    await update
    assert len(vm.memslots()) == 2


async def test_a_cancelled_holder_releases_its_hold_as_client_gone(kvm_guest):
    vm, vcpu, hva = kvm_guest.vm, kvm_guest.vcpu, kvm_guest.region.hva
    holding = asyncio.get_running_loop().create_future()

    async def holder():
        async with vm.hold_invalidation(hva, hva + 2 * MIB) as held:
            holding.set_result(held.id)
            await asyncio.Event().wait()

    task = asyncio.create_task(holder())
    held_id = await holding
    run = asyncio.create_task(vcpu.run(read(0x1000)))
    await settle()
    assert not run.done()

    task.cancel()
    assert (await run).exit.reason is ExitReason.DONE
    assert task.cancelled()
    assert [(h.id, h.state, h.lease_s) for h in vm.ended_invalidations()] == \
        [(held_id, HoldState.CLIENT_GONE, None)]
    assert vm.stats()["invalidations_client_gone"] == 1 and quiet(vm) == (0, 0)


async def test_leaving_a_hold_normally_ends_it_and_waits_for_the_end(kvm_guest):
    vm, hva = kvm_guest.vm, kvm_guest.region.hva
    async with vm.hold_invalidation(hva, hva + 4096) as held:
        assert quiet(vm) == (1, 1)
    assert held.state is HoldState.ENDED_BY_CLIENT and quiet(vm) == (0, 0)


async def test_a_begin_cancelled_before_start_returns_still_pairs_start_with_end(kvm_guest):
    vm, hva = kvm_guest.vm, kvm_guest.region.hva
    await vm.mmu_lock.acquire_write()                # start() waits at the lock
    begin = asyncio.create_task(vm.begin_invalidation(hva, hva + 4096, lease_s=30))
    await settle()
    assert quiet(vm) == (1, 0)
    begin.cancel()
    await settle()
    vm.mmu_lock.release_write()
    while quiet(vm) != (0, 0):
        await asyncio.sleep(0)

    assert begin.cancelled()
    assert [h.state for h in vm.ended_invalidations()] == [HoldState.CLIENT_GONE]
    assert vm.notifier.mmu_invalidate_seq == 1


async def test_destroying_the_vm_ends_every_hold(kvm_guest):
    vm, vcpu, hva = kvm_guest.vm, kvm_guest.vcpu, kvm_guest.region.hva
    first = await vm.begin_invalidation(hva, hva + 4096, lease_s=30)
    second = await vm.begin_invalidation(UNSLOTTED_HVA, UNSLOTTED_HVA + 4096, lease_s=30)
    run = asyncio.create_task(vcpu.run(read(0x0)))
    await settle()

    await vm.destroy()
    assert quiet(vm) == (0, 0)
    assert [(h.id, h.state) for h in vm.ended_invalidations()] == \
        [(first, HoldState.VM_DESTROYED), (second, HoldState.VM_DESTROYED)]
    with pytest.raises(NoSuchObject):
        await run


@pytest.mark.parametrize("start, end, lease_s", [
    (0x1001, 0x2000, 1), (0x1000, 0x2001, 1), (0x2000, 0x2000, 1), (0x3000, 0x2000, 1),
    (0x1000, 0x2000, 0), (0x1000, 0x2000, -1), (0x1000, 0x2000, 60.5),
    (0x1000, 0x2000, math.nan), (0x1000, 0x2000, math.inf),
])
async def test_bad_ranges_and_leases_are_einval_and_change_nothing(kvm_vm, start, end, lease_s):
    with pytest.raises(KvmError) as err:
        await kvm_vm.begin_invalidation(start, end, lease_s)
    assert err.value.errno == errno.EINVAL
    assert kvm_vm.held_invalidations() == [] and quiet(kvm_vm) == (0, 0)
    assert kvm_vm.stats()["invalidations_held"] == 0


async def test_unknown_hold_is_enoent(kvm_vm):
    with pytest.raises(NoSuchObject, match="invalidation 7 is not held$"):
        await kvm_vm.end_invalidation(7)


async def test_holds_per_vm_are_bounded(kvm_vm):
    for i in range(MAX_HELD):
        await kvm_vm.begin_invalidation(UNSLOTTED_HVA + i * 4096, UNSLOTTED_HVA + (i + 1) * 4096,
                                        lease_s=30)
    with pytest.raises(KvmError) as err:
        await kvm_vm.begin_invalidation(UNSLOTTED_HVA, UNSLOTTED_HVA + 4096, lease_s=30)
    assert err.value.errno == errno.ENOSPC
    assert len(kvm_vm.held_invalidations()) == MAX_HELD
    await kvm_vm.destroy()
    assert quiet(kvm_vm) == (0, 0)
