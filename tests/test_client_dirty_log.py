"""Dirty logging over the wire, with both clients: the VM options, the bitmap (get and
clear), dirty rings (harvest and reset), and bad input refused with a clear status and no
change."""

from __future__ import annotations

import pytest

from vmmu.client import (KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP,
                         KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_MEM_LOG_DIRTY_PAGES, Backing,
                         BatchBuilder, DirtyGfn, ExitReason, FailedPrecondition,
                         InvalidArgument, NotFound, ResourceExhausted)

PAGE = 4096
PAGES = 128
SIZE = PAGES * PAGE


def bits(bitmap: bytes) -> set[int]:
    return {8 * i + b for i, byte in enumerate(bitmap) for b in range(8) if byte >> b & 1}


def bitmap_of(offsets, num_pages: int) -> bytes:
    return sum(1 << o for o in offsets).to_bytes(8 * ((num_pages + 63) // 64), "little")


async def logging_guest(client, **config):
    """PAGES pages mapped writable by a first read, then dirty logging on for slot 0."""
    vm = await client.create_vm(max_vcpus=2, **config)
    region = await vm.mmap(SIZE, Backing.PAGE_4K)
    await vm.set_user_memory_region(slot=0, flags=0, guest_phys_addr=0, memory_size=SIZE,
                                    userspace_addr=region.hva)
    vcpu = await vm.create_vcpu(0)
    reads = BatchBuilder()
    for gfn in range(PAGES):
        reads.read(gfn * PAGE)
    await vcpu.run(reads.build())
    await vm.set_user_memory_region(slot=0, flags=KVM_MEM_LOG_DIRTY_PAGES, guest_phys_addr=0,
                                    memory_size=SIZE, userspace_addr=region.hva)
    return vm, vcpu


async def write(vcpu, *gfns):
    batch = BatchBuilder()
    for gfn in gfns:
        batch.write(gfn * PAGE, 8)
    result = await vcpu.run(batch.build())
    assert result.exit.reason is ExitReason.DONE


async def test_the_dirty_log_options_are_part_of_the_vm_config(client):
    vm = await client.create_vm(eager_page_split=False, manual_dirty_log_protect=3,
                                dirty_ring_size=8192, dirty_ring_with_bitmap=True)
    config = (await vm.info()).config
    assert (config.eager_page_split, config.manual_dirty_log_protect, config.dirty_ring_size,
            config.dirty_ring_with_bitmap) == (False, 3, 8192, True)
    config = (await (await client.create_vm()).info()).config
    assert (config.eager_page_split, config.manual_dirty_log_protect, config.dirty_ring_size,
            config.dirty_ring_with_bitmap) == (True, 0, 0, False)


@pytest.mark.parametrize("config, error, errno_name", [
    ({"dirty_ring_size": 2048}, InvalidArgument, "EINVAL"),
    ({"dirty_ring_size": 2 << 20}, ResourceExhausted, "E2BIG"),
    ({"dirty_ring_with_bitmap": True}, InvalidArgument, "EINVAL"),
    ({"manual_dirty_log_protect": 2}, InvalidArgument, "EINVAL"),
])
async def test_bad_dirty_log_options_are_refused(client, config, error, errno_name):
    before = len(await client.list_vms())
    with pytest.raises(error) as excinfo:
        await client.create_vm(**config)
    assert excinfo.value.errno_name == errno_name
    assert len(await client.list_vms()) == before


async def test_get_dirty_log_reports_and_clears(client):
    vm, vcpu = await logging_guest(client)
    await write(vcpu, 1, 5, 100)
    flushes = (await vm.stats())["remote_tlb_flush_requests"]
    bitmap = await vm.get_dirty_log(0)
    assert len(bitmap) == PAGES // 8 and bits(bitmap) == {1, 5, 100}
    assert not (await vm.walk(5 * PAGE))[-1].writable
    assert (await vm.stats())["remote_tlb_flush_requests"] == flushes + 1
    assert bits(await vm.get_dirty_log(0)) == set()


async def test_manual_protect_get_keeps_and_clear_clears(client):
    vm, vcpu = await logging_guest(client, manual_dirty_log_protect=1)
    await write(vcpu, 2, 3, 70)
    assert bits(await vm.get_dirty_log(0)) == {2, 3, 70}
    assert await vm.clear_dirty_log(0, 0, 64, bitmap_of({3, 4}, 64)) == 1
    assert bits(await vm.get_dirty_log(0)) == {2, 70}


@pytest.mark.parametrize("slot, first_page, num_pages, size, error, errno_name", [
    (0, 1, 64, 8, InvalidArgument, "EINVAL"),           # first_page not 64-aligned
    (0, 0, 100, 16, InvalidArgument, "EINVAL"),         # short of the end, not 64-aligned
    (0, 64, 128, 16, InvalidArgument, "EINVAL"),        # past the end
    (0, 0, 64, 4, InvalidArgument, "EINVAL"),           # bitmap too short
    (7, 0, 64, 8, NotFound, "ENOENT"),
    (32764, 0, 64, 8, InvalidArgument, "EINVAL"),
])
async def test_bad_clears_are_refused_and_change_nothing(client, slot, first_page, num_pages,
                                                         size, error, errno_name):
    vm, vcpu = await logging_guest(client, manual_dirty_log_protect=1)
    await write(vcpu, 0, 64)
    with pytest.raises(error) as excinfo:
        await vm.clear_dirty_log(slot, first_page, num_pages, b"\xff" * size)
    assert excinfo.value.errno_name == errno_name
    assert bits(await vm.get_dirty_log(0)) == {0, 64}


async def test_a_dirty_ring_is_harvested_and_reset(client):
    vm, vcpu = await logging_guest(client, dirty_ring_size=4096)
    await write(vcpu, 9, 4)
    assert await vm.harvest_dirty_ring(0) == [DirtyGfn(slot=0, offset=9),
                                              DirtyGfn(slot=0, offset=4)]
    assert await vm.harvest_dirty_ring(0) == []
    assert await vm.reset_dirty_rings() == 2
    assert not (await vm.walk(9 * PAGE))[-1].writable
    with pytest.raises(FailedPrecondition) as excinfo:
        await vm.get_dirty_log(0)
    assert excinfo.value.errno_name == "ENXIO"
    with pytest.raises(NotFound):
        await vm.harvest_dirty_ring(1)


async def test_ring_calls_on_a_vm_without_rings_are_refused(client):
    vm, _ = await logging_guest(client)
    with pytest.raises(InvalidArgument):
        await vm.harvest_dirty_ring(0)
    with pytest.raises(InvalidArgument):
        await vm.reset_dirty_rings()
    with pytest.raises(NotFound):
        await vm.get_dirty_log(3)


async def test_enable_cap_on_a_live_vm(client):
    vm, vcpu = await logging_guest(client)
    await vcpu.run(BatchBuilder().write(3 * PAGE).build())
    await vm.enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, [1])
    assert (await vm.info()).config.manual_dirty_log_protect == 1
    assert bits(await vm.get_dirty_log(0)) == {3}
    assert bits(await vm.get_dirty_log(0)) == {3}           # manual protect: not cleared
    for cap, args, flags in ((KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, [2], 0),
                             (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, [1], 1),
                             (KVM_CAP_DIRTY_LOG_RING, [4096], 0),      # a vCPU exists
                             (KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP, [], 0),
                             (4242, [], 0)):
        with pytest.raises(InvalidArgument, match="EINVAL"):
            await vm.enable_cap(cap, args, flags)
    config = (await vm.info()).config
    assert (config.manual_dirty_log_protect, config.dirty_ring_size) == (1, 0)


async def test_a_dirty_ring_enabled_before_the_first_vcpu(client):
    vm = await client.create_vm(max_vcpus=1)
    with pytest.raises(ResourceExhausted, match="E2BIG"):
        await vm.enable_cap(KVM_CAP_DIRTY_LOG_RING, [2 << 20])
    await vm.enable_cap(KVM_CAP_DIRTY_LOG_RING, [4096])
    region = await vm.mmap(SIZE, Backing.PAGE_4K)
    await vm.set_user_memory_region(slot=0, flags=KVM_MEM_LOG_DIRTY_PAGES, guest_phys_addr=0,
                                    memory_size=SIZE, userspace_addr=region.hva)
    vcpu = await vm.create_vcpu(0)
    await vcpu.run(BatchBuilder().write(5 * PAGE).build())
    assert await vm.harvest_dirty_ring(0) == [DirtyGfn(slot=0, offset=5)]
