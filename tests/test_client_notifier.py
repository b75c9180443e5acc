"""Client-held MMU-notifier invalidations over the wire: a vCPU faulting in a held range
waits, memslot updates wait, and the hold ends by EndInvalidation, by its lease, or by its
holder going away (a cancelled stream, a closed channel, a killed process)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import pytest

from vmmu.client import (AsyncClient, Backing, BatchBuilder, ExitReason, HeldInvalidation,
                         HoldState, InvalidArgument, Invalidations, NotFound)
from vmmu.server.rpc import app

MiB = 1 << 20


async def eventually(check, timeout: float = 5.0) -> None:
    """Wait until `check()` (a coroutine function) is true."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0.005)


@pytest.fixture
async def async_guest(server):
    """`guest` through an AsyncClient, for stories that need a call left pending."""
    async with AsyncClient(server.address) as client:
        vm = await client.create_vm(max_vcpus=1)
        region = await vm.mmap(4 * MiB, Backing.THP)
        await vm.set_user_memory_region(slot=0, flags=0, guest_phys_addr=0,
                                        memory_size=4 * MiB, userspace_addr=region.hva)
        yield vm, region, await vm.create_vcpu(0)


READ = BatchBuilder().read(0x1000).build()


async def retrying(vcpu) -> None:
    """Wait until the fresh vCPU's fault has retried (it then sleeps until an
    invalidation ends)."""
    async def retried() -> bool:
        return (await vcpu.stats())["pf_retry"] >= 1
    await eventually(retried)


async def test_begin_zaps_the_range_and_end_lets_it_map_again(guest):
    vm, region, vcpu = guest
    await vcpu.run(READ)
    held_id = await vm.begin_invalidation(region.hva, region.hva + 2 * MiB, lease_s=30)

    assert (await vm.walk(0x1000))[-1].kind == "non-present"
    assert (await vm.invalidations()).held == [
        HeldInvalidation(held_id, region.hva, region.hva + 2 * MiB, HoldState.HELD, 30.0)]

    await vm.end_invalidation(held_id)
    listed = await vm.invalidations()
    assert listed.held == []
    assert [(h.id, h.state) for h in listed.ended] == [(held_id, HoldState.ENDED_BY_CLIENT)]
    assert (await vcpu.run(READ)).exit.reason is ExitReason.DONE
    assert (await vm.walk(0x1000))[-1].kind == "leaf"
    assert (await vm.stats())["invalidations_held"] == 1


async def test_a_fault_in_a_held_range_waits_for_the_end(async_guest):
    vm, region, vcpu = async_guest
    held_id = await vm.begin_invalidation(region.hva, region.hva + 2 * MiB, lease_s=30)
    run = asyncio.create_task(vcpu.run(READ))
    await retrying(vcpu)
    retries = (await vcpu.stats())["pf_retry"]
    await asyncio.sleep(0.05)
    # Still waiting, and asleep rather than re-faulting in a loop.
    assert not run.done() and (await vcpu.stats())["pf_retry"] == retries

    await vm.end_invalidation(held_id)
    assert (await run).exit.reason is ExitReason.DONE


async def test_a_lease_that_runs_out_ends_the_hold_by_itself(guest):
    vm, region, vcpu = guest
    started = time.monotonic()
    held_id = await vm.begin_invalidation(region.hva, region.hva + 2 * MiB, lease_s=0.2)

    result = await vcpu.run(READ)                    # retries until the lease runs out
    assert result.exit.reason is ExitReason.DONE
    assert time.monotonic() - started >= 0.15
    assert (await vcpu.stats())["pf_retry"] > 0
    [ended] = (await vm.invalidations()).ended
    assert (ended.id, ended.state, ended.lease_s) == (held_id, HoldState.LEASE_EXPIRED, 0.2)
    assert (await vm.stats())["invalidations_lease_expired"] == 1
    with pytest.raises(NotFound, match="lease_expired"):
        await vm.end_invalidation(held_id)


async def test_a_memslot_update_waits_for_the_hold(async_guest, server):
    vm, region, _ = async_guest
    extra = await vm.mmap(2 * MiB, Backing.PAGE_4K)
    held_id = await vm.begin_invalidation(region.hva, region.hva + 4096, lease_s=30)
    update = asyncio.create_task(vm.set_user_memory_region(
        slot=1, flags=0, guest_phys_addr=64 * MiB, memory_size=2 * MiB,
        userspace_addr=extra.hva))
    model_vm = server.serving.kvm.get_vm(vm.id)

    async def waiting() -> bool:
        return model_vm.slots_lock.locked()
    await eventually(waiting)                        # holds slots_lock, waits for the end
    assert not update.done() and len(await vm.memslots()) == 1

    await vm.end_invalidation(held_id)
    await update
    assert len(await vm.memslots()) == 2


async def test_a_hold_stream_lasts_until_its_client_ends_it(guest):
    vm, region, vcpu = guest
    hold = await vm.hold_invalidation(region.hva, region.hva + 2 * MiB)
    assert (hold.invalidation.state, hold.invalidation.lease_s) == (HoldState.HELD, None)
    assert [h.id for h in (await vm.invalidations()).held] == [hold.id]

    final = await hold.end()
    assert (final.id, final.state) == (hold.id, HoldState.ENDED_BY_CLIENT)
    assert (await vm.invalidations()).held == []
    assert (await vcpu.run(READ)).exit.reason is ExitReason.DONE


async def test_a_hold_stream_whose_channel_closes_ends_as_client_gone(async_guest, server):
    vm, region, vcpu = async_guest
    holder = AsyncClient(server.address)
    hold = await holder.vm(vm.id).hold_invalidation(region.hva, region.hva + 2 * MiB)
    run = asyncio.create_task(vcpu.run(READ))
    await retrying(vcpu)
    assert not run.done()

    await holder.close()
    assert (await run).exit.reason is ExitReason.DONE
    assert [(h.id, h.state) for h in (await vm.invalidations()).ended] == \
        [(hold.id, HoldState.CLIENT_GONE)]
    assert (await vm.stats())["invalidations_client_gone"] == 1


HOLDER = """
import sys, time
from vmmu.client import Client
client = Client(sys.argv[1])
hold = client.vm(int(sys.argv[2])).hold_invalidation(int(sys.argv[3]), int(sys.argv[4]))
print("held", flush=True)
time.sleep(60)
"""


async def test_a_killed_holder_process_ends_its_hold_and_the_vcpu_proceeds(async_guest, server):
    vm, region, vcpu = async_guest
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, server.address, str(vm.id), str(region.hva),
         str(region.hva + 2 * MiB)], stdout=subprocess.PIPE, text=True)
    try:
        assert await asyncio.to_thread(holder.stdout.readline) == "held\n"
        run = asyncio.create_task(vcpu.run(READ))
        await retrying(vcpu)
        holder.kill()
        result = await asyncio.wait_for(run, timeout=10)
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert result.exit.reason is ExitReason.DONE
    assert [h.state for h in (await vm.invalidations()).ended] == [HoldState.CLIENT_GONE]


KEEPALIVE_S = 1.0


async def test_a_stopped_holder_process_loses_its_hold_within_the_keepalive(serve):
    """SIGSTOP: the holder's socket stays open and its kernel still acknowledges TCP, but
    nothing answers the server's pings; within the keepalive its hold ends as
    CLIENT_GONE and the vCPU waiting on it proceeds."""
    running = serve(keepalive_s=KEEPALIVE_S)
    holder = None
    try:
        async with AsyncClient(running.address) as client:
            vm = await client.create_vm(max_vcpus=1)
            region = await vm.mmap(4 * MiB, Backing.THP)
            await vm.set_user_memory_region(slot=0, flags=0, guest_phys_addr=0,
                                            memory_size=4 * MiB, userspace_addr=region.hva)
            vcpu = await vm.create_vcpu(0)
            holder = subprocess.Popen(
                [sys.executable, "-c", HOLDER, running.address, str(vm.id), str(region.hva),
                 str(region.hva + 2 * MiB)], stdout=subprocess.PIPE, text=True)
            assert await asyncio.to_thread(holder.stdout.readline) == "held\n"
            run = asyncio.create_task(vcpu.run(READ))
            await retrying(vcpu)
            await asyncio.sleep(2 * KEEPALIVE_S)     # pings answered: the hold stays
            assert not run.done()
            assert [h.state for h in (await vm.invalidations()).held] == [HoldState.HELD]

            holder.send_signal(signal.SIGSTOP)
            stopped = time.monotonic()
            # Generous against a loaded machine, far below the 50 s an untuned keepalive
            # (30 s, then 20 s for the ack) would take.
            result = await asyncio.wait_for(run, timeout=10 * KEEPALIVE_S)
            released_after = time.monotonic() - stopped
            assert result.exit.reason is ExitReason.DONE
            assert [h.state for h in (await vm.invalidations()).ended] == \
                [HoldState.CLIENT_GONE]
            print(f"released {released_after:.2f} s after SIGSTOP (keepalive {KEEPALIVE_S} s)")
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
            holder.stdout.close()


@pytest.mark.parametrize("start, end, lease_s", [
    (0x7f00_0000_0001, 0x7f00_0000_2000, 1), (0x7f00_0000_2000, 0x7f00_0000_2000, 1),
    (0x7f00_0000_0000, 0x7f00_0000_1000, 0), (0x7f00_0000_0000, 0x7f00_0000_1000, -1),
    (0x7f00_0000_0000, 0x7f00_0000_1000, 61),
])
async def test_bad_ranges_and_leases_are_invalid_argument(guest, start, end, lease_s):
    vm, _, _ = guest
    with pytest.raises(InvalidArgument) as excinfo:
        await vm.begin_invalidation(start, end, lease_s)
    assert excinfo.value.errno_name == "EINVAL"
    assert await vm.invalidations() == Invalidations(held=[], ended=[])
    assert (await vm.stats())["invalidations_held"] == 0


async def test_a_hold_stream_for_a_bad_range_fails_at_once(guest):
    vm, region, _ = guest
    with pytest.raises(InvalidArgument, match="EINVAL: hva range .* is not page aligned"):
        await vm.hold_invalidation(region.hva, region.hva + 100)
    assert await vm.invalidations() == Invalidations(held=[], ended=[])


async def test_unknown_holds_and_vms_are_not_found(guest, client):
    vm, _, _ = guest
    with pytest.raises(NotFound, match="ENOENT: invalidation 9 is not held"):
        await vm.end_invalidation(9)
    with pytest.raises(NotFound):
        await client.vm(4242).begin_invalidation(0x1000, 0x2000, 1)
    with pytest.raises(NotFound):
        await client.vm(4242).invalidations()


async def test_a_holder_whose_connection_goes_silent_is_noticed_by_keepalive():
    """No FIN, no RST: the holder's host is simply gone. The server's keepalive pings go
    unanswered, it drops the connection, and the hold ends as CLIENT_GONE."""
    serving = await app.start_server(keepalive_s=0.3)
    silent = asyncio.Event()
    relays: list[asyncio.Task] = []
    writers: list[asyncio.StreamWriter] = []

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (data := await reader.read(1 << 16)) and not silent.is_set():
            writer.write(data)
            await writer.drain()
        await asyncio.Event().wait()                 # keep the socket open, say nothing

    async def connect(client_reader, client_writer) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", serving.port)
        writers.extend((client_writer, server_writer))
        relays.extend((asyncio.create_task(relay(client_reader, server_writer)),
                       asyncio.create_task(relay(server_reader, client_writer))))

    proxy = await asyncio.start_server(connect, "127.0.0.1", 0)
    holder = AsyncClient(f"127.0.0.1:{proxy.sockets[0].getsockname()[1]}")
    try:
        async with AsyncClient(f"127.0.0.1:{serving.port}") as client:
            vm = await client.create_vm()
            hold = await holder.vm(vm.id).hold_invalidation(0x10_0000, 0x10_1000)
            await asyncio.sleep(0.3)                 # a few pings answered: pinging goes on
            silent.set()

            async def ended() -> bool:
                return bool((await vm.invalidations()).ended)
            await eventually(ended)
            assert [(h.id, h.state) for h in (await vm.invalidations()).ended] == \
                [(hold.id, HoldState.CLIENT_GONE)]
    finally:
        for task in relays:
            task.cancel()
        for writer in writers:
            writer.close()
        proxy.close()
        await holder.close()
        await serving.stop(grace=0)
