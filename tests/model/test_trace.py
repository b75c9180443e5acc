"""Tracepoints: what the model emits where, and subscriptions that never hold the VM back."""

from __future__ import annotations

import errno

import pytest

from vmmu.server.kvm import (AccessBatch, AccessKind, Backing, Kvm, KvmError, NoSuchObject,
                             VmConfig)
from vmmu.server.kvm import spte as S
from vmmu.server.kvm.trace import MAX_CAPACITY

MIB = 1 << 20
MMIO_GPA = 0x1000_0000


def read(*gpas):
    return AccessBatch.build([(gpa, AccessKind.READ, 4, None) for gpa in gpas])


async def make_guest(kvm: Kvm):
    """A VM with 4 MiB of 4K pages at gpa 0 and vCPU 0: (vm, region, vcpu)."""
    vm = kvm.create_vm(VmConfig(name="trace"))
    region = vm.mmap(4 * MIB, Backing.PAGE_4K)
    await vm.set_user_memory_region(0, 0, 0, 4 * MIB, region.hva)
    return vm, region, vm.create_vcpu(0)


async def drain(sub) -> list:
    """Every event buffered so far (the subscription is closed, so iteration ends)."""
    sub.close()
    return [event async for event, _ in sub]


def where(event) -> tuple:
    """(name, the address it is about, level) of an event, for logs."""
    f = event.fields
    return event.event, f.get("gpa", f.get("gfn", f.get("start"))), f.get("level")


async def test_faults_trace_the_request_then_every_spte_set_then_the_exit():
    kvm = Kvm()
    vm, _, vcpu = await make_guest(kvm)
    sub = kvm.trace([vm.id], events=["kvm_page_fault", "kvm_mmu_spte_requested",
                                     "kvm_tdp_mmu_spte_changed", "kvm_userspace_exit"])
    await vcpu.run(read(0x1000, 0x3000))

    events = await drain(sub)
    assert [where(e) for e in events] == [
        ("kvm_page_fault", 0x1000, None), ("kvm_mmu_spte_requested", 1, 1),
        ("kvm_tdp_mmu_spte_changed", 0, 4), ("kvm_tdp_mmu_spte_changed", 0, 3),
        ("kvm_tdp_mmu_spte_changed", 0, 2), ("kvm_tdp_mmu_spte_changed", 1, 1),
        ("kvm_page_fault", 0x3000, None), ("kvm_mmu_spte_requested", 3, 1),
        ("kvm_tdp_mmu_spte_changed", 3, 1),
        ("kvm_userspace_exit", None, None)]
    assert [e.seq for e in events] == sorted(e.seq for e in events)
    assert {e.vm_id for e in events} == {vm.id}
    assert events[0].fields["vcpu"] == 0 and events[0].fields["error_code"] & 1 << 32
    leaf = events[5].fields
    assert leaf["old"] == S.NONPRESENT and S.spte_to_pfn(leaf["new"]) == vm.walk(0x1000)[-1].pfn
    assert events[-1].fields == {"vcpu": 0, "reason": "done", "errno": 0}


async def test_mmio_first_touch_marks_an_mmio_spte_and_the_next_hits_it():
    kvm = Kvm()
    vm, _, vcpu = await make_guest(kvm)
    sub = kvm.trace([vm.id], events=["mark_mmio_spte", "handle_mmio_page_fault", "kvm_mmio",
                                     "kvm_userspace_exit"])
    await vcpu.run(read(MMIO_GPA))
    await vcpu.run(mmio_data=bytes(4))
    await vcpu.run(read(MMIO_GPA))

    assert [(e.event, e.fields.get("reason")) for e in await drain(sub)] == [
        ("mark_mmio_spte", None), ("kvm_mmio", None), ("kvm_userspace_exit", "mmio"),
        ("kvm_userspace_exit", "done"),
        ("handle_mmio_page_fault", None), ("kvm_mmio", None), ("kvm_userspace_exit", "mmio")]


async def test_an_invalidation_traces_start_zap_flush_end():
    kvm = Kvm()
    vm, region, vcpu = await make_guest(kvm)
    await vcpu.run(read(0x1000))
    sub = kvm.trace([vm.id], events=["kvm_mmu_invalidate_range", "kvm_unmap_hva_range",
                                     "kvm_tdp_mmu_spte_changed", "kvm_tlb_flush"])
    held = await vm.begin_invalidation(region.hva + 0x1000, region.hva + 0x2000, lease_s=10)
    await vm.end_invalidation(held)

    events = await drain(sub)
    assert [(e.event, e.fields.get("phase")) for e in events] == [
        ("kvm_mmu_invalidate_range", "start"), ("kvm_unmap_hva_range", None),
        ("kvm_tdp_mmu_spte_changed", None), ("kvm_tlb_flush", None),
        ("kvm_mmu_invalidate_range", "end")]
    assert events[2].fields["gfn"] == 1 and events[2].fields["new"] == S.NONPRESENT
    assert events[0].fields["start"] == region.hva + 0x1000


async def test_teardown_traces_each_unlinked_table_then_ends_the_subscription():
    kvm = Kvm()
    vm, _, vcpu = await make_guest(kvm)
    await vcpu.run(read(0x1000))
    sub = kvm.trace([vm.id], events=["kvm_mmu_prepare_zap_page"])
    await kvm.destroy_vm(vm.id)

    assert [where(e) for e in [event async for event, _ in sub]] == [
        ("kvm_mmu_prepare_zap_page", 0, 1), ("kvm_mmu_prepare_zap_page", 0, 2),
        ("kvm_mmu_prepare_zap_page", 0, 3)]
    assert sub.closed and not vm.tracer.on


async def test_a_slow_reader_loses_the_oldest_events_and_learns_how_many():
    kvm = Kvm()
    vm, _, vcpu = await make_guest(kvm)
    sub = kvm.trace([vm.id], events=["kvm_page_fault"], capacity=4)
    await vcpu.run(read(*(page << 12 for page in range(10))))

    sub.close()
    assert [(e.fields["gpa"] >> 12, dropped) async for e, dropped in sub] == \
        [(6, 6), (7, 0), (8, 0), (9, 0)]
    assert sub.dropped == 6


async def test_closing_a_subscription_switches_the_tracer_off():
    kvm = Kvm()
    vm = kvm.create_vm(VmConfig())
    with kvm.trace([vm.id]):
        assert vm.tracer.on
    assert not vm.tracer.on


async def test_an_unfiltered_subscription_follows_new_vms_and_outlives_them():
    kvm = Kvm()
    everything = kvm.trace()
    vm = kvm.create_vm(VmConfig())
    named = kvm.trace([vm.id, vm.id])
    vm.flush_remote_tlbs()
    await kvm.destroy_vm(vm.id)

    assert [e.event for e, _ in [pair async for pair in named]] == ["kvm_tlb_flush"]
    assert not everything.closed and not vm.tracer.on
    assert [e.event for e in await drain(everything)] == ["kvm_tlb_flush"]


@pytest.mark.parametrize("vm_ids, events, capacity, code", [
    ((), ["kvm_page_fault", "kvm_nope"], 16, errno.EINVAL),
    ((), (), 0, errno.EINVAL),
    ((), (), MAX_CAPACITY + 1, errno.EINVAL),
    ((99,), (), 16, errno.ENOENT),
])
async def test_bad_subscriptions_subscribe_nothing(vm_ids, events, capacity, code):
    kvm = Kvm()
    vm = kvm.create_vm(VmConfig())
    with pytest.raises(KvmError) as err:
        kvm.trace(vm_ids, events, capacity)
    assert err.value.errno == code
    assert not vm.tracer.on and not kvm.create_vm(VmConfig()).tracer.on


def test_unknown_vm_is_no_such_object():
    with pytest.raises(NoSuchObject):
        Kvm().trace([1])
