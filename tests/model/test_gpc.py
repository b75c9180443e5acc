"""gfn-to-pfn caches: the state machine, use through a valid cache, invalidation before
mmu_lock, memslot generations, and the two refresh policies under held invalidations."""

from __future__ import annotations

import asyncio
import errno

import pytest

from vmmu.server.kvm import (KVM_MEM_LOG_DIRTY_PAGES, Backing, KvmError, NoSuchObject, VmBugged,
                             VmConfig)
from vmmu.server.kvm import gpc as gpc_module
from vmmu.server.kvm.gpc import GpcState
from vmmu.server.kvm.mmu_lock import LockAssertion
from vmmu.server.kvm.sanitizers import STALE_GPC, SanitizerViolation
from vmmu.server.kvm.types import PAGE_SIZE

GPA = 0x1008                 # in guest page 1, 8 bytes in
POLICIES = ["global", "range"]


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


@pytest.fixture
async def guest(make_guest):
    return await make_guest(Backing.PAGE_4K, 16 * PAGE_SIZE, sanitizers=True)


def page_of(guest, gpa: int) -> tuple[int, int]:
    start = guest.hva(gpa) & ~(PAGE_SIZE - 1)
    return start, start + PAGE_SIZE


# -- the state machine -------------------------------------------------------------------

async def test_inactive_to_active_valid_to_inactive_and_back(guest):
    vm = guest.vm
    gpc = await vm.gpcs.create(GPA, 8)
    info = gpc.info()
    assert (info.state, info.active, info.valid) == (GpcState.ACTIVE_VALID, True, True)
    assert (info.gpa, info.uhva) == (GPA, guest.hva(GPA))
    assert info.pfn == vm.host.current_pfn(guest.hva(GPA))
    assert info.generation == vm.memslot_sets[0].generation
    assert vm.gpcs.active == [gpc]

    await gpc.deactivate()
    assert (gpc.state, gpc.active, gpc.valid, gpc.pfn) == (GpcState.INACTIVE, False, False,
                                                           None)
    assert vm.gpcs.active == []
    await gpc.deactivate()                      # as KVM: nothing happens to an inactive cache
    with pytest.raises(KvmError, match="is inactive") as excinfo:
        await gpc.refresh(8)
    assert excinfo.value.errno == errno.EINVAL
    with pytest.raises(KvmError, match="gpc 1 is inactive: refresh") as excinfo:
        gpc.read(0, 8)
    assert excinfo.value.errno == errno.EAGAIN

    await gpc.activate(GPA, 8)
    assert gpc.state is GpcState.ACTIVE_VALID and gpc.check(8)


async def test_a_transition_outside_the_state_machine_is_a_bug(guest):
    gpc = await guest.vm.gpcs.create(GPA, 8)
    await gpc.deactivate()
    with pytest.raises(VmBugged, match="refresh cannot move it from inactive to active-valid"):
        gpc._move(GpcState.ACTIVE_VALID, "refresh")


@pytest.mark.parametrize("gpa, length", [(0x1FF9, 8), (0x1000, PAGE_SIZE + 1), (0x1000, 0)])
async def test_a_range_that_crosses_a_page_is_einval_and_creates_nothing(guest, gpa, length):
    with pytest.raises(KvmError) as excinfo:
        await guest.vm.gpcs.create(gpa, length)
    assert excinfo.value.errno == errno.EINVAL
    assert guest.vm.gpcs.infos() == [] and guest.vm.gpcs.active == []


async def test_a_gpa_outside_every_memslot_is_efault_and_creates_nothing(guest):
    with pytest.raises(KvmError, match="no memslot maps gpa") as excinfo:
        await guest.vm.gpcs.create(guest.size + 0x1000, 8)
    assert excinfo.value.errno == errno.EFAULT
    assert guest.vm.gpcs.infos() == [] and guest.vm.gpcs.active == []


async def test_unknown_cache_is_enoent_and_too_many_is_enospc(guest, monkeypatch):
    with pytest.raises(NoSuchObject):
        guest.vm.gpcs.get(7)
    monkeypatch.setattr(gpc_module, "MAX_GPCS", 2)
    await guest.vm.gpcs.create(0x1000, 8)
    await guest.vm.gpcs.create(0x2000, 8)
    with pytest.raises(KvmError) as excinfo:
        await guest.vm.gpcs.create(0x3000, 8)
    assert excinfo.value.errno == errno.ENOSPC
    assert [info.gpa for info in guest.vm.gpcs.infos()] == [0x1000, 0x2000]


def test_an_unknown_policy_is_einval():
    with pytest.raises(KvmError, match="gpc_policy 'lazy' is not one of global, range"):
        VmConfig(gpc_policy="lazy").validate()


# -- use through a valid cache -----------------------------------------------------------

async def test_read_and_write_go_to_the_host_page_and_mark_it_dirty(guest, monkeypatch):
    vm = guest.vm
    dirtied = []
    monkeypatch.setattr(vm, "mark_page_dirty", lambda slot, gfn: dirtied.append((slot.id, gfn)))
    gpc = await vm.gpcs.create(GPA, 16)
    gpc.write(4, b"gpc!")
    assert await vm.read_hva(guest.hva(GPA) + 4, 4) == b"gpc!"
    assert dirtied == [(0, GPA >> 12)]
    await vm.write_hva(guest.hva(GPA), b"host")
    assert gpc.read(0, 8) == b"hostgpc!"


async def test_check_refuses_a_range_past_the_page_and_read_says_einval(guest):
    gpc = await guest.vm.gpcs.create(GPA, 8)
    assert gpc.check(PAGE_SIZE - 8) and not gpc.check(PAGE_SIZE - 7)
    with pytest.raises(KvmError) as excinfo:
        gpc.read(PAGE_SIZE - 8, 1)
    assert excinfo.value.errno == errno.EINVAL


@pytest.mark.parametrize("take_away", ["migrate_pages", "madvise_dontneed", "swap_out"])
async def test_an_invalidation_of_the_page_makes_the_cache_invalid_until_refreshed(
        guest, take_away):
    vm = guest.vm
    gpc = await vm.gpcs.create(GPA, 8)
    gpc.write(0, b"12345678")
    await getattr(vm, take_away)(*(page_of(guest, GPA)[0], PAGE_SIZE))
    assert gpc.state is GpcState.ACTIVE_INVALID and not gpc.check(8)
    with pytest.raises(KvmError, match="active-invalid: refresh it first") as excinfo:
        gpc.write(0, b"x")
    assert excinfo.value.errno == errno.EAGAIN
    await gpc.refresh(8)
    assert gpc.check(8) and gpc.pfn == vm.host.current_pfn(guest.hva(GPA))
    expected = bytes(8) if take_away == "madvise_dontneed" else b"12345678"
    assert gpc.read(0, 8) == expected
    assert vm.stats()["gpc_invalidations"] == 1 and vm.stats()["gpc_refreshes"] == 2


async def test_invalidations_of_other_pages_leave_the_cache_valid(guest):
    vm = guest.vm
    gpc = await vm.gpcs.create(GPA, 8)
    await vm.migrate_pages(page_of(guest, GPA)[1], PAGE_SIZE)
    await vm.madvise_dontneed(guest.region.hva, PAGE_SIZE)
    assert gpc.check(8) and gpc.invalidate_seq == 0


async def test_the_sweep_clears_valid_before_invalidate_range_start_takes_mmu_lock(guest):
    vm = guest.vm
    gpc = await vm.gpcs.create(GPA, 8)
    await vm.mmu_lock.acquire_read()            # a fault holds mmu_lock: start() must wait
    migrate = asyncio.create_task(vm.migrate_pages(page_of(guest, GPA)[0], PAGE_SIZE))
    await settle()
    assert vm.mmu_lock.statistics().waiters == 1
    assert gpc.state is GpcState.ACTIVE_INVALID and not gpc.check(8)
    vm.mmu_lock.release_read()
    await migrate
    with pytest.raises(LockAssertion, match="before mmu_lock"):
        async with vm.mmu_lock.write:
            vm.gpcs.invalidate_start(*page_of(guest, GPA))


async def test_an_inactive_cache_is_not_swept(guest):
    gpc = await guest.vm.gpcs.create(GPA, 8)
    await gpc.deactivate()
    await guest.vm.migrate_pages(page_of(guest, GPA)[0], PAGE_SIZE)
    assert gpc.invalidate_seq == 0


# -- memslots ----------------------------------------------------------------------------

async def test_a_memslot_change_fails_check_and_refresh_resolves_the_uhva_again(guest):
    vm = guest.vm
    gpc = await vm.gpcs.create(GPA, 8)
    await vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, guest.size,
                                    guest.region.hva)
    assert gpc.valid and not gpc.check(8)       # the generation moved, the pfn did not
    with pytest.raises(KvmError, match="generation") as excinfo:
        gpc.read(0, 8)
    assert excinfo.value.errno == errno.EAGAIN
    await gpc.refresh(8)
    assert gpc.check(8) and gpc.refreshes == 1  # same uhva, still valid: no new lookup

    other = vm.mmap(guest.size, Backing.PAGE_4K)
    await vm.set_user_memory_region(0, 0, 0, 0, 0)
    await vm.set_user_memory_region(0, 0, 0, guest.size, other.hva)
    assert not gpc.check(8)
    await gpc.refresh(8)
    assert gpc.uhva == other.hva + GPA and gpc.pfn == vm.host.current_pfn(other.hva + GPA)
    assert gpc.check(8) and gpc.refreshes == 2


async def test_refresh_after_the_memslot_went_is_efault_and_leaves_it_active_invalid(guest):
    vm = guest.vm
    gpc = await vm.gpcs.create(GPA, 8)
    await vm.set_user_memory_region(0, 0, 0, 0, 0)
    with pytest.raises(KvmError, match="no memslot maps gpa") as excinfo:
        await gpc.refresh(8)
    assert excinfo.value.errno == errno.EFAULT
    assert (gpc.state, gpc.uhva, gpc.pfn) == (GpcState.ACTIVE_INVALID, None, None)
    assert vm.gpcs.active == [gpc]


# -- refresh: retries, waits and the two policies ----------------------------------------

def race_the_lookup(vm, hva: int, times: int = 1) -> list[int]:
    """Make the host migrate the page at hva right after refresh's next `times` lookups;
    returns the pfns those lookups found."""
    lookup, found = vm.host.hva_to_pfn, []

    async def racing(addr, write):
        result = await lookup(addr, write)
        if len(found) < times:
            found.append(result[0])
            await vm.migrate_pages(hva & ~(PAGE_SIZE - 1), PAGE_SIZE)
        return result

    vm.host.hva_to_pfn = racing
    return found


@pytest.mark.parametrize("policy", POLICIES)
async def test_refresh_retries_when_the_page_moves_under_its_lookup(make_guest, policy):
    guest = await make_guest(Backing.PAGE_4K, 16 * PAGE_SIZE, sanitizers=True,
                             gpc_policy=policy)
    vm = guest.vm
    gpc = await vm.gpcs.create(GPA, 8)
    await vm.madvise_dontneed(*(page_of(guest, GPA)[0], PAGE_SIZE))
    stale = race_the_lookup(vm, guest.hva(GPA), times=2)
    await gpc.refresh(8)
    assert gpc.retries == 2 and vm.stats()["gpc_refresh_retries"] == 2
    assert gpc.pfn == vm.host.current_pfn(guest.hva(GPA)) and gpc.pfn not in stale


@pytest.mark.parametrize("policy", POLICIES)
async def test_without_the_retry_check_the_oracle_catches_the_stale_pfn(make_guest, policy):
    guest = await make_guest(Backing.PAGE_4K, 16 * PAGE_SIZE, sanitizers=True,
                             gpc_policy=policy, debug=frozenset({"gpc_refresh_no_check"}))
    vm = guest.vm
    gpc = await vm.gpcs.create(GPA, 8)
    await vm.madvise_dontneed(*(page_of(guest, GPA)[0], PAGE_SIZE))
    race_the_lookup(vm, guest.hva(GPA))
    with pytest.raises(SanitizerViolation) as excinfo:
        await gpc.refresh(8)
    assert excinfo.value.oracle == STALE_GPC and "but the host maps pfn" in str(excinfo.value)
    assert vm.info().dead


@pytest.mark.parametrize("policy", POLICIES)
async def test_an_overlapping_held_invalidation_makes_every_policy_wait(make_guest, policy):
    guest = await make_guest(Backing.PAGE_4K, 16 * PAGE_SIZE, sanitizers=True,
                             gpc_policy=policy)
    vm = guest.vm
    gpc = await vm.gpcs.create(GPA, 8)
    held = await vm.begin_invalidation(*page_of(guest, GPA), lease_s=30)
    refresh = asyncio.create_task(gpc.refresh(8))
    await settle()
    assert not refresh.done() and gpc.state is GpcState.ACTIVE_INVALID
    assert gpc.retries == 0                     # waiting, not spinning
    await vm.end_invalidation(held)
    await refresh
    assert gpc.check(8) and gpc.retries == 0 and gpc.wait_ns > 0


async def test_a_non_overlapping_held_invalidation_delays_only_the_global_policy(make_guest):
    log = []
    for policy in POLICIES:
        guest = await make_guest(Backing.PAGE_4K, 16 * PAGE_SIZE, sanitizers=True,
                                 gpc_policy=policy)
        vm = guest.vm
        gpc = await vm.gpcs.create(GPA, 8)
        await vm.madvise_dontneed(*(page_of(guest, GPA)[0], PAGE_SIZE))
        held = await vm.begin_invalidation(*page_of(guest, GPA + PAGE_SIZE), lease_s=30)
        refresh = asyncio.create_task(gpc.refresh(8))
        await settle()
        log.append((policy, "refreshed while held", refresh.done()))
        await vm.end_invalidation(held)
        await refresh
        log.append((policy, "waited", gpc.wait_ns > 0))
    assert log == [("global", "refreshed while held", False), ("global", "waited", True),
                   ("range", "refreshed while held", True), ("range", "waited", False)]


async def test_deactivate_waits_for_a_refresh_in_progress(guest):
    vm = guest.vm
    gpc = await vm.gpcs.create(GPA, 8)
    held = await vm.begin_invalidation(*page_of(guest, GPA), lease_s=30)
    refresh = asyncio.create_task(gpc.refresh(8))
    await settle()
    deactivate = asyncio.create_task(vm.gpcs.deactivate(gpc.id))
    await settle()
    assert not deactivate.done()
    await vm.end_invalidation(held)
    await refresh
    info = await deactivate
    assert info.state is GpcState.INACTIVE and vm.gpcs.infos() == []
    with pytest.raises(NoSuchObject):
        vm.gpcs.get(gpc.id)


async def test_a_cancelled_refresh_leaves_the_cache_active_invalid(guest):
    vm = guest.vm
    gpc = await vm.gpcs.create(GPA, 8)
    held = await vm.begin_invalidation(*page_of(guest, GPA), lease_s=30)
    refresh = asyncio.create_task(gpc.refresh(8))
    await settle()
    refresh.cancel()
    with pytest.raises(asyncio.CancelledError):
        await refresh
    assert (gpc.state, gpc.pfn) == (GpcState.ACTIVE_INVALID, None)
    await vm.end_invalidation(held)
    await gpc.refresh(8)
    assert gpc.check(8)
