"""MMIO, read-only and memory-fault exits, and how a vCPU resumes after them."""

from __future__ import annotations

import errno

import pytest

from vmmu.server.kvm import (KVM_MEM_READONLY, AccessBatch, AccessKind, Backing, Exit,
                             ExitReason, KvmError, VcpuInfo)

MIB = 1 << 20
MMIO_GPA = 0x4000_0000            # outside the 4 MiB slot of `kvm_guest`
R, W, X = AccessKind.READ, AccessKind.WRITE, AccessKind.EXEC


def run(vcpu, *accesses):
    return vcpu.run(AccessBatch.build(accesses))


async def test_mmio_read_exits_and_the_batch_resumes_with_the_data(kvm_guest):
    vcpu = kvm_guest.vcpu
    result = await run(vcpu, (0x1000, W, 4, b"abcd"), (MMIO_GPA + 8, R, 4, b""),
                       (0x1000, R, 4, b""))
    assert result.completed == 1
    assert result.exit == Exit(ExitReason.MMIO, gpa=MMIO_GPA + 8, length=4, is_write=False)
    assert vcpu.info() == VcpuInfo(0, running=False, mmio_pending=True)
    result = await vcpu.run(mmio_data=b"wxyz")
    assert (result.completed, result.exit.reason) == (3, ExitReason.DONE)
    assert result.read_data == b"wxyz" + b"abcd"
    assert not vcpu.info().mmio_pending


async def test_mmio_write_carries_its_data_and_later_writes_keep_theirs(kvm_guest):
    vcpu = kvm_guest.vcpu
    result = await run(vcpu, (MMIO_GPA, W, 8, b"to-devic"), (0x1000, W, 8, b"to-ram!!"),
                       (0x1000, R, 8, b""))
    assert result.exit == Exit(ExitReason.MMIO, gpa=MMIO_GPA, length=8, is_write=True,
                               data=b"to-devic")
    result = await vcpu.run(mmio_data=b"")
    assert result.exit.reason is ExitReason.DONE and result.read_data == b"to-ram!!"
    assert await kvm_guest.vm.read_hva(kvm_guest.region.hva + 0x1000, 8) == b"to-ram!!"


async def test_mmio_write_without_data_reports_zeroes(kvm_guest):
    result = await run(kvm_guest.vcpu, (MMIO_GPA, W, 2, None))
    assert result.exit.data == b"\0\0" and result.exit.is_write


async def test_mmio_fetch_exits_like_a_read(kvm_guest):
    result = await run(kvm_guest.vcpu, (MMIO_GPA, X, 4, None))
    assert result.exit.reason is ExitReason.MMIO and not result.exit.is_write
    assert (await kvm_guest.vcpu.run(mmio_data=bytes(4))).exit.reason is ExitReason.DONE


async def test_the_mmio_spte_is_created_once_then_hit(kvm_guest):
    vcpu = kvm_guest.vcpu
    await run(vcpu, (MMIO_GPA, R, 4, None))
    await vcpu.run(mmio_data=bytes(4))
    first = vcpu.stats()
    assert first["pf_mmio_spte_created"] == 1 and first["pf_emulate"] == 1
    assert kvm_guest.vm.walk(MMIO_GPA)[-1].kind == "mmio"

    result = await run(vcpu, (MMIO_GPA + 0x10, W, 4, b"\1\2\3\4"))
    assert result.exit.gpa == MMIO_GPA + 0x10 and result.exit.data == b"\1\2\3\4"
    second = vcpu.stats()
    assert second["ept_misconfigs"] == first["ept_misconfigs"] + 1
    assert second["mmio_spte_hits"] == first["mmio_spte_hits"] + 1
    assert second["pf_taken"] == first["pf_taken"]
    assert second["pf_mmio_spte_created"] == 1
    assert second["mmio_exits"] == 2


async def test_gpa_beyond_the_ept_width_is_mmio_and_never_aliases(kvm_guest):
    """Bits above the 4-level root's reach must not wrap onto gpa 0x1000's mapping."""
    vcpu = kvm_guest.vcpu
    await run(vcpu, (0x1000, W, 8, b"lowpage!"))
    for _ in range(2):
        result = await run(vcpu, ((1 << 48) | 0x1000, R, 8, b""))
        assert result.exit.reason is ExitReason.MMIO and result.exit.gpa == (1 << 48) | 0x1000
        result = await vcpu.run(mmio_data=b"device!!")
        assert result.read_data == b"device!!"
    assert vcpu.stats()["pf_mmio_spte_created"] == 0          # emulated every time


async def test_write_to_a_read_only_slot_is_mmio_and_reads_work(make_guest):
    g = await make_guest(Backing.PAGE_4K, 2 * MIB, flags=KVM_MEM_READONLY)
    await g.vm.write_hva(g.region.hva + 0x2000, b"rom!")
    result = await run(g.vcpu, (0x2000, R, 4, b""), (0x2000, W, 4, b"hack"),
                       (0x2000, R, 4, b""))
    assert result.completed == 1 and result.read_data == b"rom!"
    assert result.exit == Exit(ExitReason.MMIO, gpa=0x2000, length=4, is_write=True,
                               data=b"hack")
    result = await g.vcpu.run(mmio_data=b"")
    assert result.exit.reason is ExitReason.DONE and result.read_data == b"rom!rom!"
    assert await g.vm.read_hva(g.region.hva + 0x2000, 4) == b"rom!"
    leaf = g.vm.walk(0x2000)[-1]
    assert leaf.readable and not (leaf.writable or leaf.host_writable or leaf.mmu_writable)
    assert g.vcpu.stats()["pf_mmio_spte_created"] == 0


async def test_write_to_a_read_only_host_mapping_is_a_memory_fault(make_guest):
    g = await make_guest(Backing.PAGE_4K, 2 * MIB, writable=False)
    result = await run(g.vcpu, (0x3000, R, 4, b""), (0x3000, W, 4, b"oops"))
    assert result.completed == 1
    assert result.exit.reason is ExitReason.MEMORY_FAULT
    assert (result.exit.errno, result.exit.gpa, result.exit.length, result.exit.is_write) == \
        (errno.EFAULT, 0x3000, 4, True)
    assert not g.vcpu.info().mmio_pending
    result = await run(g.vcpu, (0x3000, R, 4, b""))        # the vCPU is usable afterwards
    assert result.exit.reason is ExitReason.DONE and result.read_data == b"\0" * 4


@pytest.mark.parametrize("is_write, wrong", [(False, b"abc"), (False, b"abcde"),
                                             (False, b""), (True, b"x")])
async def test_wrong_size_mmio_completion_is_einval_and_changes_nothing(kvm_guest, is_write,
                                                                        wrong):
    vcpu = kvm_guest.vcpu
    access = (MMIO_GPA, W, 4, b"data") if is_write else (MMIO_GPA, R, 4, b"")
    first = await run(vcpu, access, (0x1000, R, 1, b""))
    before = vcpu.stats()
    with pytest.raises(KvmError) as err:
        await vcpu.run(mmio_data=wrong)
    assert err.value.errno == errno.EINVAL
    assert vcpu.stats() == before and vcpu.info().mmio_pending
    result = await vcpu.run(mmio_data=b"" if is_write else b"good")
    assert result.completed == 2 and result.exit.reason is ExitReason.DONE
    assert first.completed == 0


async def test_new_batch_while_mmio_is_pending_is_ebusy(kvm_guest):
    vcpu = kvm_guest.vcpu
    await run(vcpu, (MMIO_GPA, R, 4, b""), (0x1000, R, 4, b""))
    with pytest.raises(KvmError) as err:
        await run(vcpu, (0x1000, R, 4, b""))
    assert err.value.errno == errno.EBUSY
    result = await vcpu.run(mmio_data=b"1234")              # the old batch is still there
    assert result.completed == 2 and result.read_data == b"1234" + bytes(4)


@pytest.mark.parametrize("kwargs", [{}, {"mmio_data": b""}])
async def test_run_needs_a_batch_or_a_pending_mmio(kvm_guest, kwargs):
    with pytest.raises(KvmError) as err:
        await kvm_guest.vcpu.run(**kwargs)
    assert err.value.errno == errno.EINVAL


async def test_completed_counts_from_the_start_across_several_exits(kvm_guest):
    vcpu = kvm_guest.vcpu
    result = await run(vcpu, (0x0, R, 1, None), (MMIO_GPA, R, 1, b""), (0x8, R, 1, None),
                       (MMIO_GPA + 1, R, 1, b""), (0x10, R, 1, None))
    assert result.completed == 1
    result = await vcpu.run(mmio_data=b"a")
    assert result.completed == 3 and result.exit.gpa == MMIO_GPA + 1
    result = await vcpu.run(mmio_data=b"b")
    assert result.completed == 5 and result.read_data == b"ab"
    assert vcpu.stats()["accesses"] == 5
