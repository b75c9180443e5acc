"""The fast page fault: write-protection and access tracking fixed without mmu_lock."""

import errno
import itertools

import pytest

from vmmu.server.kvm import AccessBatch, AccessKind, Backing, ExitReason, Kvm, VmConfig
from vmmu.server.kvm import spte as S
from vmmu.server.kvm.errors import KvmError
from vmmu.server.kvm.mmu import FAST_PF_TRIES, FAULT_BITS, page_fault, page_fault_can_be_fast
from vmmu.server.kvm.mmu_internal import (PFERR_FETCH_MASK, PFERR_GUEST_FINAL_MASK,
                                          PFERR_PRESENT_MASK, PFERR_RSVD_MASK,
                                          PFERR_USER_MASK, PFERR_WRITE_MASK, RetPf)
from vmmu.server.kvm.tdp_iter import TdpIter

MIB = 1 << 20


def access(gpa: int, kind: AccessKind) -> AccessBatch:
    return AccessBatch.build([(gpa, kind, 8, None)])


def leaf_of(root, gfn: int) -> TdpIter:
    """The iterator parked on the leaf SPTE that maps gfn."""
    for it in TdpIter(root, gfn, gfn + 1):
        if S.is_leaf_present(it.old_spte, it.level):
            return it
    raise AssertionError(f"gfn {gfn:#x} is not mapped")


def set_spte(vm, it: TdpIter, new: int) -> None:
    """An SPTE write under mmu_lock held for write: the TDP MMU's door, or the legacy
    MMU's plain store."""
    if vm.tdp is not None:
        vm.tdp.iter_set_spte(it, new)
    else:
        it.table.spt[it.index] = it.old_spte = new


async def write_protect(vm, gfn: int) -> int:
    """Clear W on gfn's 4K leaf (MMU-writable stays), as dirty logging does; flush."""
    async with vm.mmu_lock.write:
        it = leaf_of(vm.vcpus()[0].root, gfn)
        assert it.level == 1 and S.is_writable(it.old_spte)
        set_spte(vm, it, it.old_spte & ~S.WRITABLE)
        vm.flush_remote_tlbs()
        return it.old_spte


async def test_a_write_to_a_write_protected_4k_spte_is_fixed_without_the_lock(make_guest):
    g = await make_guest(Backing.PAGE_4K, 2 * MIB)
    await g.vcpu.run(access(0x3000, AccessKind.WRITE))
    protected = await write_protect(g.vm, 3)
    assert S.is_mmu_writable(protected) and not S.is_writable(protected)
    reads = g.vm.mmu_lock.statistics().read_acquisitions
    stats = g.vcpu.stats()

    result = await g.vcpu.run(access(0x3000, AccessKind.WRITE))
    after = g.vcpu.stats()
    assert result.completed == 1
    assert after["pf_fast"] == stats["pf_fast"] + 1
    assert after["pf_fixed"] == stats["pf_fixed"] + 1
    assert g.vm.mmu_lock.statistics().read_acquisitions == reads   # no mmu_lock
    leaf = g.vm.walk(0x3000)[-1]
    assert leaf.writable and leaf.pfn == S.spte_to_pfn(protected)


async def test_the_fix_another_task_made_first_is_spurious(make_guest):
    g = await make_guest(Backing.PAGE_4K, 2 * MIB)
    await g.vcpu.run(access(0x5000, AccessKind.WRITE))
    await write_protect(g.vm, 5)
    await g.vcpu.run(access(0x5000, AccessKind.READ))          # load the root, flush
    stats = g.vcpu.stats()
    error = PFERR_WRITE_MASK | PFERR_PRESENT_MASK
    assert await page_fault(g.vcpu, 0x5000, error) is RetPf.FIXED
    assert await page_fault(g.vcpu, 0x5000, error) is RetPf.SPURIOUS
    after = g.vcpu.stats()
    assert after["pf_fast"] == stats["pf_fast"] + 2
    assert after["pf_fixed"] == stats["pf_fixed"] + 1
    assert after["pf_spurious"] == stats["pf_spurious"] + 1


async def test_a_fast_page_fault_losing_every_cmpxchg_walks_five_times_then_goes_slow(
        make_guest, monkeypatch):
    """KVM's loop: the first walk, then one more after each lost cmpxchg while
    `++retry_count > 4` is false; then the slow path. Here each cmpxchg loses to aging,
    which clears or sets the Accessed bit between the walk's read and the cmpxchg."""
    g = await make_guest(Backing.PAGE_4K, 2 * MIB)
    await g.vcpu.run(access(0x5000, AccessKind.WRITE))
    await write_protect(g.vm, 5)
    await g.vcpu.run(access(0x5000, AccessKind.READ))          # load the root, flush
    leaf = leaf_of(g.vcpu.root, 5)
    point, cas_points = g.vm.sched.point, []

    async def racing_point(name: str) -> None:
        if name == "fast_pf.cas":
            cas_points.append(name)
            leaf.table.spt[leaf.index] ^= S.ACCESSED         # aging won the race
        await point(name)

    monkeypatch.setattr(g.vm.sched, "point", racing_point)
    stats = g.vcpu.stats()
    assert await page_fault(g.vcpu, 0x5000, PFERR_WRITE_MASK | PFERR_PRESENT_MASK) \
        is RetPf.FIXED
    assert len(cas_points) == FAST_PF_TRIES == 5
    after = g.vcpu.stats()
    assert after["pf_fast"] == stats["pf_fast"]                # the slow path fixed it
    assert after["pf_fixed"] == stats["pf_fixed"] + 1
    assert g.vm.walk(0x5000)[-1].writable


async def test_read_only_memory_is_left_to_the_slow_path(make_guest):
    g = await make_guest(Backing.PAGE_4K, 2 * MIB, writable=False)
    await g.vcpu.run(access(0x1000, AccessKind.READ))
    leaf = g.vm.walk(0x1000)[-1]
    assert not leaf.mmu_writable and not leaf.host_writable
    error = PFERR_WRITE_MASK | PFERR_PRESENT_MASK
    with pytest.raises(KvmError) as fault:                 # the slow path's memory fault
        await page_fault(g.vcpu, 0x1000, error)
    assert fault.value.errno == errno.EFAULT
    assert g.vcpu.stats()["pf_fast"] == 0
    assert g.vm.walk(0x1000)[-1] == leaf


async def test_access_tracked_sptes_are_restored_by_the_fast_path(make_guest):
    g = await make_guest(Backing.PAGE_4K, 2 * MIB, ad_bits=False)
    await g.vcpu.run(access(0x2000, AccessKind.WRITE))
    await g.vm.clear_young(g.region.hva, g.region.hva + g.size)
    assert S.is_access_track(g.vm.walk(0x2000)[-1].spte)
    g.vm.flush_remote_tlbs()
    fixed = g.vcpu.stats()["pf_fast"]
    await g.vcpu.run(access(0x2000, AccessKind.READ))
    leaf = g.vm.walk(0x2000)[-1]
    assert leaf.readable and not S.is_access_track(leaf.spte)
    assert g.vcpu.stats()["pf_fast"] == fixed + 1


async def test_a_gfn_beyond_the_roots_reach_finds_no_spte_in_the_fast_path(make_guest):
    """A 4-level root's table indices for gfn 5 + 2**36 wrap onto gfn 5's. With A/D bits
    off, gfn 5's leaf is access-tracked after aging and a read of the far gfn may take the
    fast path, which must find no SPTE there (as the hardware walker does) rather than
    restore gfn 5's: the fault is the slow path's, which emulates it."""
    g = await make_guest(Backing.PAGE_4K, 2 * MIB, ad_bits=False)
    await g.vcpu.run(access(0x5000, AccessKind.WRITE))
    await g.vm.clear_young(g.region.hva, g.region.hva + g.size)
    tracked = g.vm.walk(0x5000)[-1].spte
    assert S.is_access_track(tracked)
    far = 0x5000 + ((g.vm.max_gfn + 1) << 12)
    assert g.vm.max_gfn + 1 == 1 << 36
    stats = g.vcpu.stats()

    assert await page_fault(g.vcpu, far, PFERR_GUEST_FINAL_MASK) is RetPf.EMULATE
    assert g.vm.walk(0x5000)[-1].spte == tracked
    assert g.vcpu.stats()["pf_fast"] == stats["pf_fast"]
    # The guest's read of it exits to userspace as MMIO (it used to spin in the fault path).
    result = await g.vcpu.run(access(far, AccessKind.READ))
    assert result.exit.reason is ExitReason.MMIO and result.exit.gpa == far
    assert g.vm.walk(0x5000)[-1].spte == tracked


async def test_a_huge_leaf_in_a_dirty_logged_slot_is_not_fast_fixed(make_guest):
    g = await make_guest(Backing.THP, 4 * MIB)
    await g.vm.write_hva(g.hva(0x1000), b"a THP")            # not the huge zero page
    await g.vcpu.run(access(0x1000, AccessKind.READ))
    async with g.vm.mmu_lock.write:
        it = leaf_of(g.vcpu.root, 1)
        assert it.level == 2
        set_spte(g.vm, it, it.old_spte & ~S.WRITABLE)
    slot = g.vm.memslot_sets[0].lookup(1)
    slot.flags |= 1                                              # logging, as seen by faults
    slot.dirty_logging = True
    stats = g.vcpu.stats()
    error = PFERR_WRITE_MASK | PFERR_PRESENT_MASK
    assert await page_fault(g.vcpu, 0x1000, error) is RetPf.FIXED
    after = g.vcpu.stats()
    assert after["pf_fast"] == stats["pf_fast"]              # the slow path fixed it...
    assert after["pf_fixed"] == stats["pf_fixed"] + 1
    leaf = g.vm.walk(0x1000)[-1]
    assert leaf.level == 1 and leaf.writable                  # ...at 4K


async def test_the_vm_knob_turns_the_fast_path_off(make_guest):
    g = await make_guest(Backing.PAGE_4K, 2 * MIB, fast_page_fault=False)
    await g.vcpu.run(access(0x3000, AccessKind.WRITE))
    await write_protect(g.vm, 3)
    await g.vcpu.run(access(0x3000, AccessKind.WRITE))
    stats = g.vcpu.stats()
    assert stats["pf_fast"] == 0 and stats["pf_fixed"] == 2
    assert g.vm.walk(0x3000)[-1].writable


async def test_a_not_present_fault_with_ad_bits_goes_to_the_slow_path(make_guest):
    g = await make_guest(Backing.PAGE_4K, 2 * MIB)
    await g.vcpu.run(access(0x1000, AccessKind.READ))
    stats = g.vcpu.stats()
    assert stats["pf_fast"] == 0 and stats["pf_fixed"] == 1


@pytest.mark.parametrize("ad_bits,fast", list(itertools.product((True, False), repeat=2)))
async def test_the_fault_paths_table_answers_page_fault_can_be_fast(ad_bits, fast):
    """The VM's table, indexed by the error code's bits, says what the function says for
    every error code made of the bits a fault can carry."""
    vm = Kvm().create_vm(VmConfig(ad_bits=ad_bits, fast_page_fault=fast))
    bits = (PFERR_PRESENT_MASK, PFERR_WRITE_MASK, PFERR_USER_MASK, PFERR_RSVD_MASK,
            PFERR_FETCH_MASK, PFERR_GUEST_FINAL_MASK)
    answers = set()
    for chosen in itertools.product((0, 1), repeat=len(bits)):
        error_code = sum(bit for bit, on in zip(bits, chosen) if on)
        answer = page_fault_can_be_fast(vm, error_code)
        assert vm.can_be_fast[error_code & FAULT_BITS] is answer, hex(error_code)
        answers.add(answer)
    assert answers == ({True, False} if fast else {False})
    await vm.destroy()


@pytest.mark.parametrize("losses, fast", [(4, True), (5, False)])
async def test_the_fast_path_walks_five_times_before_the_slow_path(make_guest, losses, fast):
    """KVM's `fast_page_fault` gives up after its cmpxchg lost five times (the retry
    count exceeds 4): four lost races still end in a fast fix, five go to the slow path."""
    g = await make_guest(Backing.PAGE_4K, 2 * MIB)
    await g.vcpu.run(access(0x3000, AccessKind.WRITE))
    await write_protect(g.vm, 3)
    lost = 0

    async def point(name: str) -> None:
        nonlocal lost
        if name == "fast_pf.cas" and lost < losses:
            lost += 1
            it = leaf_of(g.vcpu.root, 3)                  # another task changes the SPTE:
            it.table.spt[it.index] ^= S.ACCESSED          # the cmpxchg must fail

    g.vm.sched.point = point
    before = g.vcpu.stats()
    result = await g.vcpu.run(access(0x3000, AccessKind.WRITE))
    assert result.exit.reason is ExitReason.DONE and lost == losses
    after = g.vcpu.stats()
    assert after["pf_fast"] - before["pf_fast"] == (1 if fast else 0)
    assert after["pf_taken"] - before["pf_taken"] == 1
