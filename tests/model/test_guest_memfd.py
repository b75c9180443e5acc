"""guest_memfd, KVM_SET_USER_MEMORY_REGION2's binding rules, memory attributes, and the
invalidations both cause (KVM's guest_memfd.c and kvm_vm_set_mem_attributes)."""

from __future__ import annotations

import asyncio
import errno

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmmu.server.kvm import (AccessBatch, AccessKind, Backing, ExitReason, KvmError, Kvm,
                             VmConfig)
from vmmu.server.kvm.guest_memfd import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE,
                                         KVM_MEMORY_EXIT_FLAG_PRIVATE)
from vmmu.server.kvm.mem_attributes import KVM_MEMORY_ATTRIBUTE_PRIVATE, MemoryAttributes
from vmmu.server.kvm.memslots import (KVM_MEM_GUEST_MEMFD, KVM_MEM_LOG_DIRTY_PAGES,
                                      KVM_MEM_READONLY)

R, W = AccessKind.READ, AccessKind.WRITE
MIB = 1 << 20
PRIVATE = KVM_MEMORY_ATTRIBUTE_PRIVATE
PUNCH = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE


def make_vm(**config):
    return Kvm().create_vm(VmConfig(name="gmem", sanitizers=True, **config))


async def gmem_guest(size=4 * MIB, backing=Backing.PAGE_4K, **config):
    """A VM whose slot 0 maps [0, size) onto a host region and onto guest_memfd [0, size)."""
    vm = make_vm(**config)
    region = vm.mmap(size, backing)
    fd = vm.create_guest_memfd(size).fd
    await vm.set_user_memory_region(0, KVM_MEM_GUEST_MEMFD, 0, size, region.hva, fd, 0)
    return vm, vm.create_vcpu(0), region, fd


async def run(vcpu, *accesses):
    return await vcpu.run(AccessBatch.build(accesses))


async def guest_read(vcpu, gpa, size=8) -> bytes:
    result = await run(vcpu, (gpa, R, size, b""))
    assert result.exit.reason is ExitReason.DONE, result.exit
    return result.read_data


async def guest_write(vcpu, gpa, data: bytes) -> None:
    result = await run(vcpu, (gpa, W, len(data), data))
    assert result.exit.reason is ExitReason.DONE, result.exit


def leaf(vm, gpa):
    path = vm.walk(gpa)
    return path[-1] if path and path[-1].kind == "leaf" else None


async def settle():
    for _ in range(8):
        await asyncio.sleep(0)


async def rejected(call, code=errno.EINVAL) -> str:
    with pytest.raises(KvmError) as err:
        await call
    assert err.value.errno == code, err.value
    return err.value.reason


# -- KVM_CREATE_GUEST_MEMFD and the binding rules of KVM_SET_USER_MEMORY_REGION2 --------


async def test_create_checks_size_and_flags():
    vm = make_vm()
    for size, flags in ((0, 0), (4097, 0), (-4096, 0), (4096, 1)):
        with pytest.raises(KvmError) as err:
            vm.create_guest_memfd(size, flags)
        assert err.value.errno == errno.EINVAL
    assert vm.guest_memfds() == []
    fd = vm.create_guest_memfd(8192).fd
    assert fd == 3                          # after the standard streams
    [info] = vm.guest_memfds()
    assert (info.fd, info.size, info.flags, info.pages, info.bindings) == (fd, 8192, 0, 0, ())


async def test_a_guest_memfd_slot_is_immutable_but_can_be_deleted():
    vm, _, region, fd = await gmem_guest(MIB)
    before = vm.memslots()
    assert before[0].guest_memfd == fd and before[0].guest_memfd_offset == 0
    flags = KVM_MEM_GUEST_MEMFD
    # The identical call, a move, a flag change, a flag dropped: all EINVAL.
    for call in ((0, flags, 0, MIB, region.hva, fd, 0),
                 (0, flags, 16 * MIB, MIB, region.hva, fd, 0),
                 (0, 0, 0, MIB, region.hva),
                 (0, KVM_MEM_LOG_DIRTY_PAGES, 0, MIB, region.hva)):
        await rejected(vm.set_user_memory_region(*call))
    assert vm.memslots() == before
    # An existing slot without the flag cannot gain it either.
    other = vm.mmap(MIB, Backing.PAGE_4K)
    await vm.set_user_memory_region(1, 0, 8 * MIB, MIB, other.hva)
    fd2 = vm.create_guest_memfd(MIB).fd
    await rejected(vm.set_user_memory_region(1, flags, 8 * MIB, MIB, other.hva, fd2, 0))
    await vm.set_user_memory_region(0, 0, 0, 0, 0)                  # delete works
    assert [s.id for s in vm.memslots()] == [1]
    assert vm.guest_memfds()[0].bindings == ()                       # and unbinds
    await vm.set_user_memory_region(0, flags, 0, MIB, region.hva, fd, 0)  # bind again


async def test_binding_rules():
    vm = make_vm()
    region = vm.mmap(4 * MIB, Backing.PAGE_4K)
    fd = vm.create_guest_memfd(2 * MIB).fd
    flags, hva = KVM_MEM_GUEST_MEMFD, region.hva
    await vm.set_user_memory_region(0, flags, 0, MIB, hva, fd, MIB)
    cases = [
        ((1, flags, 2 * MIB, MIB, hva, fd, MIB // 2), errno.EINVAL),    # overlaps slot 0's
        ((1, flags, 2 * MIB, MIB, hva, fd, 2 * MIB), errno.EINVAL),     # past the end
        ((1, flags, 2 * MIB, MIB, hva, fd, 0x800), errno.EINVAL),       # not page aligned
        ((1, flags | KVM_MEM_LOG_DIRTY_PAGES, 2 * MIB, MIB, hva, fd, 0), errno.EINVAL),
        ((1, flags | KVM_MEM_READONLY, 2 * MIB, MIB, hva, fd, 0), errno.EINVAL),
        ((1, flags, 2 * MIB, MIB, hva, 99, 0), errno.EBADF),           # no such fd
        ((1, flags, 2 * MIB, MIB, hva, 0, 0), errno.EINVAL),           # stdin: no guest_memfd
        ((1, flags, 2 * MIB, MIB, hva, fd, (1 << 64) - 4096), errno.EINVAL),   # wraps
        ((1, flags, MIB // 2, MIB, hva, fd, 0), errno.EEXIST),          # gpa overlap first
    ]
    for call, code in cases:
        await rejected(vm.set_user_memory_region(*call), code)
    assert [(s.id, s.guest_memfd_offset) for s in vm.memslots()] == [(0, MIB)]
    assert len(vm.guest_memfds()[0].bindings) == 1
    # Without the flag the guest_memfd fields are ignored, whatever they hold.
    await vm.set_user_memory_region(1, 0, 2 * MIB, MIB, hva, 99, 0x123)
    assert vm.memslots()[1].guest_memfd == 0
    # The free range of the file binds.
    await vm.set_user_memory_region(2, flags, 3 * MIB, MIB, hva, fd, 0)


async def test_legacy_mmu_refuses_private_memory():
    vm = make_vm(mmu="legacy")
    region = vm.mmap(MIB, Backing.PAGE_4K)
    with pytest.raises(KvmError) as err:
        vm.create_guest_memfd(MIB)
    assert err.value.errno == errno.EINVAL and "TDP MMU" in err.value.reason
    await rejected(vm.set_user_memory_region(0, KVM_MEM_GUEST_MEMFD, 0, MIB, region.hva, 1, 0))
    await rejected(vm.set_memory_attributes(0, MIB, PRIVATE))
    assert vm.memslots() == [] and vm.private_ranges() == []


# -- KVM_SET_MEMORY_ATTRIBUTES -----------------------------------------------------------


async def test_attribute_checks_change_nothing():
    vm, *_ = await gmem_guest(MIB)
    for address, size, attributes, flags in ((0, 4096, PRIVATE, 1), (0, 4096, 1, 0),
                                             (0, 0, PRIVATE, 0), (0x800, 4096, PRIVATE, 0),
                                             (0, 0x800, PRIVATE, 0),
                                             ((1 << 64) - 4096, 8192, PRIVATE, 0)):
        await rejected(vm.set_memory_attributes(address, size, attributes, flags))
    assert vm.private_ranges() == []
    await vm.set_memory_attributes(0x3000, 0x5000, PRIVATE)
    await vm.set_memory_attributes(0x5000, 0x1000, 0)
    assert vm.private_ranges() == [(0x3000, 0x5000), (0x6000, 0x8000)]


async def test_private_accesses_use_the_guest_memfd_shared_ones_the_hva():
    vm, vcpu, region, fd = await gmem_guest(MIB)
    await vm.write_hva(region.hva + 0x2000, b"shared!!")
    assert await guest_read(vcpu, 0x2000) == b"shared!!"
    shared_pfn = leaf(vm, 0x2000).pfn
    await vm.set_memory_attributes(0x2000, 0x1000, PRIVATE)
    assert leaf(vm, 0x2000) is None                      # the attribute change zapped it
    assert await guest_read(vcpu, 0x2000) == bytes(8)     # a fresh, zeroed private page
    await guest_write(vcpu, 0x2000, b"private!")
    private_pfn = leaf(vm, 0x2000).pfn
    assert private_pfn != shared_pfn and vm.guest_memfds()[0].pages == 1
    assert await vm.read_hva(region.hva + 0x2000, 8) == b"shared!!"    # the host's copy
    await vm.set_memory_attributes(0x2000, 0x1000, 0)
    assert await guest_read(vcpu, 0x2000) == b"shared!!"
    await vm.set_memory_attributes(0x2000, 0x1000, PRIVATE)
    assert await guest_read(vcpu, 0x2000) == b"private!"  # the file kept its page
    assert vm.sanitizers.accesses_checked > 0


async def test_private_gfn_without_guest_memfd_is_a_private_memory_fault_exit():
    vm = make_vm()
    region = vm.mmap(MIB, Backing.PAGE_4K)
    await vm.set_user_memory_region(0, 0, 0, MIB, region.hva)
    vcpu = vm.create_vcpu(0)
    # A private gfn no slot holds cannot be emulated.
    await vm.set_memory_attributes(0x200000, 0x1000, PRIVATE)
    e = (await run(vcpu, (0x200000, R, 4, b""))).exit
    assert (e.reason, e.flags, e.gpa) == (ExitReason.MEMORY_FAULT,
                                          KVM_MEMORY_EXIT_FLAG_PRIVATE, 0x200000)
    await vm.set_memory_attributes(0x4000, 0x1000, PRIVATE)
    result = await run(vcpu, (0x4010, W, 4, b"abcd"))
    e = result.exit
    assert e.reason is ExitReason.MEMORY_FAULT and e.errno == errno.EFAULT
    assert (e.gpa, e.length, e.flags) == (0x4000, 4096, KVM_MEMORY_EXIT_FLAG_PRIVATE)
    assert e.is_write and result.completed == 0
    # Userspace converts the page to shared, and the access goes through on the next run.
    await vm.set_memory_attributes(0x4000, 0x1000, 0)
    assert (await vcpu.run()).exit.reason is ExitReason.DONE
    assert await vm.read_hva(region.hva + 0x4010, 4) == b"abcd"


async def test_a_frame_of_mixed_attributes_maps_by_4k():
    vm, vcpu, region, _ = await gmem_guest(4 * MIB, Backing.THP)
    await guest_read(vcpu, 0x10000)
    assert leaf(vm, 0x10000).level == 2                    # a 2M leaf while all shared
    await vm.set_memory_attributes(0x1ff000, 0x1000, PRIVATE)
    assert leaf(vm, 0x10000) is None                       # the 2M leaf covered the gfn
    await guest_read(vcpu, 0x10000)
    assert leaf(vm, 0x10000).level == 1
    await guest_read(vcpu, 0x1ff000)
    assert leaf(vm, 0x1ff000).level == 1
    await guest_read(vcpu, 0x200000)
    assert leaf(vm, 0x200000).level == 2                   # the next frame is uniform


async def test_fault_racing_an_attribute_change_retries_and_maps_private():
    """The fault decided shared and looked up the hva's pfn; the gfn turns private before
    it installs: the invalidation (in progress, then the sequence) makes it retry, and the
    retry maps the guest_memfd page."""
    vm, vcpu, region, _ = await gmem_guest(MIB)
    await vm.write_hva(region.hva + 0x5000, b"shared!!")
    await guest_read(vcpu, 0x1000)                         # root loaded
    await vm.mmu_lock.acquire_write()
    change = asyncio.create_task(vm.set_memory_attributes(0x5000, 0x1000, PRIVATE))
    await settle()                                         # queued for the write lock
    fault = asyncio.create_task(run(vcpu, (0x5000, R, 8, b"")))
    await settle()                                         # shared pfn in hand, queued
    assert vcpu.stats()["pf_taken"] == 2
    vm.mmu_lock.release_write()
    result, _ = await asyncio.gather(fault, change)
    assert result.exit.reason is ExitReason.DONE, result.exit
    assert result.read_data == bytes(8)                    # the private page, not the hva's
    assert vcpu.stats()["pf_retry"] >= 1
    slot = vm.memslot_sets[0].by_id[0]
    assert leaf(vm, 0x5000).pfn == slot.gmem.current_pfn(slot, 5)


# -- fallocate: allocation and holes ------------------------------------------------------


async def test_fallocate_checks():
    vm, _, _, fd = await gmem_guest(MIB)
    for mode, offset, length, code in ((0, 0, 4096, errno.EOPNOTSUPP),
                                       (FALLOC_FL_PUNCH_HOLE, 0, 4096, errno.EOPNOTSUPP),
                                       (FALLOC_FL_KEEP_SIZE | 0x10, 0, 4096, errno.EOPNOTSUPP),
                                       (PUNCH, 0x800, 4096, errno.EINVAL),
                                       (PUNCH, 0, 0x800, errno.EINVAL),
                                       (PUNCH, 0, 0, errno.EINVAL),
                                       (FALLOC_FL_KEEP_SIZE, 0, 2 * MIB, errno.EINVAL)):
        await rejected(vm.guest_memfd_fallocate(fd, mode, offset, length), code)
    await rejected(vm.guest_memfd_fallocate(7, PUNCH, 0, 4096), errno.EBADF)
    assert vm.guest_memfds()[0].pages == 0
    await vm.guest_memfd_fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, 0x4000)
    assert vm.guest_memfds()[0].pages == 4


async def test_punching_a_hole_unmaps_the_range_and_frees_its_pages():
    vm, vcpu, _, fd = await gmem_guest(MIB)
    await vm.set_memory_attributes(0, MIB, PRIVATE)
    await guest_write(vcpu, 0x3000, b"secret!!")
    await guest_write(vcpu, 0x9000, b"keep me!")
    old_pfn = leaf(vm, 0x3000).pfn
    await vm.guest_memfd_fallocate(fd, PUNCH, 0x3000, 0x1000)
    assert leaf(vm, 0x3000) is None                         # unmapped before freed
    assert leaf(vm, 0x9000) is not None                     # outside the hole
    assert vm.guest_memfds()[0].pages == 1
    assert await guest_read(vcpu, 0x3000) == bytes(8)       # a fresh zeroed page
    assert leaf(vm, 0x3000).pfn != old_pfn
    assert await guest_read(vcpu, 0x9000) == b"keep me!"


async def test_fault_racing_a_hole_retries_instead_of_mapping_the_freed_page():
    vm, vcpu, _, fd = await gmem_guest(MIB)
    await vm.set_memory_attributes(0, MIB, PRIVATE)
    await guest_read(vcpu, 0x1000)                          # root loaded
    await vm.mmu_lock.acquire_write()
    hole = asyncio.create_task(vm.guest_memfd_fallocate(fd, PUNCH, 0, MIB))
    await settle()                                          # queued for the write lock
    fault = asyncio.create_task(run(vcpu, (0x6000, W, 8, b"written!")))
    await settle()                                          # its page in hand, queued
    assert vm.guest_memfds()[0].pages == 2
    vm.mmu_lock.release_write()
    result, _ = await asyncio.gather(fault, hole)
    assert result.exit.reason is ExitReason.DONE, result.exit
    assert vcpu.stats()["pf_retry"] >= 1
    assert vm.guest_memfds()[0].pages == 1                  # allocated again after the hole
    assert await guest_read(vcpu, 0x6000) == b"written!"


async def test_a_hole_in_an_unbound_range_and_vm_destroy_free_the_pages():
    vm, vcpu, _, fd = await gmem_guest(MIB)
    await vm.set_memory_attributes(0, MIB, PRIVATE)
    await guest_write(vcpu, 0x1000, b"12345678")
    await vm.set_user_memory_region(0, 0, 0, 0, 0)
    allocated = vm.host.pfns.allocated_4k
    await vm.guest_memfd_fallocate(fd, PUNCH, 0, MIB)
    assert vm.host.pfns.allocated_4k == allocated - 1
    await vm.guest_memfd_fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, 0x3000)
    await vm.destroy()
    assert vm.host.pfns.allocated_4k == 0


def hold_after_seq_snapshot(vm):
    """Stop the next fault between its mmu_invalidate_seq snapshot and its memslot and
    attribute lookups; returns (reached, release) events."""
    reached, release = asyncio.Event(), asyncio.Event()
    point = vm.sched.point

    async def held():
        reached.set()
        await release.wait()

    def patched(name):
        if name == "fault.after_seq_snapshot" and not release.is_set():
            return held()
        return point(name)

    vm.sched.point = patched
    return reached, release


@pytest.mark.parametrize("to_private", [True, False])
async def test_attribute_changed_after_the_snapshot_is_a_memory_fault_exit(to_private):
    """The fault took its private/shared view at entry and snapshotted the sequence; the
    attribute flips before it looks: KVM_EXIT_MEMORY_FAULT, PRIVATE set if the fault was
    private, and the next run maps the page as the attribute now says."""
    vm, vcpu, region, _ = await gmem_guest(MIB)
    await vm.write_hva(region.hva + 0x5000, b"shared!!")
    if not to_private:
        await vm.set_memory_attributes(0x5000, 0x1000, PRIVATE)
    await guest_read(vcpu, 0x1000)                          # root loaded
    reached, release = hold_after_seq_snapshot(vm)
    fault = asyncio.create_task(run(vcpu, (0x5000, R, 8, b"")))
    await reached.wait()
    await vm.set_memory_attributes(0x5000, 0x1000, PRIVATE if to_private else 0)
    release.set()
    e = (await fault).exit
    assert e.reason is ExitReason.MEMORY_FAULT and e.errno == errno.EFAULT, e
    assert (e.gpa, e.length) == (0x5000, 4096)
    assert e.flags == (0 if to_private else KVM_MEMORY_EXIT_FLAG_PRIVATE)
    result = await vcpu.run()                               # KVM_RUN again
    assert result.exit.reason is ExitReason.DONE
    assert result.read_data == (bytes(8) if to_private else b"shared!!")


@given(st.lists(st.tuples(st.integers(0, 40), st.integers(1, 24), st.booleans()),
                max_size=30))
def test_attribute_ranges_agree_with_a_set_of_private_gfns(changes):
    attrs, private = MemoryAttributes(), set()
    for start, length, make_private in changes:
        attrs.store(start, start + length, make_private)
        gfns = set(range(start, start + length))
        private = private | gfns if make_private else private - gfns
        assert [g for g in range(72) if attrs.is_private(g)] == sorted(private)
        ranges = attrs.ranges()
        assert all(e < s2 for (_, e), (s2, _) in zip(ranges, ranges[1:]))   # merged
        for lo in range(0, 64, 8):
            for hi in (lo + 1, lo + 8, lo + 16):
                window = set(range(lo, hi))
                assert attrs.range_has(lo, hi, True) == (window <= private)
                assert attrs.range_has(lo, hi, False) == (not window & private)
