"""Private memory over the wire, with both clients: guest_memfd, REGION2's binding rules,
memory attributes, the private MEMORY_FAULT exit and hole punching; bad input refused with
a clear status, the errno in it, and nothing changed."""

from __future__ import annotations

import errno

import pytest

from vmmu.client import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, KVM_MEM_GUEST_MEMFD,
                         KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY,
                         KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_MEMORY_EXIT_FLAG_PRIVATE, Backing,
                         BatchBuilder, ExitReason, FailedPrecondition, GuestMemfd,
                         GuestMemfdBinding, InvalidArgument, ResourceExhausted)

MIB = 1 << 20
PRIVATE = KVM_MEMORY_ATTRIBUTE_PRIVATE
PUNCH = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE


async def gmem_guest(client, size=MIB):
    vm = await client.create_vm(max_vcpus=1)
    region = await vm.mmap(size, Backing.PAGE_4K)
    gmem = await vm.create_guest_memfd(size)
    await vm.set_user_memory_region(0, KVM_MEM_GUEST_MEMFD, 0, size, region.hva,
                                    guest_memfd=gmem.fd, guest_memfd_offset=0)
    return vm, region, gmem, await vm.create_vcpu(0)


async def refused(call, error=InvalidArgument, errno_name="EINVAL"):
    with pytest.raises(error) as excinfo:
        await call
    assert excinfo.value.errno_name == errno_name, excinfo.value
    return excinfo.value


async def test_private_memory_round_trip(client):
    vm, region, gmem, vcpu = await gmem_guest(client)
    assert isinstance(gmem, GuestMemfd) and (gmem.size, gmem.flags, gmem.pages) == (MIB, 0, 0)
    [slot] = await vm.memslots()
    assert (slot.flags, slot.guest_memfd, slot.guest_memfd_offset) == \
        (KVM_MEM_GUEST_MEMFD, gmem.fd, 0)
    [listed] = await vm.guest_memfds()
    assert listed.bindings == (GuestMemfdBinding(slot=0, offset=0, size=MIB),)

    await vm.write_hva(region.hva + 0x3000, b"shared!!")
    await vm.set_memory_attributes(0x3000, 0x1000, PRIVATE)
    assert await vm.private_ranges() == [(0x3000, 0x4000)]
    result = await vcpu.run(BatchBuilder().write(0x3000, data=b"private!")
                            .read(0x3000, with_data=True).build())
    assert result.exit.reason is ExitReason.DONE and result.read_data == b"private!"
    assert (await vm.guest_memfds())[0].pages == 1
    assert await vm.read_hva(region.hva + 0x3000, 8) == b"shared!!"

    await vm.guest_memfd_fallocate(gmem.fd, PUNCH, 0x3000, 0x1000)
    assert (await vm.guest_memfds())[0].pages == 0
    assert (await vm.walk(0x3000))[-1].kind != "leaf"             # unmapped by the hole
    result = await vcpu.run(BatchBuilder().read(0x3000, with_data=True).build())
    assert result.read_data == bytes(8)                            # a fresh zeroed page

    await vm.set_memory_attributes(0x3000, 0x1000, 0)
    result = await vcpu.run(BatchBuilder().read(0x3000, with_data=True).build())
    assert result.read_data == b"shared!!"


async def test_private_access_without_guest_memfd_exits_with_the_private_flag(client):
    vm = await client.create_vm(max_vcpus=1)
    region = await vm.mmap(MIB, Backing.PAGE_4K)
    await vm.set_user_memory_region(0, 0, 0, MIB, region.hva)
    vcpu = await vm.create_vcpu(0)
    await vm.set_memory_attributes(0x5000, 0x1000, PRIVATE)
    result = await vcpu.run(BatchBuilder().read(0x5008, 4).build())
    e = result.exit
    assert (e.reason, e.gpa, e.length, e.flags, e.errno) == \
        (ExitReason.MEMORY_FAULT, 0x5000, 4096, KVM_MEMORY_EXIT_FLAG_PRIVATE, errno.EFAULT)
    await vm.set_memory_attributes(0x5000, 0x1000, 0)
    assert (await vcpu.resume()).exit.reason is ExitReason.DONE


async def test_binding_rules_and_bad_input_change_nothing(client):
    vm, region, gmem, _ = await gmem_guest(client)
    hva, flags = region.hva, KVM_MEM_GUEST_MEMFD
    before = await vm.memslots()
    error = await refused(vm.set_user_memory_region(0, flags, 0, MIB, hva, gmem.fd, 0))
    assert "immutable" in error.reason                       # even the identical call
    await refused(vm.set_user_memory_region(0, flags, 2 * MIB, MIB, hva, gmem.fd, 0))
    await refused(vm.set_user_memory_region(0, 0, 0, MIB, hva))
    for bad in (flags | KVM_MEM_LOG_DIRTY_PAGES, flags | KVM_MEM_READONLY):
        await refused(vm.set_user_memory_region(1, bad, 4 * MIB, MIB, hva, gmem.fd, 0))
    other = await vm.create_guest_memfd(2 * MIB)
    await refused(vm.set_user_memory_region(1, flags, 4 * MIB, MIB, hva, other.fd, 0x800))
    await refused(vm.set_user_memory_region(1, flags, 4 * MIB, MIB, hva, other.fd, 2 * MIB))
    await refused(vm.set_user_memory_region(1, flags, 4 * MIB, MIB, hva, gmem.fd, 0))
    await refused(vm.set_user_memory_region(1, flags, 4 * MIB, MIB, hva, 77, 0),
                  errno_name="EBADF")
    assert await vm.memslots() == before
    assert [g.bindings for g in await vm.guest_memfds()] == \
        [(GuestMemfdBinding(0, 0, MIB),), ()]

    await refused(vm.create_guest_memfd(0))
    await refused(vm.create_guest_memfd(4096, flags=1))
    await refused(vm.set_memory_attributes(0, 4096, PRIVATE, flags=1))
    await refused(vm.set_memory_attributes(0, 4096, 1))
    await refused(vm.set_memory_attributes(0x800, 4096, PRIVATE))
    await refused(vm.set_memory_attributes(0, 0, PRIVATE))
    await refused(vm.guest_memfd_fallocate(gmem.fd, FALLOC_FL_PUNCH_HOLE, 0, 4096),
                  FailedPrecondition, errno.errorcode[errno.EOPNOTSUPP])
    await refused(vm.guest_memfd_fallocate(gmem.fd, PUNCH, 0x800, 4096))
    await refused(vm.guest_memfd_fallocate(99, PUNCH, 0, 4096), errno_name="EBADF")
    assert await vm.private_ranges() == []
    assert len(await vm.guest_memfds()) == 2

    await vm.set_user_memory_region(0, 0, 0, 0, 0)                 # delete works
    assert await vm.memslots() == []
    assert (await vm.guest_memfds())[0].bindings == ()


async def test_a_legacy_mmu_vm_refuses_private_memory(client):
    vm = await client.create_vm(max_vcpus=1, mmu="legacy")
    region = await vm.mmap(MIB, Backing.PAGE_4K)
    error = await refused(vm.create_guest_memfd(MIB))
    assert "TDP MMU" in error.reason
    await refused(vm.set_user_memory_region(0, KVM_MEM_GUEST_MEMFD, 0, MIB, region.hva, 1, 0))
    await refused(vm.set_memory_attributes(0, MIB, PRIVATE))
    assert await vm.memslots() == [] and await vm.guest_memfds() == []


async def test_guest_memfds_per_vm_are_limited(client):
    vm = await client.create_vm(max_vcpus=1)
    for _ in range(1024):
        await vm.create_guest_memfd(4096)
    await refused(vm.create_guest_memfd(4096), ResourceExhausted, "EMFILE")
