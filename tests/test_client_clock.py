"""Virtual time over the wire: a VM created with a virtual clock, cost overrides and
policies; a simulator driving it with AdvanceClock; batches started at a virtual time; and
bad input refused with the reason, changing nothing."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from vmmu.client import (AsyncClient, Backing, BatchBuilder, ExitReason, FailedPrecondition,
                         InvalidArgument, VmConfig, load_cost_file)
from vmmu.server.kvm.costs import DEFAULT_COSTS
from vmmu.v1 import vm_pb2, vm_pb2_grpc

MiB = 1 << 20
PAGES = 64                  # pages each vCPU writes: 64 demand faults of several µs each


def _writes(base: int, pages: int = PAGES):
    builder = BatchBuilder()
    for page in range(pages):
        builder.write(base + page * 4096, 8)
    return builder.build()


async def _virtual_guest(client, vcpus: int = 1, **config):
    """A VM in virtual time with `vcpus` vCPUs, each with 1 MiB of 4K pages of its own at
    gpa n MiB."""
    vm = await client.create_vm(max_vcpus=vcpus, clock="virtual", **config)
    region = await vm.mmap(vcpus * MiB, Backing.PAGE_4K)
    await vm.set_user_memory_region(slot=0, flags=0, guest_phys_addr=0,
                                    memory_size=vcpus * MiB, userspace_addr=region.hva)
    return vm, [await vm.create_vcpu(i) for i in range(vcpus)]


async def test_virtual_config_and_costs_travel_both_ways(client):
    overrides = {"fault_base": 1234, "vmexit_entry": 0}
    vm = await client.create_vm(clock="virtual", costs=overrides, fault_lock="write",
                                table_free="write_section", aging_lock="write",
                                zap_leafs_only=False, fast_page_fault=False)

    config = (await vm.info()).config
    assert (config.clock, config.fault_lock, config.table_free, config.aging_lock,
            config.zap_leafs_only) == ("virtual", "write", "write_section", "write", False)
    assert config.costs == (("fault_base", 1234), ("vmexit_entry", 0))
    assert await vm.costs() == {**DEFAULT_COSTS, **overrides}
    assert await vm.virtual_now() == 0


async def test_defaults_are_wall_time_and_todays_policies(client):
    vm = await client.create_vm()
    config = (await vm.info()).config
    assert config == VmConfig(max_vcpus=8, tdp_levels=4, ad_bits=True, name="",
                              schedule_seed=None, sanitizers=config.sanitizers,
                              debug=frozenset())
    assert (config.clock, config.costs, config.fault_lock, config.table_free,
            config.aging_lock, config.zap_leafs_only) == ("wall", (), "read", "rcu", "none", True)


async def test_a_run_reports_virtual_time_and_the_vcpu_stats_agree(client):
    vm, (vcpu,) = await _virtual_guest(client)

    result = await vcpu.run(_writes(0), start_ns=5000)
    assert (result.exit.reason, result.completed) == (ExitReason.DONE, PAGES)
    assert result.start_ns == 5000
    # Each demand fault costs an exit and the fault path at least.
    assert result.end_ns - result.start_ns >= PAGES * (DEFAULT_COSTS["vmexit_entry"] +
                                                       DEFAULT_COSTS["fault_base"])
    stats = await vcpu.stats()
    assert stats["virtual_ns"] == result.end_ns
    assert stats["virtual_busy_ns"] + stats["virtual_wait_ns"] == result.end_ns - 5000
    assert await vm.virtual_now() <= result.end_ns
    vm_stats = await vm.stats()
    assert vm_stats["virtual_now_ns"] == await vm.virtual_now()
    assert vm_stats["mmu_lock_read_acquisitions"] >= PAGES     # a fault takes it for read
    assert vm_stats["mmu_lock_read_hold_ns"] > 0

    again = await vcpu.run(_writes(0))           # no start time: where the vCPU stands
    assert again.start_ns == result.end_ns
    assert again.end_ns > again.start_ns

    async with vcpu.stream() as stream:         # a step of the Run stream carries it too
        later = await stream.run(_writes(0), start_ns=again.end_ns + 1000)
    assert later.start_ns == again.end_ns + 1000


async def test_a_run_in_wall_time_has_no_virtual_times(guest):
    _, _, vcpu = guest
    result = await vcpu.run(BatchBuilder().write(0x1000, 8).build())
    assert (result.start_ns, result.end_ns) == (0, 0)
    assert "virtual_ns" not in await vcpu.stats()


async def test_advance_drives_two_vcpus_on_streams_up_to_each_horizon(server):
    async with AsyncClient(server.address) as client:
        vm, vcpus = await _virtual_guest(client, vcpus=2)
        assert await vm.advance(0) == 0          # from now on the simulator drives it

        streams = [vcpu.stream() for vcpu in vcpus]
        runs = [asyncio.create_task(stream.run(_writes(i * MiB)))
                for i, stream in enumerate(streams)]
        for vcpu in vcpus:                       # both entered the guest at virtual 0
            while not (await vcpu.info()).running:
                await asyncio.sleep(0.01)

        horizon = 20_000                          # far less than 64 faults take
        assert await vm.advance(horizon) == horizon
        assert await vm.virtual_now() == horizon
        await asyncio.sleep(0.2)
        assert not any(run.done() for run in runs)
        assert [(await vcpu.info()).running for vcpu in vcpus] == [True, True]

        end = 50_000_000
        assert await vm.advance(end) == end
        results = await asyncio.wait_for(asyncio.gather(*runs), timeout=30)
        for result in results:
            assert (result.exit.reason, result.completed) == (ExitReason.DONE, PAGES)
            assert result.start_ns == 0
            assert horizon < result.end_ns <= end
        assert await vm.virtual_now() == end
        for stream in streams:
            await stream.close()


async def test_advancing_backwards_or_starting_in_the_past_changes_nothing(client):
    vm, (vcpu,) = await _virtual_guest(client)
    await vm.advance(10_000)

    with pytest.raises(InvalidArgument) as excinfo:
        await vm.advance(9_999)
    assert excinfo.value.errno_name == "EINVAL"
    assert "virtual now is 10000 ns" in excinfo.value.reason

    with pytest.raises(InvalidArgument) as excinfo:
        await vcpu.run(_writes(0), start_ns=9_999)
    assert "before the VM's virtual now (10000 ns)" in excinfo.value.reason

    assert await vm.virtual_now() == 10_000
    stats = await vcpu.stats()
    assert (stats["accesses"], stats["pf_taken"], stats["virtual_ns"]) == (0, 0, 0)


async def test_a_wall_vm_has_no_clock_to_read_advance_or_start_at(guest):
    vm, _, vcpu = guest
    for call in (vm.virtual_now, vm.costs, lambda: vm.advance(1000),
                 lambda: vcpu.run(_writes(0), start_ns=0)):
        with pytest.raises(FailedPrecondition) as excinfo:
            await call()
        assert "wall time" in excinfo.value.reason
    assert (await vcpu.stats())["accesses"] == 0
    assert (await vm.info()).config.clock == "wall"


@pytest.mark.parametrize("config, reason", [
    ({"clock": "virtual", "costs": {"fault_base": -1}}, "cost fault_base = -1 is not"),
    ({"clock": "virtual", "costs": {"fault_base": 1 << 40}}, "is not a whole number"),
    ({"clock": "virtual", "costs": {"warp_drive": 5}}, "unknown costs ['warp_drive']"),
    ({"costs": {"fault_base": 5}}, "costs need a VM in virtual time"),
    ({"clock": "virtual", "table_free": "write_section"}, "needs fast_page_fault off"),
], ids=["negative", "too-large", "unknown", "wall-time", "write-section-with-fast-pf"])
async def test_bad_virtual_configs_create_nothing(client, config, reason):
    with pytest.raises(InvalidArgument) as excinfo:
        await client.create_vm(**config)
    assert excinfo.value.errno_name == "EINVAL"
    assert reason in excinfo.value.reason
    assert await client.list_vms() == []


@pytest.mark.parametrize("field", ["clock", "fault_lock", "table_free", "aging_lock"])
async def test_the_client_refuses_a_name_the_wire_cannot_carry(client, field):
    with pytest.raises(ValueError, match=f"{field} 'sometimes' is not one of"):
        await client.create_vm(**{field: "sometimes"})
    assert await client.list_vms() == []


@pytest.mark.parametrize("field, value, names", [
    ("clock", 7, "CLOCK_WALL, CLOCK_VIRTUAL"),
    ("fault_lock", 3, "FAULT_LOCK_READ, FAULT_LOCK_WRITE"),
    ("table_free", 9, "TABLE_FREE_RCU, TABLE_FREE_WRITE_SECTION"),
    ("aging_lock", 4, "AGING_LOCK_NONE, AGING_LOCK_READ, AGING_LOCK_WRITE"),
])
def test_an_unknown_enum_value_on_the_wire_is_invalid(server, field, value, names):
    with grpc.insecure_channel(server.address) as channel:
        stub = vm_pb2_grpc.VmServiceStub(channel)
        config = vm_pb2.VmConfig(max_vcpus=1, tdp_levels=4, **{field: value})
        with pytest.raises(grpc.RpcError) as excinfo:
            stub.CreateVm(vm_pb2.CreateVmRequest(config=config))
        assert excinfo.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert excinfo.value.details() == f"EINVAL: {field} {value} is not one of {names}"
        assert stub.ListVms(vm_pb2.ListVmsRequest()).vms == []


def test_load_cost_file_reads_plain_and_calibrated_files(tmp_path):
    plain, calibrated, bad = (tmp_path / name for name in ("plain", "calibrated", "bad"))
    plain.write_text('{"fault_base": 900}')
    calibrated.write_text('{"costs": {"vmexit_entry": 700}, "measured": {"exits": 5}}')
    bad.write_text('{"costs": {"fault_base": 1.5}}')

    assert load_cost_file(str(plain)) == {"fault_base": 900}
    assert load_cost_file(str(calibrated)) == {"vmexit_entry": 700}
    with pytest.raises(ValueError, match="a cost file holds a JSON object of cost names"):
        load_cost_file(str(bad))


async def test_trace_events_carry_the_emitters_virtual_time(client):
    vm, (vcpu,) = await _virtual_guest(client)
    trace = await client.trace(vm_ids=[vm.id], events=["kvm_page_fault", "kvm_userspace_exit"])
    result = await vcpu.run(_writes(0, pages=2), start_ns=3000)
    events = [await anext(trace) for _ in range(3)]
    trace.cancel()

    assert [e.event for e in events] == ["kvm_page_fault", "kvm_page_fault",
                                         "kvm_userspace_exit"]
    times = [e.virtual_ns for e in events]
    assert 3000 < times[0] < times[1] < times[2] == result.end_ns


async def test_trace_events_of_a_wall_vm_have_no_virtual_time(client, guest):
    vm, _, vcpu = guest
    trace = await client.trace(vm_ids=[vm.id], events=["kvm_userspace_exit"])
    await vcpu.run(BatchBuilder().write(0x1000, 8).build())
    event = await anext(trace)
    trace.cancel()
    assert (event.event, event.virtual_ns) == ("kvm_userspace_exit", None)


async def test_a_start_time_beyond_2_63_is_refused_and_changes_nothing(client):
    vm, (vcpu,) = await _virtual_guest(client)
    with pytest.raises(InvalidArgument) as excinfo:
        await vcpu.run(_writes(0), start_ns=1 << 63)
    assert excinfo.value.reason == f"start_ns {1 << 63} is not in [0, 2^63) ns"
    assert await vm.virtual_now() == 0
    assert (await vcpu.stats())["virtual_ns"] == 0
