"""Hostile callers over the raw stubs: no call ends in UNKNOWN or INTERNAL, a refused call
changes nothing, and a VM destroyed while its vCPUs run ends their runs with NOT_FOUND.

The fuzz draws, for every RPC of every vmmu.v1 service, either undecodable bytes or a
message whose fields are set at random from values that reach deep (the ids, hvas and gpas
of a live VM, the edges of each integer type, long names, valid and invalid batches). It
is bounded: a fixed number of examples against a server with small limits.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor as D
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmmu.client import AsyncClient, Backing, BatchBuilder, NotFound
from vmmu.server.kvm.limits import Limits
from vmmu.server.rpc.app import start_server
from vmmu.v1 import (dirty_log_pb2, explore_pb2, gpc_pb2, guest_memfd_pb2, host_memory_pb2,
                     memslot_pb2, notifier_pb2, trace_pb2, vcpu_pb2, vm_pb2)

C = grpc.StatusCode
MIB = 1 << 20
MODULES = (vm_pb2, host_memory_pb2, memslot_pb2, vcpu_pb2, explore_pb2, notifier_pb2,
           trace_pb2, gpc_pb2, dirty_log_pb2, guest_memfd_pb2)
METHODS = sorted(((service.full_name, method)
                  for module in MODULES
                  for service in module.DESCRIPTOR.services_by_name.values()
                  for method in service.methods), key=lambda sm: (sm[0], sm[1].name))
FUZZ_LIMITS = Limits(vms=16, vm_populated_bytes=64 * MIB, server_populated_bytes=128 * MIB,
                     response_bytes=1 * MIB, explore_seeds=3, batch_accesses=4096,
                     batch_bytes=16 * MIB, holds=2, trace_subscribers=4)
TIMEOUT = 30.0      # generous: the machine may be busy; no call here waits on another

_RANGES = {
    D.FieldDescriptor.TYPE_UINT32: (0, (1 << 32) - 1),
    D.FieldDescriptor.TYPE_UINT64: (0, (1 << 64) - 1),
    D.FieldDescriptor.TYPE_INT32: (-(1 << 31), (1 << 31) - 1),
    D.FieldDescriptor.TYPE_INT64: (-(1 << 63), (1 << 63) - 1),
}


_EDGES = ("zero", "one", "lo", "hi", "half", "wide", "vm_id", "hva", "hva_page", "size", "gpa",
          "huge")


def _int(data: st.DataObject, field: D.FieldDescriptor, ctx: dict[str, int]) -> int:
    """An edge of the field's type, a value of the live VM (drawn by name, so that the
    draws do not depend on the server's ids) or any value in range."""
    lo, hi = _RANGES[field.type]
    drawn = data.draw(st.sampled_from(_EDGES) | st.integers(lo, hi))
    if isinstance(drawn, int):
        return drawn
    value = {"zero": 0, "one": 1, "lo": lo, "hi": hi, "half": hi // 2 + 1,
             "wide": 1 << 50, **ctx}[drawn]
    return value if lo <= value <= hi else lo


def _batch(data: st.DataObject, ctx: dict[str, int]) -> vcpu_pb2.AccessBatch:
    builder = BatchBuilder()
    for _ in range(data.draw(st.integers(1, 8))):
        gpa = data.draw(st.sampled_from([0x1000, 0x3ff8, ctx["size"] - 8, 0x1000_0000]))
        if data.draw(st.booleans()):
            builder.write(gpa, 8, data=bytes(8))
        else:
            builder.read(gpa, 8, with_data=data.draw(st.booleans()))
    batch = builder.build()
    return vcpu_pb2.AccessBatch(gpas=batch.gpas, ops=batch.ops, write_data=batch.write_data)


def _fill(data: st.DataObject, message: Message, ctx: dict[str, int], depth: int = 0) -> None:
    if type(message) is vcpu_pb2.AccessBatch and data.draw(st.booleans()):
        message.CopyFrom(_batch(data, ctx))
        return
    for field in message.DESCRIPTOR.fields:
        if not data.draw(st.booleans()):
            continue
        repeated = field.is_repeated
        count = data.draw(st.integers(0, 3)) if repeated else 1
        for _ in range(count):
            if field.type == D.FieldDescriptor.TYPE_MESSAGE:
                if depth >= 2:
                    break
                if field.message_type.GetOptions().map_entry:
                    break
                target = getattr(message, field.name).add() if repeated \
                    else getattr(message, field.name)
                _fill(data, target, ctx, depth + 1)
                if not repeated:
                    target.SetInParent()
                continue
            value = _scalar(data, field, ctx)
            if repeated:
                getattr(message, field.name).append(value)
            else:
                setattr(message, field.name, value)


def _scalar(data: st.DataObject, field: D.FieldDescriptor, ctx: dict[str, int]) -> Any:
    if field.type in _RANGES:
        return _int(data, field, ctx)
    if field.type == D.FieldDescriptor.TYPE_BOOL:
        return data.draw(st.booleans())
    if field.type == D.FieldDescriptor.TYPE_ENUM:
        return data.draw(st.sampled_from([*field.enum_type.values_by_number, 99]))
    if field.type == D.FieldDescriptor.TYPE_STRING:
        return data.draw(st.sampled_from(["", "global", "range", "skip_invalidate_retry",
                                          "kvm_page_fault", "x" * 300])
                         | st.text(max_size=16))
    if field.type == D.FieldDescriptor.TYPE_BYTES:
        return data.draw(st.binary(max_size=64))
    if field.type in (D.FieldDescriptor.TYPE_DOUBLE, D.FieldDescriptor.TYPE_FLOAT):
        return data.draw(st.floats(allow_nan=True, width=32))
    raise AssertionError(f"no strategy for {field.full_name}")


class Wire:
    """Raw calls by method name, on one channel."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel

    def call(self, service: str, method: D.MethodDescriptor, request: bytes
             ) -> tuple[C, list[Message]]:
        """(status code, responses) of one call; a stream is read for two responses (one
        for Run, which gets one request), then cancelled."""
        path = f"/{service}/{method.name}"
        response_class = _message_class(method.output_type)
        kinds = (method.client_streaming, method.server_streaming)
        stub = {(False, False): self.channel.unary_unary, (False, True): self.channel.unary_stream,
                (True, True): self.channel.stream_stream}[kinds](
            path, response_deserializer=response_class.FromString)
        responses: list[Message] = []
        try:
            if kinds == (False, False):
                responses.append(stub(request, timeout=TIMEOUT))
                return C.OK, responses
            call = stub(iter([request]) if kinds[0] else request, timeout=TIMEOUT)
            for response in call:
                responses.append(response)
                if len(responses) == (1 if kinds[0] else 2):
                    call.cancel()
                    break
            return C.OK, responses
        except grpc.RpcError as exc:
            return exc.code(), responses


def _message_class(descriptor: D.Descriptor) -> type[Message]:
    for module in MODULES:
        if descriptor.file.name == module.DESCRIPTOR.name:
            return getattr(module, descriptor.name)
    raise AssertionError(descriptor.full_name)


def _make_vm(wire: Wire) -> dict[str, int]:
    """A VM with 4 MiB at gpa 0 and vCPU 0, alone on the server: the values a fuzzed
    request may name."""
    ch = wire.channel
    for vm in _list_vms(wire):            # left by an example that failed or was cut short
        ch.unary_unary("/vmmu.v1.VmService/DestroyVm")(
            vm_pb2.DestroyVmRequest(vm_id=vm.id).SerializeToString(), timeout=TIMEOUT)
    vm_id = ch.unary_unary("/vmmu.v1.VmService/CreateVm",
                           response_deserializer=vm_pb2.CreateVmResponse.FromString)(
        vm_pb2.CreateVmRequest(config=vm_pb2.VmConfig(max_vcpus=2)).SerializeToString()).vm.id
    region = ch.unary_unary("/vmmu.v1.HostMemoryService/CreateRegion",
                            response_deserializer=host_memory_pb2.CreateRegionResponse.FromString)(
        host_memory_pb2.CreateRegionRequest(vm_id=vm_id, size=4 * MIB,
                                            backing=host_memory_pb2.BACKING_THP)
        .SerializeToString()).region
    ch.unary_unary("/vmmu.v1.MemslotService/SetUserMemoryRegion")(
        memslot_pb2.SetUserMemoryRegionRequest(vm_id=vm_id, memory_size=4 * MIB,
                                               userspace_addr=region.hva).SerializeToString())
    ch.unary_unary("/vmmu.v1.VcpuService/CreateVcpu")(
        vcpu_pb2.CreateVcpuRequest(vm_id=vm_id, vcpu_id=0).SerializeToString())
    return {"vm_id": vm_id, "hva": region.hva, "hva_page": region.hva + 4096,
            "size": 4 * MIB, "gpa": 0x1000, "huge": 2 * MIB}


def _snapshot(wire: Wire, vm_id: int) -> list[Message]:
    """What a refused call must leave as it was."""
    requests = [
        ("/vmmu.v1.VmService/ListVms", vm_pb2.ListVmsRequest(), vm_pb2.ListVmsResponse),
        ("/vmmu.v1.HostMemoryService/ListRegions",
         host_memory_pb2.ListRegionsRequest(vm_id=vm_id), host_memory_pb2.ListRegionsResponse),
        ("/vmmu.v1.MemslotService/ListMemslots", memslot_pb2.ListMemslotsRequest(vm_id=vm_id),
         memslot_pb2.ListMemslotsResponse),
        ("/vmmu.v1.VcpuService/GetVcpu", vcpu_pb2.GetVcpuRequest(vm_id=vm_id, vcpu_id=0),
         vcpu_pb2.GetVcpuResponse),
        ("/vmmu.v1.NotifierService/ListInvalidations",
         notifier_pb2.ListInvalidationsRequest(vm_id=vm_id),
         notifier_pb2.ListInvalidationsResponse),
        ("/vmmu.v1.GpcService/ListGpcs", gpc_pb2.ListGpcsRequest(vm_id=vm_id),
         gpc_pb2.ListGpcsResponse),
        ("/vmmu.v1.VmService/WalkEpt", vm_pb2.WalkEptRequest(vm_id=vm_id, gpa=0x1000),
         vm_pb2.WalkEptResponse),
        ("/vmmu.v1.GuestMemfdService/ListGuestMemfds",
         guest_memfd_pb2.ListGuestMemfdsRequest(vm_id=vm_id),
         guest_memfd_pb2.ListGuestMemfdsResponse),
        ("/vmmu.v1.GuestMemfdService/ListPrivateRanges",
         guest_memfd_pb2.ListPrivateRangesRequest(vm_id=vm_id),
         guest_memfd_pb2.ListPrivateRangesResponse),
    ]
    return [wire.channel.unary_unary(path, response_deserializer=response.FromString)(
        request.SerializeToString(), timeout=TIMEOUT) for path, request, response in requests]


@pytest.fixture
def fuzz_server(serve):
    with grpc.insecure_channel(serve(limits=FUZZ_LIMITS).address) as channel:
        yield Wire(channel)


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(data=st.data())
def test_no_call_ends_in_unknown_or_internal_and_a_refusal_changes_nothing(fuzz_server, data):
    wire = fuzz_server
    ctx = _make_vm(wire)
    service, method = data.draw(st.sampled_from(METHODS))
    if data.draw(st.integers(0, 4)) == 0:
        request = data.draw(st.binary(max_size=32))
    else:
        message = _message_class(method.input_type)()
        _fill(data, message, ctx)
        request = message.SerializeToString()
    before = _snapshot(wire, ctx["vm_id"])
    code, responses = wire.call(service, method, request)
    assert code not in (C.UNKNOWN, C.INTERNAL), (method.full_name, code)
    refused_step = any(isinstance(r, vcpu_pb2.RunResponse) and r.HasField("error")
                       for r in responses)
    if code not in (C.OK, C.CANCELLED, C.DEADLINE_EXCEEDED) or refused_step:
        assert _snapshot(wire, ctx["vm_id"]) == before, (method.full_name, code)


def _list_vms(wire: Wire) -> list[vm_pb2.VmInfo]:
    return list(wire.channel.unary_unary(
        "/vmmu.v1.VmService/ListVms", response_deserializer=vm_pb2.ListVmsResponse.FromString)(
        vm_pb2.ListVmsRequest().SerializeToString(), timeout=TIMEOUT).vms)


@pytest.mark.parametrize("seed", [None, 0, 1, 2, 3, 4, 5])
async def test_destroy_racing_runs_ends_them_with_not_found(seed):
    serving = await start_server("127.0.0.1:0")
    async with AsyncClient(f"127.0.0.1:{serving.port}") as client:
        vm = await client.create_vm(max_vcpus=2, schedule_seed=seed)
        region = await vm.mmap(16 * MIB, Backing.PAGE_4K)
        await vm.set_user_memory_region(slot=0, flags=0, guest_phys_addr=0,
                                        memory_size=16 * MIB, userspace_addr=region.hva)
        vcpus = [await vm.create_vcpu(i) for i in range(2)]
        builder = BatchBuilder()
        for gpa in range(0, 16 * MIB, 4096 * 3):
            builder.write(gpa, 8, data=bytes(8))
        batch = builder.build()

        async def unary(vcpu):
            while True:
                await vcpu.run(batch)

        async def stream(vcpu):
            async with vcpu.stream() as s:
                while True:
                    await s.run(batch)

        runs = [asyncio.create_task(unary(vcpus[0])), asyncio.create_task(stream(vcpus[1]))]
        await asyncio.sleep(0.05)
        await vm.destroy()
        for run in runs:
            with pytest.raises(NotFound):
                await run
        assert await client.list_vms() == []
    await serving.stop(grace=1)
