"""The server's limits over the wire: each one refused with RESOURCE_EXHAUSTED naming it,
before anything changes; per identity as well as per server; the response-size cases; the
hva allocator; memory released at destroy."""

from __future__ import annotations

import asyncio
import errno
import random
from collections.abc import AsyncIterator

import grpc
import pytest

from vmmu.client import (KVM_MEM_LOG_DIRTY_PAGES, AsyncClient, Backing, BatchBuilder,
                         ExitReason, ResourceExhausted)
from vmmu.server.kvm.limits import Limits
from vmmu.server.rpc.app import Serving, start_server
from vmmu.server.rpc.auth import Tokens
from vmmu.v1 import explore_pb2, explore_pb2_grpc

MIB, GIB = 1 << 20, 1 << 30


@pytest.fixture
async def limited() -> AsyncIterator[tuple[AsyncClient, Serving]]:
    """`await limited(**limits)`: a client of a fresh server with those limits."""
    opened: list[tuple[AsyncClient, Serving]] = []

    async def start(tokens: Tokens | None = None, **limits: int
                    ) -> tuple[AsyncClient, Serving]:
        serving = await start_server("127.0.0.1:0", Limits.from_mapping(limits),
                                     tokens=tokens)
        client = AsyncClient(f"127.0.0.1:{serving.port}",
                             token="alice-secret" if tokens else None)
        opened.append((client, serving))
        return client, serving

    yield start
    for client, serving in opened:
        await client.close()
        await serving.stop(grace=1)


async def _refused(limit: str, call, identity: str | None = None) -> ResourceExhausted:
    with pytest.raises(ResourceExhausted) as excinfo:
        await call
    error = excinfo.value
    assert error.metadata["limit"] == limit and f"(limit {limit} = " in error.reason
    assert error.metadata.get("identity") == identity
    if identity is not None:
        assert f"for identity {identity!r}" in error.reason
    return error


TOKENS = Tokens({"alice-secret": "alice", "bob-secret": "bob"})


@pytest.fixture
async def bob(limited) -> AsyncIterator:
    """`await bob(serving)`: a second identity's client of that server."""
    opened: list[AsyncClient] = []

    async def connect(serving: Serving) -> AsyncClient:
        opened.append(AsyncClient(f"127.0.0.1:{serving.port}", token="bob-secret"))
        return opened[-1]

    yield connect
    for client in opened:
        await client.close()


async def test_vms_per_server(limited):
    client, _ = await limited(vms=2)
    await client.create_vm()
    await client.create_vm()
    before = await client.list_vms()
    error = await _refused("vms", client.create_vm())
    assert error.errno == errno.ENOSPC
    assert await client.list_vms() == before


async def test_vms_per_identity_and_per_server(limited, bob):
    alice, serving = await limited(TOKENS, vms=3, identity_vms=2)
    bobs = await bob(serving)
    first = await alice.create_vm()
    await alice.create_vm()
    error = await _refused("identity_vms", alice.create_vm(), identity="alice")
    assert error.errno == errno.ENOSPC
    assert len(await alice.list_vms()) == 2
    await bobs.create_vm()                        # bob's share is his own...
    await _refused("vms", bobs.create_vm())       # ... within the server's
    assert len(await bobs.list_vms()) == 1
    await first.destroy()                         # alice's VM goes: her count goes down
    await alice.create_vm()


async def test_without_tokens_an_identity_is_the_peers_host(limited):
    """Clients on the same host are one identity, whatever their connections."""
    client, serving = await limited(identity_vms=1, vms=4)
    await client.create_vm()
    async with AsyncClient(f"127.0.0.1:{serving.port}") as other:
        await _refused("identity_vms", other.create_vm(), identity="ipv4:127.0.0.1")
    assert len(serving.kvm.vms()) == 1


@pytest.mark.parametrize("kind", ["mapped", "populated"])
async def test_memory_per_identity(limited, bob, kind):
    """An identity's VMs together stay within its share; another's VMs are charged to
    theirs, all within the server's."""
    limit = f"identity_{kind}_bytes"
    alice, serving = await limited(TOKENS, **{limit: 24 * MIB})
    bobs = await bob(serving)
    first, region, _ = await _guest(alice, 16 * MIB)
    second = await alice.create_vm()
    if kind == "mapped":
        await _refused(limit, second.mmap(16 * MIB, Backing.THP), identity="alice")
        assert await second.host_regions() == []
        await second.mmap(8 * MIB, Backing.THP)
    else:
        await first.madvise_populate_write(region.hva, 16 * MIB)
        other = await second.mmap(16 * MIB, Backing.PAGE_4K)
        await _refused(limit, second.madvise_populate_write(other.hva, 16 * MIB),
                       identity="alice")
        assert (await second.host_regions())[0].populated_4k_pages == 0
        await second.madvise_populate_write(other.hva, 8 * MIB)
    theirs, region, _ = await _guest(bobs, 16 * MIB)
    await theirs.madvise_populate_write(region.hva, 16 * MIB)
    assert getattr(serving.kvm, kind).usage == (24 + 16) * MIB        # alice's and bob's
    await first.destroy()                        # the charge goes back through alice's
    await second.mmap(16 * MIB, Backing.THP)


async def test_trace_subscribers_per_identity(limited, bob):
    alice, serving = await limited(TOKENS, identity_trace_subscribers=1)
    bobs = await bob(serving)
    first = await alice.trace()
    await _refused("identity_trace_subscribers", alice.trace(), identity="alice")
    theirs = await bobs.trace()
    first.cancel()
    theirs.cancel()


async def test_vcpus_per_vm(limited):
    client, _ = await limited(vcpus=4)
    await _refused("vcpus", client.create_vm(max_vcpus=5))
    assert await client.list_vms() == []
    vm = await client.create_vm(max_vcpus=4)
    await vm.create_vcpu(3)


@pytest.mark.parametrize("size", [257, 17 * MIB])
async def test_name_length(limited, size):
    """A 17 MiB name used to create the VM, then fail on the response, then break ListVms."""
    client, _ = await limited(name_bytes=256)
    error = await _refused("name_bytes", client.create_vm(name="x" * size))
    assert error.errno == errno.E2BIG
    assert await client.list_vms() == []
    vm = await client.create_vm(name="é" * 128)                            # 256 bytes
    assert (await vm.info()).name == "é" * 128


@pytest.mark.parametrize("limit", ["vm_mapped_bytes", "server_mapped_bytes"])
async def test_mapped_memory(limited, limit):
    client, _ = await limited(**{limit: 64 * MIB})
    vm = await client.create_vm()
    await vm.mmap(48 * MIB, Backing.THP)
    regions = await vm.host_regions()
    other = await client.create_vm()
    await _refused(limit, (vm if limit == "vm_mapped_bytes" else other).mmap(
        32 * MIB, Backing.THP))
    assert await vm.host_regions() == regions
    await vm.munmap(regions[0].hva, regions[0].size)      # the charge goes back
    await vm.mmap(64 * MIB, Backing.PAGE_4K)


async def _guest(client: AsyncClient, size: int, backing: Backing = Backing.PAGE_4K,
                 flags: int = 0):
    vm = await client.create_vm(max_vcpus=1)
    region = await vm.mmap(size, backing)
    await vm.set_user_memory_region(slot=0, flags=flags, guest_phys_addr=0,
                                    memory_size=size, userspace_addr=region.hva)
    return vm, region, await vm.create_vcpu(0)


@pytest.mark.parametrize("limit", ["vm_populated_bytes", "server_populated_bytes"])
async def test_populated_memory_host_operations(limited, limit):
    client, serving = await limited(**{limit: 8 * MIB})
    vm, region, _ = await _guest(client, 16 * MIB)
    await vm.madvise_populate_write(region.hva, 6 * MIB)
    await _refused(limit, vm.madvise_populate_write(region.hva, 16 * MIB))
    # A read maps the zero page: it populates nothing, so no limit refuses it.
    assert await vm.read_hva(region.hva + 6 * MIB, 4 * MIB) == bytes(4 * MIB)
    await _refused(limit, vm.write_hva(region.hva + 8 * MIB, bytes(4 * MIB)))
    await _refused(limit, vm.write_hva(region.hva + 6 * MIB, bytes(4 * MIB)))  # zero pages
    (info,) = await vm.host_regions()
    assert info.populated_4k_pages == 6 * MIB // 4096          # nothing more populated
    assert serving.kvm.populated.usage == 6 * MIB
    await vm.write_hva(region.hva, bytes(6 * MIB))               # populated already: fine


async def test_populated_memory_guest_access_is_a_memory_fault_at_the_limit(limited):
    """As a memory cgroup's limit: the access that would pass it fails, the ones before
    it stand."""
    client, _ = await limited(vm_populated_bytes=64 * 4096)
    vm, _, vcpu = await _guest(client, 4 * MIB)
    builder = BatchBuilder()
    for page in range(100):
        builder.write(page * 4096, 8)
    result = await vcpu.run(builder.build())
    assert result.completed == 64
    assert (result.exit.reason, result.exit.errno, result.exit.gpa) == \
        (ExitReason.MEMORY_FAULT, errno.ENOMEM, 64 * 4096)
    assert "vm_populated_bytes" in result.exit.message


async def test_memslot_size(limited):
    client, _ = await limited(memslot_bytes=64 * MIB)
    vm = await client.create_vm()
    region = await vm.mmap(128 * MIB, Backing.THP)
    error = await _refused("memslot_bytes", vm.set_user_memory_region(
        slot=0, flags=0, guest_phys_addr=0, memory_size=128 * MIB, userspace_addr=region.hva))
    assert error.errno == errno.E2BIG
    assert await vm.memslots() == []


async def test_batch_length_and_allocation(limited):
    """A batch is bounded by a host page per distinct page and a page table per distinct
    table it may need: 64 reads within 2 MiB need ~268 KiB; 64 reads 2 MiB apart (the
    case of a page-table page per access) need ~520 KiB."""
    client, _ = await limited(batch_accesses=100, batch_bytes=512 * 1024)
    vm, _, vcpu = await _guest(client, 128 * MIB)
    too_long = BatchBuilder()
    for _ in range(101):
        too_long.read(0x1000)
    await _refused("batch_accesses", vcpu.run(too_long.build()))
    stats = await vcpu.stats()
    spread = BatchBuilder()
    for gpa in range(0, 128 * MIB, 2 * MIB):
        spread.read(gpa)
    error = await _refused("batch_bytes", vcpu.run(spread.build()))
    assert error.errno == errno.E2BIG
    assert await vcpu.stats() == stats
    dense = BatchBuilder()
    for gpa in range(0, 64 * 4096, 4096):
        dense.read(gpa)
    assert (await vcpu.run(dense.build())).exit.reason is ExitReason.DONE


async def test_trace_subscribers(limited):
    client, _ = await limited(trace_subscribers=2)
    first, second = await client.trace(), await client.trace()
    await _refused("trace_subscribers", client.trace())
    first.cancel()
    for _ in range(100):             # the server sees the stream cancelled and unsubscribes
        try:
            third = await client.trace()
            break
        except ResourceExhausted:
            await asyncio.sleep(0.01)
    third.cancel()
    second.cancel()


async def test_holds_per_vm(limited):
    client, _ = await limited(holds=2)
    vm = await client.create_vm()
    region = await vm.mmap(4 * MIB, Backing.PAGE_4K)
    await vm.begin_invalidation(region.hva, region.hva + 4096, lease_s=30)
    async with await vm.hold_invalidation(region.hva, region.hva + 4096):
        held = (await vm.invalidations()).held
        await _refused("holds", vm.begin_invalidation(region.hva, region.hva + 4096, 30))
        await _refused("holds", vm.hold_invalidation(region.hva, region.hva + 4096))
        assert (await vm.invalidations()).held == held


async def test_explore_seeds(limited):
    client, serving = await limited(explore_seeds=10)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{serving.port}") as channel:
        stub = explore_pb2_grpc.ExploreServiceStub(channel)
        scenario = (await stub.ListScenarios(explore_pb2.ListScenariosRequest())).scenarios[0]
        call = stub.Explore(explore_pb2.ExploreRequest(scenario=scenario.name, seeds=11))
        with pytest.raises(grpc.RpcError) as excinfo:
            async for _ in call:
                pass
    assert excinfo.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "explore_seeds" in excinfo.value.details()


async def test_read_hva_beyond_the_response_size_populates_nothing(limited):
    client, _ = await limited(response_bytes=1 * MIB)
    vm = await client.create_vm()
    region = await vm.mmap(4 * MIB, Backing.PAGE_4K)
    error = await _refused("response_bytes", vm.read_hva(region.hva, 1 * MIB + 1))
    assert error.errno == errno.E2BIG
    assert (await vm.host_regions())[0].populated_4k_pages == 0
    assert await vm.read_hva(region.hva, 1 * MIB) == bytes(MIB)


async def test_a_dirty_log_beyond_the_response_size_is_not_harvested(limited):
    """The bitmap of a 256 MiB slot is 8 KiB: refused whole, before the harvest would
    clear its bits and write-protect the page again."""
    client, _ = await limited(response_bytes=4096)
    vm, _, vcpu = await _guest(client, 256 * MIB, flags=KVM_MEM_LOG_DIRTY_PAGES)
    await vcpu.run(BatchBuilder().write(0x5000, 8).build())
    leaf = (await vm.walk(0x5000))[-1]
    assert leaf.writable
    await _refused("response_bytes", vm.get_dirty_log(0))
    assert (await vm.walk(0x5000))[-1] == leaf               # still writable: not harvested


async def test_the_hva_allocator_reuses_freed_space_and_a_refusal_moves_nothing(limited):
    client, _ = await limited(vm_mapped_bytes=1 << 46)
    vm = await client.create_vm()
    first = await vm.mmap(4 * MIB, Backing.THP)
    second = await vm.mmap(4 * MIB, Backing.THP)
    with pytest.raises(ResourceExhausted) as excinfo:        # past the user address space
        await vm.mmap(1 << 41, Backing.THP)
    assert excinfo.value.errno == errno.ENOMEM
    third = await vm.mmap(4 * MIB, Backing.THP)
    assert third.hva == second.hva + 6 * MIB                  # as if no refusal happened
    await vm.munmap(first.hva, first.size)
    again = await vm.mmap(2 * MIB, Backing.THP)
    assert again.hva == first.hva                              # the freed space is reused
    for _ in range(200):                                       # no creep: map, unmap, repeat
        region = await vm.mmap(64 * MIB, Backing.THP)
        await vm.munmap(region.hva, region.size)
    assert region.hva == third.hva + 6 * MIB


async def test_a_destroyed_vm_gives_its_memory_back_at_once(limited):
    client, serving = await limited()
    vm, region, vcpu = await _guest(client, 64 * MIB)
    await vm.write_hva(region.hva, b"\x01" * (16 * MIB))
    builder = BatchBuilder()
    for gpa in range(16 * MIB, 64 * MIB, 4096):
        builder.write(gpa, 8)
    await vcpu.run(builder.build())
    kvm = serving.kvm
    assert kvm.populated.usage == 64 * MIB and kvm.mapped.usage == 64 * MIB
    (model,) = kvm.vms()
    await vm.destroy()
    assert kvm.populated.usage == kvm.mapped.usage == 0
    assert model.host.contents == {} and model.host.regions() == []


@pytest.mark.parametrize("seed", range(4))
def test_a_batchs_allocation_bound_counts_each_page_and_table_once(seed):
    """`batch_bytes` bounds a batch by a host page per distinct page and a page table per
    distinct table of each level below the root, whatever order and repeats its accesses
    come in: a batch needing exactly the limit runs, one byte less refuses it."""
    from vmmu.server.kvm import AccessBatch, AccessKind, Kvm, KvmError, VmConfig
    rng = random.Random(seed)
    gpas = []
    for _ in range(3000):
        kind = rng.randrange(3)
        gpas.append(rng.randrange(0, 1 << 39, 8) if kind == 0 else        # anywhere
                    rng.randrange(0, 4 * MIB, 8) if kind == 1 else        # a few tables
                    rng.choice(gpas) if gpas else 0)                      # a repeat
    levels = 4                                  # the page, and a table at 4K, 2M and 1G
    need = 4096 * sum(len({gpa >> (12 + 9 * level) for gpa in gpas}) for level in range(levels))
    batch = AccessBatch.build((gpa, AccessKind.READ, 1, None) for gpa in gpas)
    for limit, refused in ((need, False), (need - 1, True)):
        vm = Kvm(Limits.from_mapping({"batch_bytes": limit})).create_vm(VmConfig())
        vcpu = vm.create_vcpu(0)
        if refused:
            with pytest.raises(KvmError) as error:
                vcpu._check_batch_limits(batch)
            assert error.value.errno == errno.E2BIG
        else:
            vcpu._check_batch_limits(batch)
