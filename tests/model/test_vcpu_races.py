"""A vCPU racing the MMU notifier and other callers; a broken invariant kills the VM."""

from __future__ import annotations

import asyncio
import errno

import pytest

from vmmu.server.kvm import AccessBatch, AccessKind, ExitReason, KvmError, VmBugged
from vmmu.server.kvm import spte as S
from vmmu.server.kvm.sanitizers import (INVALID_ROOT_MAPS_RANGE, ROOT_FREED_WITH_SPTES,
                                        SanitizerViolation)
from vmmu.server.kvm.spte import NONPRESENT

R = AccessKind.READ


async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


def read(gpa):
    return AccessBatch.build([(gpa, R, 4, b"")])


async def test_fault_racing_munmap_retries_instead_of_mapping_a_freed_page(kvm_guest):
    """§4.5: the pfn was looked up before the invalidation began; the fault must not
    install it while the invalidation is between start and end."""
    vm, vcpu, region = kvm_guest.vm, kvm_guest.vcpu, kvm_guest.region
    await vcpu.run(read(0x0))                              # root loaded, TLB warm
    await vm.mmu_lock.acquire_write()                      # hold everyone at the door
    unmap = asyncio.create_task(vm.munmap(region.hva, region.size))
    await settle()                                         # queued for the write lock
    run = asyncio.create_task(vcpu.run(read(0x200000)))
    await settle()                                         # pfn in hand, queued for read
    assert vcpu.info().running and vcpu.stats()["pf_taken"] == 2   # the warm-up, then this
    vm.mmu_lock.release_write()
    result, _ = await asyncio.gather(run, unmap)

    assert vcpu.stats()["pf_retry"] >= 1
    assert result.exit.reason is ExitReason.MEMORY_FAULT and result.exit.errno == errno.EFAULT
    assert vm.walk(0x200000)[-1].kind == "non-present"
    assert vm.stats()["pages_2m"] == 0


async def test_one_run_at_a_time(kvm_guest):
    vm, vcpu = kvm_guest.vm, kvm_guest.vcpu
    await vm.mmu_lock.acquire_write()
    first = asyncio.create_task(vcpu.run(read(0x1000)))    # blocks loading its root
    await settle()
    assert vcpu.info().running
    with pytest.raises(KvmError) as err:
        await vcpu.run(read(0x2000))
    assert err.value.errno == errno.EBUSY
    vm.mmu_lock.release_write()
    assert (await first).exit.reason is ExitReason.DONE
    assert not vcpu.info().running


async def test_a_broken_invariant_kills_the_vm(kvm_guest, monkeypatch):
    vm, vcpu = kvm_guest.vm, kvm_guest.vcpu

    def broken_map(fault, root):
        raise VmBugged("test: invariant broken")

    monkeypatch.setattr(vm.mmu, "map", broken_map)
    result = await vcpu.run(read(0x1000))
    assert result.exit.reason is ExitReason.INTERNAL_ERROR
    assert result.exit.errno == errno.EIO and "invariant broken" in result.exit.message
    assert vm.info().dead
    for call in (lambda: vcpu.run(read(0x1000)), lambda: vm.munmap(0, 0)):
        with pytest.raises(KvmError) as err:
            await call()
        assert err.value.errno == errno.EIO
    with pytest.raises(KvmError):
        vm.create_vcpu(1)
    await vm.destroy()                                      # teardown still works
    assert vm.mmu.roots == []


async def test_a_vcpu_inside_run_leaves_when_its_vm_is_destroyed(kvm_guest):
    """KVM_REQ_VM_DEAD: the fault in flight finishes, the next guest entry ends the run."""
    vm, vcpu = kvm_guest.vm, kvm_guest.vcpu
    await vcpu.run(read(0x0))                              # root loaded
    await vm.mmu_lock.acquire_write()
    run = asyncio.create_task(vcpu.run(AccessBatch.build(
        [(0x200000, R, 4, b""), (0x400000, R, 4, b"")])))
    await settle()                                         # the first fault waits for the lock
    assert vcpu.info().running and vcpu.stats()["pf_taken"] == 2
    destroy = asyncio.create_task(vm.destroy())
    await settle()                                         # state set, queued for the lock
    vm.mmu_lock.release_write()
    with pytest.raises(KvmError, match="destroyed"):
        await run
    await destroy
    assert not vcpu.info().running
    assert vcpu.stats()["pf_taken"] == 2                   # the second access never ran


async def test_a_vcpu_inside_run_leaves_when_its_vm_dies(kvm_guest):
    vm, vcpu = kvm_guest.vm, kvm_guest.vcpu
    await vcpu.run(read(0x0))
    await vm.mmu_lock.acquire_write()
    run = asyncio.create_task(vcpu.run(AccessBatch.build(
        [(0x200000, R, 4, b""), (0x400000, R, 4, b"")])))
    await settle()
    vm.mark_dead(VmBugged("test: another task found a broken invariant"))
    vm.mmu_lock.release_write()
    with pytest.raises(KvmError) as err:
        await run
    assert err.value.errno == errno.EIO and "broken invariant" in err.value.reason
    assert vcpu.stats()["pf_taken"] == 2
    await vm.destroy()


async def test_a_fault_whose_root_was_zapped_meanwhile_retries_on_a_fresh_root(kvm_guest):
    """`is_page_fault_stale`: every root went invalid and was zapped (kvm_mmu_zap_all_fast,
    as a memslot deletion runs it) while the fault held its pfn; mapping into the zapped
    root would leave tables no zap reaches again (the sanitizer finds them when the
    root's last reference goes)."""
    vm, vcpu = kvm_guest.vm, kvm_guest.vcpu
    await vcpu.run(read(0x0))                              # root loaded
    old_root = vcpu.root
    at_lock, go = asyncio.Event(), asyncio.Event()

    async def point(name: str) -> None:
        if name == "fault.before_lock" and not go.is_set():
            at_lock.set()
            await go.wait()

    vm.sched.point = point
    run = asyncio.create_task(vcpu.run(read(0x200000)))
    await at_lock.wait()                                   # pfn in hand, lock not taken
    await vm._zap_all_fast()
    assert old_root.invalid and old_root.root_refs == 1    # the vCPU's reference only
    go.set()
    result = await run

    assert result.exit.reason is ExitReason.DONE, result.exit
    assert not vm.info().dead, vm.death
    assert vcpu.stats()["pf_retry"] == 1
    assert old_root.freed and vcpu.root is not old_root and not vcpu.root.invalid
    assert vm.walk(0x200000)[-1].kind == "leaf"            # mapped in the fresh root


@pytest.mark.tdp_only
async def test_a_root_freed_with_sptes_is_a_sanitizer_violation(kvm_guest):
    vm, vcpu = kvm_guest.vm, kvm_guest.vcpu
    await vcpu.run(read(0x0))
    async with vm.mmu_lock.write:
        roots = vm.tdp.invalidate_all_roots()
        vcpu.release_root()
        with pytest.raises(SanitizerViolation) as e:
            vm.tdp.put_root(roots[0])                      # its mappings never zapped
    assert e.value.oracle == ROOT_FREED_WITH_SPTES and e.value.gfn == 0


@pytest.mark.tdp_only
async def test_the_notifier_zaps_invalid_roots_not_yet_zapped(kvm_guest):
    """The roots were invalidated and their zap has not got to the range (it runs under
    the read lock and yields): the notifier's zap reaches them too, so no page table maps
    the pages it takes away once invalidate_range_start returns."""
    vm, vcpu, region = kvm_guest.vm, kvm_guest.vcpu, kvm_guest.region
    await vcpu.run(read(0x0))
    await vcpu.run(read(0x200000))
    async with vm.mmu_lock.write:
        roots = vm.tdp.invalidate_all_roots()              # the zap of `roots` comes later
    old = roots[0]
    await vm.madvise_dontneed(region.hva + 0x200000, 0x200000)

    assert not vm.info().dead, vm.death
    with vm.rcu.read_lock():
        assert vm.tdp.walk(old, 0x200)[-1][3] == NONPRESENT
        assert S.is_leaf_present(vm.tdp.walk(old, 0)[-1][3], 2)   # outside the range
    async with vm.mmu_lock.read:
        await vm.tdp.zap_invalidated_roots(roots)
    vcpu.release_root()
    await vm.rcu.barrier()
    assert old.freed                                       # empty when freed


@pytest.mark.tdp_only
async def test_an_invalid_root_that_still_maps_an_invalidated_range_is_a_violation(kvm_guest):
    vm, vcpu = kvm_guest.vm, kvm_guest.vcpu
    await vcpu.run(read(0x200000))
    async with vm.mmu_lock.write:
        vm.tdp.invalidate_all_roots()
    with pytest.raises(SanitizerViolation) as e:
        vm.sanitizers.check_range_unmapped(0, 0x200, 0x400)
    assert e.value.oracle == INVALID_ROOT_MAPS_RANGE and e.value.gfn == 0x200
@pytest.mark.parametrize("seed", range(24))
async def test_a_vm_destroyed_mid_fault_ends_the_runs_and_frees_every_root(make_guest, seed):
    """A destroy that runs to its end while a fault of each vCPU is between preemption
    points: the fault finds its root invalid, the vCPU leaves with ENOENT at its next
    entry and drops its root on the way out, so every table is freed."""
    guest = await make_guest(size=8 << 20, max_vcpus=2, schedule_seed=seed)
    vm = guest.vm
    vcpus = [guest.vcpu, vm.create_vcpu(1)]
    batches = [AccessBatch.build([(gpa, R, 4, b"") for gpa in range(v << 12, 8 << 20, 7 << 12)])
               for v in range(2)]
    runs = [asyncio.create_task(vcpu.run(batch)) for vcpu, batch in zip(vcpus, batches)]
    for _ in range(seed % 11 + 1):
        await asyncio.sleep(0)
    await vm.destroy()
    for run in runs:
        with pytest.raises(KvmError) as err:
            await run
        assert err.value.errno == errno.ENOENT
    await vm.rcu.barrier()
    assert vm.mmu.roots == [] and len(vm.mmu.tables) == 0
