"""Running vCPUs through both clients: faults, MMIO exits (unary and on the Run stream),
memory faults, and bad batches that the server rejects without changing anything."""

from __future__ import annotations

import asyncio
import errno

import pytest

from vmmu.client import (KVM_INTERNAL_ERROR_EMULATION, KVM_MEM_READONLY, Backing, Batch,
                         BatchBuilder, ExitReason, FailedPrecondition, InvalidArgument)

MiB = 1 << 20
MMIO_GPA = 0x1000_0000      # outside every memslot of `guest`


async def test_accesses_fault_in_then_hit(guest):
    vm, region, vcpu = guest
    batch = (BatchBuilder().write(0x1000, data=b"12345678").read(0x1000, 8, with_data=True)
             .read(0x3000).fetch(0x5000).build())

    result = await vcpu.run(batch)
    assert result.exit.reason is ExitReason.DONE
    assert result.completed == 4
    assert result.read_data == b"12345678"
    assert await vm.read_hva(region.hva + 0x1000, 8) == b"12345678"
    faults = (await vcpu.stats())["pf_taken"]
    assert faults >= 1
    leaf = (await vm.walk(0x1000))[-1]
    assert (leaf.kind, leaf.large, leaf.accessed, leaf.dirty) == ("leaf", True, True, True)

    again = await vcpu.run(batch)
    assert (again.exit.reason, again.completed) == (ExitReason.DONE, 4)
    assert (await vcpu.stats())["pf_taken"] == faults


async def test_mmio_read_exit_completed_by_unary_calls(guest):
    _, _, vcpu = guest
    batch = (BatchBuilder().read(0x1000, 4, with_data=True).read(MMIO_GPA, 4, with_data=True)
             .read(0x2000, 2, with_data=True).build())

    result = await vcpu.run(batch)
    assert result.completed == 1
    exit = result.exit
    assert (exit.reason, exit.gpa, exit.length, exit.is_write) == \
        (ExitReason.MMIO, MMIO_GPA, 4, False)
    assert (await vcpu.info()).mmio_pending

    with pytest.raises(FailedPrecondition) as excinfo:
        await vcpu.run(batch)
    assert excinfo.value.errno_name == "EBUSY"

    done = await vcpu.complete_mmio(b"\xaa\xbb\xcc\xdd")
    assert (done.exit.reason, done.completed) == (ExitReason.DONE, 3)
    assert done.read_data == bytes(4) + b"\xaa\xbb\xcc\xdd" + bytes(2)
    assert not (await vcpu.info()).mmio_pending


async def test_mmio_write_to_read_only_slot_over_the_stream(client):
    vm = await client.create_vm(max_vcpus=1)
    region = await vm.mmap(2 * MiB, Backing.PAGE_4K)
    await vm.set_user_memory_region(slot=0, flags=KVM_MEM_READONLY, guest_phys_addr=0,
                                    memory_size=2 * MiB, userspace_addr=region.hva)
    vcpu = await vm.create_vcpu(0)
    batch = BatchBuilder().read(0x1000, 2, with_data=True).write(0x2000, data=b"hi").build()

    async with vcpu.stream() as stream:
        first = await stream.run(batch)
        assert first.completed == 1
        assert (first.exit.reason, first.exit.gpa, first.exit.is_write, first.exit.data) == \
            (ExitReason.MMIO, 0x2000, True, b"hi")
        done = await stream.complete_mmio()
        assert (done.exit.reason, done.completed) == (ExitReason.DONE, 2)
        second = await stream.run(BatchBuilder().read(MMIO_GPA, 1, with_data=True).build())
        assert second.exit.reason is ExitReason.MMIO
        assert (await stream.complete_mmio(b"\x42")).read_data == b"\x42"
    assert await vm.read_hva(region.hva + 0x2000, 2) == b"\0\0"
    assert (await vcpu.stats())["mmio_exits"] == 2


async def test_write_to_read_only_host_mapping_is_a_memory_fault(client):
    vm = await client.create_vm(max_vcpus=1)
    region = await vm.mmap(2 * MiB, Backing.PAGE_4K, writable=False)
    await vm.set_user_memory_region(slot=0, flags=0, guest_phys_addr=0, memory_size=2 * MiB,
                                    userspace_addr=region.hva)
    vcpu = await vm.create_vcpu(0)

    result = await vcpu.run(BatchBuilder().read(0x1000).write(0x1000, data=b"x").build())
    assert result.completed == 1
    exit = result.exit
    assert (exit.reason, exit.gpa, exit.is_write, exit.errno) == \
        (ExitReason.MEMORY_FAULT, 0x1000, True, errno.EFAULT)


def _batch(gpas: list[int], ops: bytes, write_data: bytes = b"") -> Batch:
    return Batch(b"".join(g.to_bytes(8, "little") for g in gpas), ops, write_data)


READ8, WRITE8_DATA = 0x0D, 0x1E
MAX_ACCESSES = 1 << 20

BAD_BATCHES = {
    "empty": Batch(b"", b""),
    "oversized": Batch(bytes(8 * (MAX_ACCESSES + 1)), bytes([READ8]) * (MAX_ACCESSES + 1)),
    "gpas and ops disagree": _batch([0x1000, 0x2000], bytes([READ8])),
    "unknown kind": _batch([0x1000], bytes([0x0C])),
    "reserved bit": _batch([0x1000], bytes([READ8 | 0x80])),
    "crosses a page": _batch([0x1ffc], bytes([READ8])),
    "write_data too short": _batch([0x1000], bytes([WRITE8_DATA]), b"1234"),
    "valid access before a bad one": _batch([0x1000, 0x2000], bytes([WRITE8_DATA, 0x0C]),
                                            b"12345678"),
}


@pytest.mark.parametrize("name", BAD_BATCHES)
async def test_bad_batch_is_rejected_and_nothing_changes(guest, name):
    vm, region, vcpu = guest
    vm_stats, vcpu_stats = await vm.stats(), await vcpu.stats()
    walk = await vm.walk(0x1000)

    with pytest.raises(InvalidArgument) as excinfo:
        await vcpu.run(BAD_BATCHES[name])
    assert excinfo.value.errno_name == "EINVAL"

    assert await vm.stats() == vm_stats
    assert await vcpu.stats() == vcpu_stats
    assert await vm.walk(0x1000) == walk
    assert not (await vcpu.info()).mmio_pending
    assert await vm.read_hva(region.hva + 0x1000, 8) == bytes(8)


async def test_a_bad_batch_is_refused_in_its_response_and_the_stream_goes_on(guest):
    vm, _, vcpu = guest
    async with vcpu.stream() as stream:
        assert (await stream.run(BatchBuilder().read(0x1000).build())).completed == 1
        stats = await vcpu.stats()
        with pytest.raises(InvalidArgument, match="EINVAL") as excinfo:
            await stream.run(BAD_BATCHES["crosses a page"])
        assert excinfo.value.errno == errno.EINVAL
        assert await vcpu.stats() == stats
        assert (await stream.run(BatchBuilder().read(0x1000).build())).completed == 1


async def test_a_fetch_outside_every_memslot_is_an_emulation_failure(guest):
    _, _, vcpu = guest
    result = await vcpu.run(BatchBuilder().read(0x1000).fetch(MMIO_GPA, 4).build())
    exit = result.exit
    assert (result.completed, exit.reason, exit.suberror, exit.gpa, exit.length) == \
        (1, ExitReason.INTERNAL_ERROR, KVM_INTERNAL_ERROR_EMULATION, MMIO_GPA, 4)
    assert not (await vcpu.info()).mmio_pending


async def test_hlt_ends_a_step_and_resume_goes_on_over_the_stream(guest):
    _, _, vcpu = guest
    batch = BatchBuilder().write(0x1000, data=b"hi").hlt().read(0x1000, 2, with_data=True) \
        .build()
    async with vcpu.stream() as stream:
        halted = await stream.run(batch)
        assert (halted.completed, halted.exit.reason) == (2, ExitReason.HLT)
        done = await stream.resume()
        assert (done.completed, done.exit.reason, done.read_data) == \
            (3, ExitReason.DONE, b"hi")
    assert (await vcpu.stats())["halt_exits"] == 1
    with pytest.raises(InvalidArgument, match="resume"):
        await vcpu.resume()                                  # nothing left


async def test_an_hlt_with_a_gpa_is_rejected(guest):
    _, _, vcpu = guest
    hlt = BatchBuilder().hlt().build()
    with pytest.raises(InvalidArgument, match="HLT"):
        await vcpu.run(Batch((8).to_bytes(8, "little"), hlt.ops))
    assert (await vcpu.stats())["exits"] == 0
async def test_a_batch_behind_a_pending_mmio_is_refused_and_the_stream_goes_on(guest):
    vm, _, vcpu = guest
    async with vcpu.stream() as stream:
        exit_ = await stream.run(BatchBuilder().read(MMIO_GPA, 8, with_data=True).build())
        assert exit_.exit.reason is ExitReason.MMIO
        with pytest.raises(FailedPrecondition) as excinfo:
            await stream.run(BatchBuilder().read(0x1000).build())
        assert excinfo.value.errno == errno.EBUSY
        done = await stream.complete_mmio(b"abcdefgh")
        assert (done.exit.reason, done.read_data) == (ExitReason.DONE, b"abcdefgh")


async def test_a_pending_mmio_is_dropped_when_its_stream_ends(guest):
    vm, _, vcpu = guest
    async with vcpu.stream() as stream:
        exit_ = await stream.run(BatchBuilder().read(MMIO_GPA, 8, with_data=True).build())
        assert exit_.exit.reason is ExitReason.MMIO
        assert (await vcpu.info()).mmio_pending
    for _ in range(100):                        # the server sees the stream end
        if not (await vcpu.info()).mmio_pending:
            break
        await asyncio.sleep(0.01)
    assert not (await vcpu.info()).mmio_pending
    assert (await vcpu.run(BatchBuilder().read(0x1000).build())).completed == 1


async def test_a_unary_mmio_exit_stays_pending(guest):
    """RunBatch owns no stream: its MMIO waits for a completion by a later call."""
    vm, _, vcpu = guest
    exit_ = await vcpu.run(BatchBuilder().read(MMIO_GPA, 8, with_data=True).build())
    assert exit_.exit.reason is ExitReason.MMIO
    await asyncio.sleep(0.05)
    assert (await vcpu.info()).mmio_pending
