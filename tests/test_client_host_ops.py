"""The host mm's operations and aging through both clients, against a real server."""

from __future__ import annotations

import errno

import grpc
import pytest

from vmmu.client import (BatchBuilder, ExitReason, FailedPrecondition, InvalidArgument, NotFound,
                         Protection, ResourceExhausted)
from vmmu.v1 import host_memory_pb2, host_memory_pb2_grpc, vm_pb2, vm_pb2_grpc

MiB = 1 << 20
PAGE = 4096


async def write(vcpu, gpa: int, data: bytes) -> None:
    result = await vcpu.run(BatchBuilder().write(gpa, data=data).build())
    assert result.exit.reason is ExitReason.DONE


async def read(vcpu, gpa: int) -> bytes:
    result = await vcpu.run(BatchBuilder().read(gpa, 8, with_data=True).build())
    assert result.exit.reason is ExitReason.DONE
    return result.read_data


async def leaf(vm, gpa: int):
    spte = (await vm.walk(gpa))[-1]
    assert spte.kind == "leaf"
    return spte


async def test_dontneed_migrate_and_swap(guest):
    vm, region, vcpu = guest
    await write(vcpu, 0x1000, b"migrate!")
    await write(vcpu, 0x201000, b"swapped!")
    await write(vcpu, 0x3000, b"dropped!")
    huge = await leaf(vm, 0x1000)
    seq = (await vm.stats())["mmu_invalidate_seq"]

    assert await vm.migrate_pages(region.hva + 0x1000, PAGE) == 512
    assert await vm.swap_out(region.hva + 0x201000, PAGE) == 1
    await vm.madvise_dontneed(region.hva + 0x3000, PAGE)

    stats = await vm.stats()
    assert stats["mmu_invalidate_seq"] == seq + 3 and stats["pages_2m"] == 0
    assert await read(vcpu, 0x1000) == b"migrate!"
    assert await read(vcpu, 0x201000) == b"swapped!"
    assert await read(vcpu, 0x3000) == bytes(8)
    assert (await leaf(vm, 0x1000)).pfn != huge.pfn


async def test_madvise_populate_write(guest):
    vm, region, vcpu = guest
    await write(vcpu, 0x201000, b"swapped!")
    assert await vm.swap_out(region.hva + 0x201000, PAGE) == 1   # the THP is split
    seq = (await vm.stats())["mmu_invalidate_seq"]

    assert await vm.madvise_populate_write(region.hva + 0x1000, PAGE) == 512   # a THP
    assert await vm.madvise_populate_write(region.hva, 4 * MiB) == 1          # swapped in

    assert (await vm.host_regions())[0].populated_4k_pages == 1024
    assert (await vm.stats())["mmu_invalidate_seq"] == seq      # faults take nothing away
    assert await vm.read_hva(region.hva + 0x1000, 8) == bytes(8)
    assert await read(vcpu, 0x201000) == b"swapped!"
    await write(vcpu, 0x1000, b"guest!!!")
    assert (await leaf(vm, 0x1000)).level == 2                  # populated as a THP
    assert await vm.read_hva(region.hva + 0x1000, 8) == b"guest!!!"

    await vm.mprotect(region.hva + 0x3000, PAGE, Protection.READ)
    with pytest.raises(InvalidArgument, match="EINVAL"):
        await vm.madvise_populate_write(region.hva, 2 * MiB)
    with pytest.raises(InvalidArgument, match="EINVAL"):
        await vm.madvise_populate_write(region.hva + 0x400, PAGE)
    with pytest.raises(ResourceExhausted, match="ENOMEM"):
        await vm.madvise_populate_write(region.hva + 4 * MiB - PAGE, 2 * PAGE)


async def test_mprotect(guest):
    vm, region, vcpu = guest
    await write(vcpu, 0x1000, b"readonly")
    await vm.mprotect(region.hva + 0x1000, PAGE, Protection.READ)
    assert not (await vm.host_regions())[0].writable

    result = await vcpu.run(BatchBuilder().write(0x1000, data=b"denied!!").build())
    assert result.exit.reason is ExitReason.MEMORY_FAULT
    assert result.exit.errno == errno.EFAULT
    assert await read(vcpu, 0x1000) == b"readonly"
    spte = await leaf(vm, 0x1000)
    assert not (spte.writable or spte.host_writable)

    await vm.mprotect(region.hva + 0x1000, PAGE, Protection.READ_WRITE)
    await write(vcpu, 0x1000, b"writable")


async def test_prot_none_faults_the_guest_until_the_host_restores_it(guest):
    vm, region, vcpu = guest
    await write(vcpu, 0x1000, b"hidden!!")
    await vm.mprotect(region.hva + 0x1000, PAGE, Protection.NONE)
    batch = BatchBuilder().read(0x2000, 8).read(0x1000, 8, with_data=True).hlt().build()
    result = await vcpu.run(batch)
    assert (result.completed, result.exit.reason, result.exit.errno, result.exit.gpa) == \
        (1, ExitReason.MEMORY_FAULT, errno.EFAULT, 0x1000)
    with pytest.raises(InvalidArgument, match="EFAULT"):
        await vm.read_hva(region.hva + 0x1000, 8)             # the VMM cannot read it either
    await vm.mprotect(region.hva + 0x1000, PAGE, Protection.READ)
    result = await vcpu.resume()                              # the access is retried
    assert (result.completed, result.exit.reason, result.read_data) == \
        (3, ExitReason.HLT, b"hidden!!")


async def test_mprotect_without_a_protection_is_rejected_and_changes_nothing(server, guest):
    vm, region, vcpu = guest
    await write(vcpu, 0x1000, b"writable")
    seq = (await vm.stats())["mmu_invalidate_seq"]
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = host_memory_pb2_grpc.HostMemoryServiceStub(channel)
        for protection in (0, 99):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Mprotect(host_memory_pb2.MprotectRequest(
                    vm_id=vm.id, hva=region.hva, size=PAGE, protection=protection))
            assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "protection" in e.value.details()
    assert (await vm.stats())["mmu_invalidate_seq"] == seq
    await write(vcpu, 0x1000, b"stillrw!")


async def test_ksm_merge_and_copy_on_write(guest):
    vm, region, vcpu = guest
    await write(vcpu, 0x1000, b"twins...")
    await write(vcpu, 0x2000, b"twins...")
    assert await vm.ksm_merge([region.hva + 0x1000, region.hva + 0x2000]) == 1
    assert await read(vcpu, 0x1000) == await read(vcpu, 0x2000) == b"twins..."
    shared = (await leaf(vm, 0x1000)).pfn
    assert (await leaf(vm, 0x2000)).pfn == shared and not (await leaf(vm, 0x2000)).writable

    await write(vcpu, 0x2000, b"mine....")
    assert await read(vcpu, 0x2000) == b"mine...." and await read(vcpu, 0x1000) == b"twins..."
    assert (await leaf(vm, 0x2000)).pfn != shared == (await leaf(vm, 0x1000)).pfn


async def test_thp_split_and_collapse(guest):
    vm, region, vcpu = guest
    await write(vcpu, 0x5000, b"thp data")
    assert (await leaf(vm, 0x5000)).level == 2
    await vm.thp_split(region.hva + 0x5000)
    assert await read(vcpu, 0x5000) == b"thp data" and (await leaf(vm, 0x5000)).level == 1

    await vm.thp_collapse(region.hva)
    assert await read(vcpu, 0x5000) == b"thp data" and (await leaf(vm, 0x5000)).level == 2


async def test_aging(guest):
    vm, region, vcpu = guest
    hva = region.hva
    assert await vm.young_bitmap(hva, hva + 4 * MiB) == bytes(128)
    await write(vcpu, 0x200000, b"young...")
    assert await vm.test_young(hva + 0x200000)
    assert await vm.young_bitmap(hva + 0x1FF000, hva + 0x201001) == b"\x06"

    assert await vm.clear_young(hva, hva + 4 * MiB)
    assert not await vm.test_young(hva + 0x200000)
    assert not await vm.clear_flush_young(hva, hva + 4 * MiB)
    assert not (await leaf(vm, 0x200000)).accessed


async def test_bad_requests(client, guest):
    vm, region, _ = guest
    hva = region.hva
    for call in (lambda: vm.madvise_dontneed(hva + 1, PAGE), lambda: vm.swap_out(hva, 0),
                 lambda: vm.migrate_pages(hva + 4 * MiB, PAGE),
                 lambda: vm.mprotect(hva, 5 * MiB, Protection.READ),
                 lambda: vm.ksm_merge([hva]), lambda: vm.thp_split(hva),
                 lambda: vm.clear_young(hva + PAGE, hva)):
        with pytest.raises(InvalidArgument, match="EINVAL"):
            await call()
    with pytest.raises(FailedPrecondition, match="EBUSY"):
        await vm.thp_collapse(hva)
    ghost = client.vm(4242)
    for call in (lambda: ghost.madvise_dontneed(hva, PAGE), lambda: ghost.test_young(hva),
                 lambda: ghost.clear_young(hva, hva + PAGE)):
        with pytest.raises(NotFound, match="ENOENT"):
            await call()
    assert (await vm.stats())["mmu_invalidate_seq"] == 0


def test_madvise_needs_an_advice(server):
    with grpc.insecure_channel(server.address) as channel:
        config = vm_pb2.VmConfig(max_vcpus=1, tdp_levels=4)
        vm_id = vm_pb2_grpc.VmServiceStub(channel).CreateVm(
            vm_pb2.CreateVmRequest(config=config)).vm.id
        stub = host_memory_pb2_grpc.HostMemoryServiceStub(channel)
        with pytest.raises(grpc.RpcError) as excinfo:
            stub.Madvise(host_memory_pb2.MadviseRequest(vm_id=vm_id, hva=0x1000, size=PAGE))
    assert excinfo.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "ADVICE_UNSPECIFIED" in excinfo.value.details()
