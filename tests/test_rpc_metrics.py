"""`--metrics`: Prometheus metrics over HTTP, scraped and parsed as Prometheus would."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from vmmu.client import (Backing, BatchBuilder, Client, NotFound, ResourceExhausted,
                         Unauthenticated)
from vmmu.client.errors import error_info
from vmmu.server.rpc.auth import Tokens

MiB = 1 << 20


def scrape(port: int, token: str | None = None
           ) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the endpoint: (name, sorted labels) -> value."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={
        "Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def scrape_counted(port: int, keys: list, token: str | None = None
                   ) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A scrape that shows every sample in `keys`, or the last one tried after 10 s. An
    aborted call's status reaches the client when `abort` sends it, before the metrics
    interceptor's `finally` counts it: a scrape right after may be one count behind."""
    deadline = time.monotonic() + 10
    while True:
        samples = scrape(port, token)
        if all(key in samples for key in keys) or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def guest(client: Client, max_vcpus: int = 1):
    """A VM with 4 MiB of 4K pages at gpa 0 and vCPU 0: (vm, region, vcpu)."""
    vm = client.create_vm(max_vcpus=max_vcpus)
    region = vm.mmap(4 * MiB, Backing.PAGE_4K)
    vm.set_user_memory_region(slot=0, flags=0, guest_phys_addr=0, memory_size=4 * MiB,
                              userspace_addr=region.hva)
    return vm, region, vm.create_vcpu(0)


@pytest.fixture
def metered(serve):
    return serve(metrics="127.0.0.1:0")


def test_rpcs_are_counted_by_method_and_code_and_timed(metered):
    with Client(metered.address) as client:
        vm, _, vcpu = guest(client)
        for _ in range(3):
            vcpu.run(BatchBuilder().write(0x1000, data=b"metrics!").read(0x5000, 8).build())
        with pytest.raises(NotFound):
            client.vm(999).info()
        with pytest.raises(ResourceExhausted):                  # ENOMEM: nothing mapped
            vm.madvise_populate_write(0x10_0000_0000, 4096)
    samples = scrape_counted(metered.serving.metrics_port, [
        ("vmmu_rpcs_total", (("code", "NOT_FOUND"), ("method", "VmService/GetVm"))),
        ("vmmu_rpcs_total", (("code", "RESOURCE_EXHAUSTED"),
                             ("method", "HostMemoryService/Madvise")))])

    def rpcs(method: str, code: str) -> float:
        return samples.get(("vmmu_rpcs_total", (("code", code), ("method", method))), 0)

    assert rpcs("VmService/CreateVm", "OK") == 1
    assert rpcs("VcpuService/RunBatch", "OK") == 3
    assert rpcs("VmService/GetVm", "NOT_FOUND") == 1
    assert rpcs("HostMemoryService/Madvise", "RESOURCE_EXHAUSTED") == 1
    assert samples[("vmmu_limit_rejections_total",
                    (("method", "HostMemoryService/Madvise"),))] == 1
    assert samples[("vmmu_rpc_duration_seconds_count",
                    (("code", "OK"), ("method", "VcpuService/RunBatch")))] == 3
    assert samples[("vmmu_rpc_duration_seconds_bucket",
                    (("code", "OK"), ("le", "+Inf"), ("method", "VcpuService/RunBatch")))] == 3


def test_the_model_is_read_at_the_scrape(metered):
    with Client(metered.address) as client:
        vm, region, vcpu = guest(client, max_vcpus=2)
        vcpu.run(BatchBuilder().write(0x1000, data=b"12345678").read(0x2000, 8)
                 .read(0xFEE0_0000, 4).build())                  # the last one is MMIO
        trace = client.trace(vm_ids=[vm.id], capacity=1)
        vcpu.complete_mmio(b"\0\0\0\0")
        vcpu.run(BatchBuilder().read(0x3000, 8).read(0x4000, 8).build())
        hold = vm.hold_invalidation(region.hva, region.hva + MiB)
        try:
            samples = scrape(metered.serving.metrics_port)
        finally:
            hold.cancel()
            trace.cancel()
        model = {name: value for (name, labels), value in samples.items() if not labels}
        assert (model["vmmu_vms"], model["vmmu_vcpus"]) == (1, 1)
        assert model["vmmu_invalidations_held"] == 1
        assert model["vmmu_trace_dropped_events"] > 0          # a buffer of one event
        assert samples[("vmmu_host_memory_bytes", (("state", "mapped"),))] == 4 * MiB
        # The one page written; the three only read map the zero page and take no memory.
        assert samples[("vmmu_host_memory_bytes", (("state", "populated"),))] == 4096
        assert samples[("vmmu_page_faults", (("kind", "fixed"),))] == 4
        assert samples[("vmmu_exits", (("kind", "mmio"),))] == 1
        assert samples[("vmmu_exits", (("kind", "ept_violation"),))] >= 5
        assert ("vmmu_mmu_lock_wait_seconds", (("mode", "write"),)) in samples
        vm.destroy()
    samples = scrape(metered.serving.metrics_port)
    assert samples[("vmmu_vms", ())] == 0
    assert samples[("vmmu_host_memory_bytes", (("state", "mapped"),))] == 0
    assert samples[("vmmu_host_memory_bytes", (("state", "populated"),))] == 0


def test_refused_calls_are_counted_too(serve):
    running = serve(metrics="127.0.0.1:0", tokens=Tokens.parse("secret\n"))
    with Client(running.address) as client, pytest.raises(Unauthenticated):
        client.list_vms()
    with Client(running.address, token="secret") as client:
        client.list_vms()
    samples = scrape_counted(running.serving.metrics_port, [
        ("vmmu_rpcs_total", (("code", "UNAUTHENTICATED"), ("method", "VmService/ListVms")))],
        token="secret")
    assert samples[("vmmu_rpcs_total", (("code", "UNAUTHENTICATED"),
                                        ("method", "VmService/ListVms")))] == 1
    assert samples[("vmmu_rpcs_total", (("code", "OK"), ("method", "VmService/ListVms")))] == 1


def test_every_interceptor_applies_and_the_final_code_is_counted(serve):
    """Metrics, then the token check, then the error guard: bytes protobuf cannot decode
    are INVALID_ARGUMENT for a call that passed the token check, UNAUTHENTICATED for one
    that did not, each with its ErrorInfo, and counted with that code."""
    running = serve(metrics="127.0.0.1:0", tokens=Tokens.parse("secret\n"))
    with grpc.insecure_channel(running.address) as channel:
        create = channel.unary_unary("/vmmu.v1.VmService/CreateVm")
        for metadata, code, errno_name in [
                ((("authorization", "Bearer secret"),), grpc.StatusCode.INVALID_ARGUMENT,
                 "EINVAL"),
                ((), grpc.StatusCode.UNAUTHENTICATED, "EACCES")]:
            with pytest.raises(grpc.RpcError) as excinfo:
                create(b"\xff\xff\xff", metadata=metadata)
            assert excinfo.value.code() is code
            info = error_info(excinfo.value.trailing_metadata())
            assert info is not None and info.reason == errno_name
            assert info.metadata["method"] == "/vmmu.v1.VmService/CreateVm"
    keys = [("vmmu_rpcs_total", (("code", code), ("method", "VmService/CreateVm")))
            for code in ("INVALID_ARGUMENT", "UNAUTHENTICATED")]
    samples = scrape_counted(running.serving.metrics_port, keys, token="secret")
    assert [samples.get(key) for key in keys] == [1, 1]
    with Client(running.address, token="secret") as client:
        assert client.list_vms() == []                     # nothing was created


def test_serve_announces_its_metrics_endpoint():
    server = subprocess.Popen([sys.executable, "-m", "vmmu.cli", "serve", "--listen",
                               "127.0.0.1:0", "--metrics", "127.0.0.1:0"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().startswith("vmmu serving on 127.0.0.1:")
        line = server.stdout.readline()
        assert line.startswith("vmmu metrics on http://127.0.0.1:")
        port = int(line.rsplit(":", 1)[1].split("/")[0])
        assert scrape(port)[("vmmu_vms", ())] == 0
    finally:
        server.terminate()
        server.wait(timeout=30)
        server.stdout.close()


def test_the_loop_watch_tells_a_step_that_held_the_loop_from_a_wait(metered):
    """A step that keeps the loop's thread on the CPU for 60 ms shows as a busy interval
    above 50 ms and a late timer; one that blocks it for 60 ms without the CPU (a sleep)
    shows as a late timer only."""
    port = metered.serving.metrics_port

    def over_50ms(samples: dict, name: str) -> float:
        return samples[(f"{name}_count", ())] - samples[(f"{name}_bucket", (("le", "0.05"),))]

    async def hold(spin: bool) -> None:
        if spin:
            end = time.thread_time() + 0.06
            while time.thread_time() < end:
                pass
        else:
            time.sleep(0.06)

    for spin in (True, False):
        before = scrape(port)
        metered.call(hold(spin))
        after = scrape(port)      # answered after the timer the step made late
        lag, busy = (over_50ms(after, name) - over_50ms(before, name)
                     for name in ("vmmu_event_loop_lag_seconds", "vmmu_event_loop_busy_seconds"))
        assert lag >= 1
        assert busy == (1 if spin else 0)
    assert after[("vmmu_event_loop_busy_seconds_count", ())] > \
        before[("vmmu_event_loop_busy_seconds_count", ())]
