"""The Trace stream: events in emission order, filters by VM and by name, a reader that
never reads costs the VMs nothing and learns what it lost, and cancelling unsubscribes."""

from __future__ import annotations

import asyncio
import time

import pytest

from vmmu.client import Backing, BatchBuilder, ExitReason, InvalidArgument, NotFound

MiB = 1 << 20


async def eventually(check, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0.005)


async def make_guest(client, size: int = 4 * MiB):
    """A VM with `size` bytes of 4K pages at gpa 0 and one vCPU: (vm, region, vcpu)."""
    vm = await client.create_vm(max_vcpus=1)
    region = await vm.mmap(size, Backing.PAGE_4K)
    await vm.set_user_memory_region(slot=0, flags=0, guest_phys_addr=0, memory_size=size,
                                    userspace_addr=region.hva)
    return vm, region, await vm.create_vcpu(0)


async def take(trace, n: int) -> list:
    return [await anext(trace) for _ in range(n)]


async def test_events_of_a_faulting_run_arrive_in_order(client):
    vm, _, vcpu = await make_guest(client)
    trace = await client.trace(vm_ids=[vm.id], events=["kvm_page_fault", "kvm_userspace_exit"])
    await vcpu.run(BatchBuilder().read(0x1000).read(0x1008).read(0x3000).read(0x2000).build())

    events = await take(trace, 4)
    trace.cancel()
    assert [(e.event, e.fields.get("gpa"), e.fields.get("reason")) for e in events] == [
        ("kvm_page_fault", 0x1000, None), ("kvm_page_fault", 0x3000, None),
        ("kvm_page_fault", 0x2000, None), ("kvm_userspace_exit", None, "done")]
    assert [e.seq for e in events] == sorted(e.seq for e in events)
    assert {(e.vm_id, e.dropped_before) for e in events} == {(vm.id, 0)}
    assert events[0].fields["vcpu"] == 0 and events[0].fields["error_code"] > 0
    assert events[-1].fields == {"vcpu": 0, "reason": "done", "errno": 0}


async def test_filters_by_vm_and_event_and_the_unfiltered_stream_follows_new_vms(client):
    first, second = await client.create_vm(), await client.create_vm()
    named = await client.trace(vm_ids=[first.id], events=["kvm_mmu_invalidate_range"])
    everything = await client.trace(events=["kvm_mmu_invalidate_range"])
    later = await client.create_vm()
    for vm in (second, first, later):
        held = await vm.begin_invalidation(0x10_0000, 0x10_2000, lease_s=10)
        await vm.end_invalidation(held)

    await first.destroy()                            # ends `named` after what it holds

    assert [(e.vm_id, e.fields["phase"]) async for e in named] == \
        [(first.id, "start"), (first.id, "end")]
    assert [(e.vm_id, e.fields["phase"], e.fields["start"]) for e in await take(everything, 6)] \
        == [(vm.id, phase, 0x10_0000) for vm in (second, first, later)
            for phase in ("start", "end")]
    everything.cancel()


async def test_a_reader_that_never_reads_does_not_hold_a_run_back(client, server):
    vm, _, vcpu = await make_guest(client, size=8 * MiB)
    trace = await client.trace(vm_ids=[vm.id], events=["kvm_page_fault"], capacity=16)
    pages = 2000
    batch = BatchBuilder()
    for page in range(pages):
        batch.read(page << 12)

    result = await asyncio.wait_for(vcpu.run(batch.build()), timeout=30)
    assert (result.exit.reason, result.completed) == (ExitReason.DONE, pages)

    seen = dropped = 0
    while seen + dropped < pages:
        event = await anext(trace)
        seen, dropped = seen + 1, dropped + event.dropped_before
        last = event.fields["gpa"] >> 12
    trace.cancel()
    assert seen + dropped == pages and dropped > 0 and last == pages - 1


async def test_cancelling_the_stream_unsubscribes(client, server):
    vm = await client.create_vm()
    tracer = server.serving.kvm.get_vm(vm.id).tracer
    async with await client.trace(vm_ids=[vm.id]):
        assert tracer.on
    await eventually(lambda: not tracer.on)

    trace = await client.trace()
    assert tracer.on
    trace.cancel()
    await eventually(lambda: not tracer.on)
    assert [e async for e in trace] == []


async def test_the_stream_ends_when_its_vm_is_destroyed(client):
    vm, _, vcpu = await make_guest(client)
    trace = await client.trace(vm_ids=[vm.id], events=["kvm_page_fault"])
    await vcpu.run(BatchBuilder().read(0x5000).build())
    await vm.destroy()
    assert [e.fields["gpa"] async for e in trace] == [0x5000]


@pytest.mark.parametrize("kwargs, error", [
    ({"events": ["kvm_page_fault", "kvm_nope"]}, InvalidArgument),
    ({"capacity": 0}, InvalidArgument),
    ({"capacity": 65537}, InvalidArgument),
    ({"vm_ids": [4242]}, NotFound),
])
async def test_bad_subscriptions_are_refused_at_once(client, server, kwargs, error):
    vm = await client.create_vm()
    with pytest.raises(error):
        await client.trace(**kwargs)
    assert not server.serving.kvm.get_vm(vm.id).tracer.on
