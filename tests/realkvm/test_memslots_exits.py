"""vmmu against the host's real KVM beyond dirty logging: memslot validation (errno, then a
probe that nothing changed), guest exits (MMIO writes, read-only slots, host protections
and their recovery) and slot changes under a guest (delete, move).

The host runs KVM on PVM with shadow paging: the guest here writes one byte per GPA from
64-bit CPL-3 code (benchmarks/kvmhost/guest.py), so what is compared is what a byte write
shows: the exit, its GPA and direction, the errno, the bytes in host memory. Where the
host's KVM differs from a bare-metal TDP host the test says so instead of comparing.
Runs only where /dev/kvm can be opened.
"""

from __future__ import annotations

import errno
import mmap
from array import array

import pytest

from benchmarks.kvmhost import GuestExit, KvmUnavailable, RealVm
from vmmu.kvmhost import abi
from vmmu.server.kvm import (KVM_MEM_READONLY, PROT_NONE, PROT_READ, PROT_WRITE, AccessBatch,
                             AccessKind, Backing, ExitReason, Kvm, KvmError, VmConfig,
                             make_op)

try:
    RealVm().close()
except (KvmUnavailable, OSError) as e:
    pytest.skip(f"real KVM not usable here: {e}", allow_module_level=True)

MiB = 1 << 20
PAGE = 4096
SLOT1_GPA, SLOT2_GPA, FREE_GPA = 1 << 30, (1 << 30) + 4 * MiB, 3 << 30
SIZE = 2 * MiB
TASK_SIZE_MAX = 0x7FFF_FFFF_F000
WRITE_BYTE = make_op(AccessKind.WRITE, 1, True)
OFFSET = 0x42            # the real guest writes the GPA's low byte: 0x42 at offset 0x42

# -- memslot validation: (slot, flags, gpa, size, hva) with hva as ("slot1", offset) for an
# address inside slot 1's memory, or a plain number; the same call on both.
SLOT1 = "slot1"
VALIDATION = {
    "gpa not page aligned": (3, 0, FREE_GPA + 0x10, SIZE, (SLOT1, 0)),
    "size not page aligned": (3, 0, FREE_GPA, SIZE + 0x800, (SLOT1, 0)),
    "hva not page aligned": (3, 0, FREE_GPA, SIZE, (SLOT1, 8)),
    "slot id KVM_USER_MEM_SLOTS": (32764, 0, FREE_GPA, SIZE, (SLOT1, 0)),
    "unknown flag": (3, 1 << 7, FREE_GPA, SIZE, (SLOT1, 0)),
    "GUEST_MEMFD on the v1 call": (3, 1 << 2, FREE_GPA, SIZE, (SLOT1, 0)),
    "overlaps slot 1": (3, 0, SLOT1_GPA + MiB, SIZE, (SLOT1, 0)),
    "hva range ends at TASK_SIZE_MAX": (3, 0, FREE_GPA, SIZE, TASK_SIZE_MAX - SIZE),
    "hva range ends a page above TASK_SIZE_MAX": (3, 0, FREE_GPA, SIZE,
                                                  TASK_SIZE_MAX - SIZE + PAGE),
    "delete of a missing slot": (9, 0, 0, 0, 0),
    "resize slot 1": (1, 0, SLOT1_GPA, 2 * SIZE, (SLOT1, 0)),
    "change slot 1's hva": (1, 0, SLOT1_GPA, SIZE, (SLOT1, PAGE)),
    "make slot 1 read-only": (1, KVM_MEM_READONLY, SLOT1_GPA, SIZE, (SLOT1, 0)),
    "move slot 2 onto slot 1": (2, 0, SLOT1_GPA, SIZE, ("slot2", 0)),
    "gpa + size wraps": (3, 0, (1 << 64) - PAGE, 2 * PAGE, (SLOT1, 0)),
    "identical re-set of slot 1": (1, 0, SLOT1_GPA, SIZE, (SLOT1, 0)),
}


def _hva(spec, hvas: dict[str, int]) -> int:
    return hvas[spec[0]] + spec[1] if isinstance(spec, tuple) else spec


def real_outcome(args) -> tuple[str, bool]:
    """On real KVM: the errno name ("ok") of the call, and whether slot 1 still takes a
    guest write afterwards."""
    slot, flags, gpa, size, hva = args
    with RealVm() as vm:
        vm.add_slot(1, SLOT1_GPA, SIZE)
        vm.add_slot(2, SLOT2_GPA, SIZE)
        hvas = {SLOT1: vm.slot(1).hva, "slot2": vm.slot(2).hva}
        try:
            vm.set_user_memory_region(slot, flags, gpa, size, _hva(hva, hvas))
            outcome = "ok"
        except OSError as e:
            outcome = errno.errorcode[e.errno]
        vm.write_pages([SLOT1_GPA + OFFSET])
        return outcome, vm.memory(1)[OFFSET] == OFFSET


async def vmmu_outcome(args) -> tuple[str, bool]:
    slot, flags, gpa, size, hva = args
    vm = Kvm().create_vm(VmConfig())
    try:
        hvas = {}
        for name, id_, at in ((SLOT1, 1, SLOT1_GPA), ("slot2", 2, SLOT2_GPA)):
            hvas[name] = vm.mmap(SIZE, Backing.PAGE_4K).hva
            await vm.set_user_memory_region(id_, 0, at, SIZE, hvas[name])
        before = vm.memslots()
        try:
            await vm.set_user_memory_region(slot, flags, gpa, size, _hva(hva, hvas))
            outcome = "ok"
        except KvmError as e:
            outcome = errno.errorcode[e.errno]
            assert vm.memslots() == before                  # a rejected call changes nothing
        result = await write_bytes(vm, [SLOT1_GPA + OFFSET])
        assert result.exit.reason is ExitReason.DONE
        return outcome, await vm.read_hva(hvas[SLOT1] + OFFSET, 1) == bytes([OFFSET])
    finally:
        await vm.destroy()


async def write_bytes(vm, gpas, vcpu=None):
    """What the real guest's `list` entry does: one byte, the GPA's low byte, per GPA."""
    vcpu = vcpu or (vm.vcpus()[0] if vm.vcpus() else vm.create_vcpu(0))
    batch = AccessBatch.from_wire(array("Q", gpas).tobytes(), bytes([WRITE_BYTE]) * len(gpas),
                                  bytes(gpa & 0xFF for gpa in gpas))
    return await vcpu.run(batch)


@pytest.mark.parametrize("name", VALIDATION)
async def test_memslot_validation_matches_real_kvm(name):
    assert await vmmu_outcome(VALIDATION[name]) == real_outcome(VALIDATION[name])


# -- exits -----------------------------------------------------------------------------------

def real_exit(vm: RealVm, gpas) -> tuple[str, int]:
    """The exit of the real guest writing `gpas`: ("done", 0), ("mmio", gpa) or the errno."""
    try:
        vm.write_pages(gpas)
        return "done", 0
    except GuestExit as e:
        assert e.reason == abi.ExitReason.MMIO, e
        return "mmio", vm._run.exit.mmio.phys_addr
    except OSError as e:
        return errno.errorcode[e.errno], 0


def vmmu_exit(result) -> tuple[str, int]:
    exit = result.exit
    if exit.reason is ExitReason.DONE:
        return "done", 0
    if exit.reason is ExitReason.MMIO:
        assert exit.is_write and exit.length == 1
        return "mmio", exit.gpa
    assert exit.reason is ExitReason.MEMORY_FAULT, exit
    return errno.errorcode[exit.errno], 0


async def vmmu_guest(flags: int = 0):
    vm = Kvm().create_vm(VmConfig())
    region = vm.mmap(SIZE, Backing.PAGE_4K)
    await vm.set_user_memory_region(1, flags, SLOT1_GPA, SIZE, region.hva)
    return vm, region.hva


async def test_a_write_outside_every_memslot_is_an_mmio_exit_as_on_real_kvm():
    gpa = FREE_GPA + OFFSET
    with RealVm() as real:
        real.add_slot(1, SLOT1_GPA, SIZE)
        expected = real_exit(real, [SLOT1_GPA + OFFSET, gpa])
    vm, _ = await vmmu_guest()
    assert vmmu_exit(await write_bytes(vm, [SLOT1_GPA + OFFSET, gpa])) == expected == \
        ("mmio", gpa)
    await vm.destroy()


async def test_a_write_to_a_read_only_slot_is_an_mmio_exit_as_on_real_kvm():
    gpa = SLOT1_GPA + 3 * PAGE + OFFSET
    with RealVm() as real:
        real.add_slot(1, SLOT1_GPA, SIZE, KVM_MEM_READONLY)
        expected = real_exit(real, [gpa])
        unchanged = real.memory(1)[3 * PAGE + OFFSET] == 0
    vm, hva = await vmmu_guest(KVM_MEM_READONLY)
    assert vmmu_exit(await write_bytes(vm, [gpa])) == expected == ("mmio", gpa)
    assert unchanged and await vm.read_hva(hva + 3 * PAGE + OFFSET, 1) == b"\0"
    await vm.destroy()


@pytest.mark.parametrize("prot", [PROT_NONE, PROT_READ], ids=["prot_none", "read_only"])
async def test_a_host_protection_faults_until_fixed_as_on_real_kvm(prot):
    """KVM_RUN's EFAULT (vmmu: a MEMORY_FAULT exit), then, once the host restores the
    mapping, KVM_RUN again executes the write that faulted."""
    gpa = SLOT1_GPA + 5 * PAGE + OFFSET
    with RealVm() as real:
        real.add_slot(1, SLOT1_GPA, SIZE)
        real.write_pages([SLOT1_GPA + OFFSET])             # mapped before, zapped by mprotect
        real.mprotect(1, prot)
        faulted = real_exit(real, [gpa])
        real.mprotect(1, mmap.PROT_READ | mmap.PROT_WRITE)
        real.resume()
        real_byte = real.memory(1)[5 * PAGE + OFFSET]
    vm, hva = await vmmu_guest()
    await write_bytes(vm, [SLOT1_GPA + OFFSET])
    await vm.mprotect(hva, SIZE, prot)
    assert vmmu_exit(await write_bytes(vm, [gpa])) == faulted == ("EFAULT", 0)
    await vm.mprotect(hva, SIZE, PROT_READ | PROT_WRITE)
    result = await vm.vcpus()[0].run()                      # KVM_RUN again
    assert result.exit.reason is ExitReason.DONE
    assert (await vm.read_hva(hva + 5 * PAGE + OFFSET, 1))[0] == real_byte == OFFSET
    await vm.destroy()


# -- slot changes under a guest --------------------------------------------------------------

async def test_a_deleted_slot_is_mmio_and_a_moved_one_answers_at_its_new_gpa():
    old, new = SLOT1_GPA + OFFSET, FREE_GPA + PAGE + OFFSET
    with RealVm() as real:
        real.add_slot(1, SLOT1_GPA, SIZE)
        real.add_slot(2, SLOT2_GPA, SIZE)
        expected = [real_exit(real, [old, SLOT2_GPA + OFFSET])]
        real.move_slot(1, FREE_GPA)
        expected += [real_exit(real, [old]), real_exit(real, [new])]
        moved_byte = real.memory(1)[PAGE + OFFSET]
        real.delete_slot(2)
        expected.append(real_exit(real, [SLOT2_GPA + OFFSET]))
    vm, hva = await vmmu_guest()
    await vm.set_user_memory_region(2, 0, SLOT2_GPA, SIZE, vm.mmap(SIZE, Backing.PAGE_4K).hva)
    got = [vmmu_exit(await write_bytes(vm, [old, SLOT2_GPA + OFFSET]))]
    await vm.set_user_memory_region(1, 0, FREE_GPA, SIZE, hva)
    got.append(vmmu_exit(await write_bytes(vm, [old])))
    await vm.vcpus()[0].run(mmio_data=b"")
    got.append(vmmu_exit(await write_bytes(vm, [new])))
    await vm.set_user_memory_region(2, 0, 0, 0, 0)
    got.append(vmmu_exit(await write_bytes(vm, [SLOT2_GPA + OFFSET])))
    assert got == expected == [("done", 0), ("mmio", old), ("done", 0),
                               ("mmio", SLOT2_GPA + OFFSET)]
    assert (await vm.read_hva(hva + PAGE + OFFSET, 1))[0] == moved_byte == OFFSET
    await vm.destroy()
