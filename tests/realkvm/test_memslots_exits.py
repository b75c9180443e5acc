"""vmmu against the host's real KVM beyond dirty logging: memslot validation (errno, then a
probe that nothing changed), guest exits (MMIO writes, read-only slots, host protections
and their recovery, writes straddling two pages or a page and MMIO, an instruction fetch
from a gpa without a slot) and slot changes under a guest (delete, move, two slots on one
hva, the host remapping the memory, MADV_DONTNEED).

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
from vmmu.server.kvm.vcpu import KVM_INTERNAL_ERROR_EMULATION

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


# -- accesses that straddle ------------------------------------------------------------------
# The real guest stores 8 bytes with one instruction. vmmu's accesses never cross a page (a
# batch holding one is EINVAL, docs/differences.md): what it compares is the pieces KVM
# makes of such a store, one per page, as the CPU's two translations (RAM and RAM) or the
# emulator (RAM and MMIO: `emulator_read_write_onepage` per page) make them.

VALUE = 0x1122_3344_5566_7788


async def test_a_store_straddling_two_pages_writes_both_as_on_real_kvm():
    gpa = SLOT1_GPA + 3 * PAGE - 4
    with RealVm() as real:
        real.add_slot(1, SLOT1_GPA, SIZE)
        real.store(gpa, VALUE)
        expected = bytes(real.memory(1)[3 * PAGE - 4:3 * PAGE + 4])
    vm, hva = await vmmu_guest()
    vcpu = vm.create_vcpu(0)
    with pytest.raises(KvmError) as err:
        AccessBatch.build([(gpa, AccessKind.WRITE, 8, VALUE.to_bytes(8, "little"))])
    assert err.value.errno == errno.EINVAL and "crosses a page" in str(err.value)
    data = VALUE.to_bytes(8, "little")
    result = await vcpu.run(AccessBatch.build([(gpa, AccessKind.WRITE, 4, data[:4]),
                                               (gpa + 4, AccessKind.WRITE, 4, data[4:])]))
    assert result.exit.reason is ExitReason.DONE
    assert await vm.read_hva(hva + 3 * PAGE - 4, 8) == expected == data
    await vm.destroy()


async def test_a_store_straddling_a_slot_end_and_mmio_exits_with_the_mmio_part():
    """The RAM part is written; the exit is the MMIO part alone (gpa, length, data); a
    resume completes the store."""
    gpa = SLOT1_GPA + SIZE - 4
    with RealVm() as real:
        real.add_slot(1, SLOT1_GPA, SIZE)
        with pytest.raises(GuestExit) as exit_:
            real.store(gpa, VALUE)
        assert exit_.value.reason == abi.ExitReason.MMIO
        real_mmio = real.mmio_exit()
        real_ram = bytes(real.memory(1)[SIZE - 4:])
        real.resume()
    vm, hva = await vmmu_guest()
    vcpu = vm.create_vcpu(0)
    data = VALUE.to_bytes(8, "little")
    result = await vcpu.run(AccessBatch.build([(gpa, AccessKind.WRITE, 4, data[:4]),
                                               (gpa + 4, AccessKind.WRITE, 4, data[4:])]))
    exit = result.exit
    assert exit.reason is ExitReason.MMIO and result.completed == 1
    assert (exit.gpa, exit.data, exit.is_write) == real_mmio == \
        (SLOT1_GPA + SIZE, data[4:], True)
    assert await vm.read_hva(hva + SIZE - 4, 4) == real_ram == data[:4]
    assert (await vcpu.run(mmio_data=b"")).exit.reason is ExitReason.DONE
    await vm.destroy()


# -- an instruction fetch from a gpa without a memslot ---------------------------------------

async def test_a_fetch_from_a_gpa_without_a_slot_is_an_emulation_failure_as_on_real_kvm():
    """KVM emulates the fetch, cannot read the instruction from MMIO, and KVM_RUN returns
    KVM_EXIT_INTERNAL_ERROR with suberror KVM_INTERNAL_ERROR_EMULATION. Here the real
    vCPU jumps to FREE_GPA; the same on the shadow-paging host as on a TDP one, as the
    emulator decides it, not the MMU."""
    with RealVm() as real:
        with pytest.raises(GuestExit) as exit_:
            real.run_from(FREE_GPA)
        assert exit_.value.reason == abi.ExitReason.INTERNAL_ERROR
        expected = ("internal_error", real.internal_error())
    vm, _ = await vmmu_guest()
    result = await vm.create_vcpu(0).run(AccessBatch.build([(FREE_GPA, AccessKind.EXEC, 1,
                                                             None)]))
    assert (result.exit.reason.value, result.exit.suberror) == expected == \
        ("internal_error", KVM_INTERNAL_ERROR_EMULATION)
    assert result.exit.gpa == FREE_GPA
    await vm.destroy()


# -- two slots on one hva, the host remapping, MADV_DONTNEED ---------------------------------

async def test_two_slots_on_one_hva_write_the_same_memory_as_on_real_kvm():
    alias = SLOT2_GPA
    gpas = [SLOT1_GPA + OFFSET, alias + PAGE + OFFSET, SLOT1_GPA + PAGE + 1]
    with RealVm() as real:
        real.add_slot(1, SLOT1_GPA, SIZE)
        real.alias_slot(2, alias, 1)
        expected = real_exit(real, gpas), bytes(real.memory(1)[:2 * PAGE])
    vm, hva = await vmmu_guest()
    await vm.set_user_memory_region(2, 0, alias, SIZE, hva)
    got = vmmu_exit(await write_bytes(vm, gpas)), await vm.read_hva(hva, 2 * PAGE)
    assert got == expected
    assert expected[1][OFFSET] == expected[1][PAGE + OFFSET] == OFFSET
    await vm.destroy()


async def test_madvise_dontneed_under_a_guest_zeroes_and_the_next_write_faults_in():
    """The pages go (the MMU notifier zaps the guest's mappings); the guest's next write
    lands in a fresh zeroed page, seen by the host."""
    first, second = SLOT1_GPA + OFFSET, SLOT1_GPA + PAGE + OFFSET
    with RealVm() as real:
        real.add_slot(1, SLOT1_GPA, SIZE)
        real.write_pages([first, second])
        real.madvise_dontneed(1)
        expected = [bytes(real.memory(1)[:2 * PAGE])]
        expected += [real_exit(real, [second]), bytes(real.memory(1)[:2 * PAGE])]
    vm, hva = await vmmu_guest()
    await write_bytes(vm, [first, second])
    await vm.madvise_dontneed(hva, SIZE)
    got = [await vm.read_hva(hva, 2 * PAGE)]
    got += [vmmu_exit(await write_bytes(vm, [second])), await vm.read_hva(hva, 2 * PAGE)]
    assert got == expected
    assert expected[0] == bytes(2 * PAGE) and expected[2][PAGE + OFFSET] == OFFSET
    await vm.destroy()


async def test_the_host_remapping_a_slots_memory_sends_later_writes_to_the_new_pages():
    """mmap(MAP_FIXED) over the slot's hva replaces its pages in one call; vmmu has no
    MAP_FIXED over a region, and does it as munmap then mmap at the same hva (no guest
    runs in between, so the guest sees the same)."""
    gpas = [SLOT1_GPA + OFFSET, SLOT1_GPA + 2 * PAGE + OFFSET]
    with RealVm() as real:
        real.add_slot(1, SLOT1_GPA, SIZE)
        real.write_pages(gpas[:1])
        real.remap(1)
        expected = [bytes(real.memory(1)[:3 * PAGE])]
        expected += [real_exit(real, gpas[1:]), bytes(real.memory(1)[:3 * PAGE])]
    vm, hva = await vmmu_guest()
    await write_bytes(vm, gpas[:1])
    await vm.munmap(hva, SIZE)
    assert vm.mmap(SIZE, Backing.PAGE_4K, hva=hva).hva == hva
    got = [await vm.read_hva(hva, 3 * PAGE)]
    got += [vmmu_exit(await write_bytes(vm, gpas[1:])), await vm.read_hva(hva, 3 * PAGE)]
    assert got == expected
    assert expected[0] == bytes(3 * PAGE) and expected[2][2 * PAGE + OFFSET] == OFFSET
    await vm.destroy()
