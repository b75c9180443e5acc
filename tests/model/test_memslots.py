"""KVM_SET_USER_MEMORY_REGION: the validation matrix of reference §6.2, delete and move."""

from __future__ import annotations

import errno
from dataclasses import dataclass

import pytest

from vmmu.server.kvm.types import TASK_SIZE_MAX
from vmmu.server.kvm import (KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, KVM_USER_MEM_SLOTS,
                             AccessBatch, AccessKind, Backing, ExitReason, KvmError,
                             MemslotInfo, Vcpu, Vm)

MIB = 1 << 20
R, W = AccessKind.READ, AccessKind.WRITE


@dataclass
class Setup:
    """Slot 0 maps gpa [0, 2M) at hva H, slot 2 maps [4M, 6M) at H + 4M; 0x1000 is mapped."""

    vm: Vm
    vcpu: Vcpu
    hva: int


@pytest.fixture
async def two_slots(kvm_vm) -> Setup:
    region = kvm_vm.mmap(16 * MIB, Backing.PAGE_4K)
    await kvm_vm.set_user_memory_region(0, 0, 0, 2 * MIB, region.hva)
    await kvm_vm.set_user_memory_region(2, 0, 4 * MIB, 2 * MIB, region.hva + 4 * MIB)
    vcpu = kvm_vm.create_vcpu(0)
    result = await vcpu.run(AccessBatch.build([(0x1000, W, 8, b"slotdata"),
                                               (4 * MIB, R, 8, None)]))
    assert result.exit.reason is ExitReason.DONE
    return Setup(kvm_vm, vcpu, region.hva)


def snapshot(s: Setup):
    return (s.vm.memslots(), s.vm.stats(), s.vcpu.stats(), s.vm.walk(0x1000),
            s.vm.walk(4 * MIB), s.vm.memslot_sets[0].generation)


def at(offset):
    """An hva `offset` bytes into the fixture's region (known only once it exists)."""
    return ("region", offset)


# (slot, flags, guest_phys_addr, memory_size, userspace_addr) -> errno
REJECTED = {
    "flag GUEST_MEMFD on the v1 call": ((1, 1 << 2, 8 * MIB, 2 * MIB, at(8 * MIB)), errno.EINVAL),
    "unknown flag": ((1, 1 << 7, 8 * MIB, 2 * MIB, at(8 * MIB)), errno.EINVAL),
    "slot id KVM_USER_MEM_SLOTS": ((KVM_USER_MEM_SLOTS, 0, 8 * MIB, 2 * MIB, at(8 * MIB)),
                                   errno.EINVAL),
    "slot id 0xffff": ((0xFFFF, 0, 8 * MIB, 2 * MIB, at(8 * MIB)), errno.EINVAL),
    "size not page aligned": ((1, 0, 8 * MIB, 2 * MIB + 0x800, at(8 * MIB)), errno.EINVAL),
    "gpa not page aligned": ((1, 0, 8 * MIB + 0x10, 2 * MIB, at(8 * MIB)), errno.EINVAL),
    "hva not page aligned": ((1, 0, 8 * MIB, 2 * MIB, at(8 * MIB + 8)), errno.EINVAL),
    "hva range not user memory": ((1, 0, 8 * MIB, 2 * MIB, (1 << 47) - MIB), errno.EINVAL),
    "hva range ends a page above TASK_SIZE_MAX": (
        (1, 0, 8 * MIB, 2 * MIB, 0x7FFF_FFFF_F000 - 2 * MIB + 0x1000), errno.EINVAL),
    "address space 2": ((2 << 16 | 1, 0, 8 * MIB, 2 * MIB, at(8 * MIB)), errno.EINVAL),
    "gpa + size wraps": ((1, 0, (1 << 64) - 0x1000, 0x2000, at(8 * MIB)), errno.EINVAL),
    "more than 2^31-1 pages": ((1, 0, 8 * MIB, 1 << 43, 0x1000), errno.EINVAL),
    "delete of a missing slot": ((1, 0, 0, 0, 0), errno.EINVAL),
    "delete of a slot of the other address space": ((1 << 16, 0, 0, 0, 0), errno.EINVAL),
    "create overlapping slot 0": ((1, 0, 1 * MIB, 2 * MIB, at(8 * MIB)), errno.EEXIST),
    "create covering slot 2": ((1, 0, 3 * MIB, 4 * MIB, at(8 * MIB)), errno.EEXIST),
    "move slot 2 onto slot 0": ((2, 0, 1 * MIB, 2 * MIB, at(4 * MIB)), errno.EEXIST),
    "resize a live slot": ((0, 0, 0, 4 * MIB, at(0)), errno.EINVAL),
    "change a live slot's hva": ((0, 0, 0, 2 * MIB, at(2 * MIB)), errno.EINVAL),
    "make a live slot read-only": ((0, KVM_MEM_READONLY, 0, 2 * MIB, at(0)), errno.EINVAL),
    "last gfn above the 4-level maximum": ((1, 0, (1 << 48) - 0x1000, 0x2000, at(8 * MIB)),
                                           errno.EINVAL),
    "move slot 2 above the maximum": ((2, 0, (1 << 48) - MIB, 2 * MIB, at(4 * MIB)),
                                      errno.EINVAL),
}


@pytest.mark.parametrize("args, expected", REJECTED.values(), ids=REJECTED.keys())
async def test_rejected_calls_fail_with_kvms_errno_and_change_nothing(two_slots, args,
                                                                      expected):
    *head, hva = args
    if isinstance(hva, tuple):
        hva = two_slots.hva + hva[1]
    before = snapshot(two_slots)
    with pytest.raises(KvmError) as err:
        await two_slots.vm.set_user_memory_region(*head, hva)
    assert err.value.errno == expected
    assert snapshot(two_slots) == before
    result = await two_slots.vcpu.run(AccessBatch.build([(0x1000, R, 8, b"")]))
    assert result.read_data == b"slotdata"


async def test_overlap_is_checked_before_the_maximum_gfn(kvm_vm):
    region = kvm_vm.mmap(8 * MIB, Backing.PAGE_4K)
    top = 1 << 48
    await kvm_vm.set_user_memory_region(3, 0, top - 4 * MIB, 2 * MIB, region.hva)
    with pytest.raises(KvmError) as err:
        await kvm_vm.set_user_memory_region(4, 0, top - 4 * MIB, 8 * MIB, region.hva)
    assert err.value.errno == errno.EEXIST


async def test_the_highest_slot_id_and_the_smm_address_space_are_accepted(kvm_vm):
    region = kvm_vm.mmap(4 * MIB, Backing.PAGE_4K)
    await kvm_vm.set_user_memory_region(KVM_USER_MEM_SLOTS - 1, 0, 0, 2 * MIB, region.hva)
    await kvm_vm.set_user_memory_region(1 << 16 | 7, 0, 0, 2 * MIB, region.hva)   # SMM: may
    assert sorted(kvm_vm.memslots(), key=lambda s: s.as_id) == [                # overlap
        MemslotInfo(0, KVM_USER_MEM_SLOTS - 1, 0, 0, 2 * MIB, region.hva),
        MemslotInfo(1, 7, 0, 0, 2 * MIB, region.hva),
    ]


async def test_a_slot_above_48_bits_needs_5_level_ept(make_kvm_vm):
    for levels, ok in ((4, False), (5, True)):
        vm = make_kvm_vm(tdp_levels=levels)
        region = vm.mmap(2 * MIB, Backing.PAGE_4K)
        call = vm.set_user_memory_region(0, 0, 1 << 50, 2 * MIB, region.hva)
        if ok:
            await call
            assert vm.memslots()[0].guest_phys_addr == 1 << 50
        else:
            with pytest.raises(KvmError) as err:
                await call
            assert err.value.errno == errno.EINVAL and vm.memslots() == []


async def test_identical_call_is_a_no_op(two_slots):
    before = snapshot(two_slots)
    await two_slots.vm.set_user_memory_region(0, 0, 0, 2 * MIB, two_slots.hva)
    assert snapshot(two_slots) == before


async def test_flags_only_change_keeps_the_mappings(two_slots):
    vm = two_slots.vm
    await vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 2 * MIB, two_slots.hva)
    assert vm.memslots()[0].flags == KVM_MEM_LOG_DIRTY_PAGES
    assert vm.walk(0x1000)[-1].kind == "leaf"


async def test_delete_zaps_and_the_old_gpa_becomes_mmio(two_slots):
    vm, vcpu = two_slots.vm, two_slots.vcpu
    assert vm.stats()["pages_4k"] == 2
    flushes = vcpu.stats()["tlb_flush"]
    await vm.set_user_memory_region(0, 0, 0, 0, 0)
    assert [s.id for s in vm.memslots()] == [2]
    assert vm.stats()["pages_4k"] == 0
    assert vm.walk(0x1000) == []                   # every root is invalid until a reload

    result = await vcpu.run(AccessBatch.build([(0x1000, R, 8, b"")]))
    assert result.exit.reason is ExitReason.MMIO and result.exit.gpa == 0x1000
    assert vcpu.stats()["tlb_flush"] == flushes + 1  # the fresh root flushed the old TLB
    await vcpu.run(mmio_data=b"\xff" * 8)
    result = await vcpu.run(AccessBatch.build([(4 * MIB, R, 8, b"")]))
    assert result.exit.reason is ExitReason.DONE    # the other slot still works
    assert await vm.read_hva(two_slots.hva + 0x1000, 8) == b"slotdata"   # host memory untouched


async def test_move_zaps_and_the_data_follows_the_slot(two_slots):
    vm, vcpu = two_slots.vm, two_slots.vcpu
    await vm.set_user_memory_region(0, 0, 8 * MIB, 2 * MIB, two_slots.hva)
    assert vm.memslots() == [MemslotInfo(0, 2, 0, 4 * MIB, 2 * MIB, two_slots.hva + 4 * MIB),
                             MemslotInfo(0, 0, 0, 8 * MIB, 2 * MIB, two_slots.hva)]
    assert vm.stats()["pages_4k"] == 0 and vm.walk(8 * MIB) == []
    result = await vcpu.run(AccessBatch.build([(8 * MIB + 0x1000, R, 8, b""),
                                               (0x1000, R, 8, b"")]))
    assert result.read_data == b"slotdata"
    assert result.completed == 1 and result.exit.reason is ExitReason.MMIO
    assert result.exit.gpa == 0x1000


async def test_slot_created_over_a_cached_mmio_gpa_is_mapped(kvm_vm):
    """CREATE zaps nothing: the MMIO SPTE goes stale through the memslot generation."""
    vcpu = kvm_vm.create_vcpu(0)
    region = kvm_vm.mmap(2 * MIB, Backing.PAGE_4K)
    await kvm_vm.set_user_memory_region(0, 0, 0, 2 * MIB, region.hva)
    result = await vcpu.run(AccessBatch.build([(8 * MIB, R, 4, None)]))
    assert result.exit.reason is ExitReason.MMIO
    await vcpu.run(mmio_data=bytes(4))
    assert kvm_vm.walk(8 * MIB)[-1].kind == "mmio"

    other = kvm_vm.mmap(2 * MIB, Backing.PAGE_4K)
    await kvm_vm.write_hva(other.hva, b"late")
    await kvm_vm.set_user_memory_region(1, 0, 8 * MIB, 2 * MIB, other.hva)
    result = await vcpu.run(AccessBatch.build([(8 * MIB, R, 4, b"")]))
    assert result.exit.reason is ExitReason.DONE and result.read_data == b"late"
    assert kvm_vm.walk(8 * MIB)[-1].kind == "leaf"


async def test_a_slot_may_end_at_task_size_max(kvm_vm):
    """`access_ok`: the hva range may end at the last user address, 2^47 - 4096."""
    region = kvm_vm.mmap(2 * MIB, Backing.PAGE_4K, hva=TASK_SIZE_MAX - 2 * MIB)
    await kvm_vm.set_user_memory_region(1, 0, 8 * MIB, 2 * MIB, region.hva)
    assert [(m.id, m.userspace_addr) for m in kvm_vm.memslots()] == [(1, region.hva)]
