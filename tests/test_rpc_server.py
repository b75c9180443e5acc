"""The server around the model: reflection, health, graceful stop and `vmmu serve`."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase)

from vmmu.client import (AsyncClient, BatchBuilder, Client, ExitReason, Internal,
                          ResourceExhausted, Unavailable)
from vmmu.server.rpc.app import start_server

SERVICES = ["vmmu.v1.HostMemoryService", "vmmu.v1.MemslotService", "vmmu.v1.VcpuService",
            "vmmu.v1.VmService", "vmmu.v1.NotifierService", "vmmu.v1.TraceService"]
MMIO_GPA = 0x1000_0000


def test_reflection_lists_the_services(server):
    with grpc.insecure_channel(server.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        vcpu_file = database.FindFileContainingSymbol("vmmu.v1.VcpuService")
    assert services >= {*SERVICES, "grpc.health.v1.Health"}
    assert vcpu_file.name == "vmmu/v1/vcpu.proto"


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_is_served_as_v1_and_v1alpha(server, version):
    """v1's messages are v1alpha's under another package: one encoding asks both."""
    info = f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo"
    with grpc.insecure_channel(server.address) as channel:
        call = channel.stream_stream(
            info, request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        (response,) = call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    services = {s.name for s in response.list_services_response.service}
    assert services >= {*SERVICES, "grpc.reflection.v1.ServerReflection",
                        "grpc.reflection.v1alpha.ServerReflection"}


@pytest.mark.parametrize("service", ["", *SERVICES])
def test_health_is_serving(server, service):
    with grpc.insecure_channel(server.address) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service))
    assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_stop_lets_an_open_stream_finish_then_shuts_the_model_down():
    serving = await start_server()
    async with AsyncClient(f"127.0.0.1:{serving.port}") as client:
        vm = await client.create_vm()
        vcpu = await vm.create_vcpu(0)
        stream = vcpu.stream()
        pending = await stream.run(BatchBuilder().read(MMIO_GPA, 8, with_data=True).build())
        assert pending.exit.reason is ExitReason.MMIO

        stopping = asyncio.create_task(serving.stop(grace=10))
        await asyncio.sleep(0.1)
        with pytest.raises(Unavailable):
            await client.list_vms()
        done = await stream.complete_mmio(b"12345678")
        assert (done.exit.reason, done.read_data) == (ExitReason.DONE, b"12345678")
        await stream.close()
        started = time.monotonic()
        await stopping
    assert time.monotonic() - started < 5
    assert serving.kvm.vms() == []


async def test_stop_cancels_a_stream_left_open_past_the_grace():
    serving = await start_server()
    async with AsyncClient(f"127.0.0.1:{serving.port}") as client:
        vcpu = await (await client.create_vm()).create_vcpu(0)
        async with vcpu.stream() as stream:
            await stream.run(BatchBuilder().read(MMIO_GPA).build())
            await serving.stop(grace=0.1)
            # Which status the client sees depends on whether gRPC core has taken in the
            # server's cancellation before the write: UNAVAILABLE, or INTERNAL for a write
            # into a call that has already ended. Either way the step fails, it never hangs.
            with pytest.raises((Unavailable, Internal)):
                await stream.complete_mmio(bytes(8))
    assert serving.kvm.vms() == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_vmmu_serve_until_a_signal(signum):
    process = subprocess.Popen(
        [sys.executable, "-m", "vmmu.cli", "serve", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        banner = process.stdout.readline()
        match = re.fullmatch(r"vmmu serving on 127\.0\.0\.1:(\d+)\n", banner)
        assert match, banner
        with Client(f"127.0.0.1:{match.group(1)}") as client:
            assert client.create_vm(name="cli").info().name == "cli"
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert stdout == "vmmu stopping\n"
    assert "Traceback" not in stderr


def test_vmmu_serve_on_a_busy_port_fails_cleanly(server):
    process = subprocess.run(
        [sys.executable, "-m", "vmmu.cli", "serve", "--listen", server.address],
        capture_output=True, text=True, timeout=30)
    assert process.returncode == 1
    assert f"vmmu: cannot listen on {server.address}" in process.stderr
    assert "Traceback" not in process.stderr


def test_vmmu_serve_takes_limits_from_a_file_and_flags_and_logs_errors(tmp_path):
    limits = tmp_path / "limits.toml"
    limits.write_text("[limits]\nvms = 5\nname_bytes = 8\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "vmmu.cli", "serve", "--listen", "127.0.0.1:0",
         "--limits-file", str(limits), "--limit", "vms=1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        match = re.fullmatch(r"vmmu serving on 127\.0\.0\.1:(\d+)\n", process.stdout.readline())
        assert match
        with Client(f"127.0.0.1:{match.group(1)}") as client:
            with pytest.raises(ResourceExhausted) as excinfo:       # from the file
                client.create_vm(name="ninebytes")
            assert excinfo.value.metadata["limit"] == "name_bytes"
            client.create_vm()
            with pytest.raises(ResourceExhausted) as excinfo:       # the flag wins
                client.create_vm()
            assert excinfo.value.metadata["limit"] == "vms"
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert re.search(r"vmmu\.rpc rpc error method=/vmmu\.v1\.VmService/CreateVm "
                     r"code=RESOURCE_EXHAUSTED errno=ENOSPC peer=\S+ reason=", stderr), stderr


@pytest.mark.parametrize("args, message", [
    (["--limit", "nope=3"], "unknown limits ['nope']"),
    (["--limit", "vms=0"], "limit vms = 0 is not a positive integer")])
def test_vmmu_serve_refuses_bad_limits(args, message):
    process = subprocess.run([sys.executable, "-m", "vmmu.cli", "serve", *args],
                             capture_output=True, text=True, timeout=30)
    assert process.returncode == 2 and message in process.stderr
