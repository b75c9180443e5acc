"""The NX huge page mitigation (`nx_huge_pages`, nx_huge_pages.py): no executable huge
leaf, fetches map 4K, the tables they link stay small until the recovery worker zaps them.
On both MMUs (the `mmu` fixture)."""

from __future__ import annotations

import asyncio
import errno

import pytest

from vmmu.server.kvm import (KVM_MEM_LOG_DIRTY_PAGES, AccessBatch, AccessKind, Backing,
                             ExitReason, KvmError, VmBugged, VmConfig)
from vmmu.server.kvm.nx_recovery import recovery_period_ms

MIB = 1 << 20
R, W, X = AccessKind.READ, AccessKind.WRITE, AccessKind.EXEC


async def run(vcpu, kind, *gfns):
    result = await vcpu.run(AccessBatch.build([(gfn << 12, kind, 8, None) for gfn in gfns]))
    assert result.exit.reason is ExitReason.DONE, result.exit
    return result


def leaf(vm, gfn: int):
    spte = vm.walk(gfn << 12)[-1]
    assert spte.kind == "leaf", spte
    return spte


def splits(vm) -> int:
    return vm.stats()["nx_lpage_splits"]


def table_pages(vm) -> int:
    return vm.stats()["tdp_mmu_pages" if vm.tdp is not None else "mmu_shadow_pages"]


async def thp_guest(make_guest, size: int = 8 * MIB, **config):
    """THP memory the host has written (a read maps the THP, not the huge zero page)."""
    g = await make_guest(Backing.THP, size, **config)
    await g.vm.madvise_populate_write(g.region.hva, size)
    return g


async def test_a_huge_leaf_is_not_executable_and_a_fetch_from_it_maps_4k(make_guest):
    g = await thp_guest(make_guest, nx_huge_pages=True)
    await run(g.vcpu, R, 5)
    huge = leaf(g.vm, 5)
    assert (huge.level, huge.executable) == (2, False)

    await run(g.vcpu, X, 5)          # EPT violation on a present leaf: the slow path splits
    small = leaf(g.vm, 5)
    assert (small.level, small.executable, small.pfn) == (1, True, huge.pfn + 5)
    # The TDP MMU splits the huge leaf; the legacy MMU drops it (`drop_large_spte`) and
    # a read faults gfn 6 in again, 4K beside the fetch. Either way it is executable: the
    # mitigation is for huge leaves.
    if g.vm.tdp is None:
        await run(g.vcpu, R, 6)
    assert leaf(g.vm, 6).executable and leaf(g.vm, 6).level == 1
    assert splits(g.vm) == 1
    assert g.vm.stats()["pages_2m"] == 0


async def test_without_the_mitigation_a_fetch_maps_huge(make_guest):
    g = await thp_guest(make_guest)
    await run(g.vcpu, X, 5)
    spte = leaf(g.vm, 5)
    assert (spte.level, spte.executable) == (2, True)
    assert splits(g.vm) == 0


async def test_a_read_does_not_make_huge_what_a_fetch_linked(make_guest):
    """`disallowed_hugepage_adjust`: the fetch's table holds one leaf; a read of another
    page in its 2M would replace the table with a huge leaf, but maps 4K beside it."""
    g = await thp_guest(make_guest, nx_huge_pages=True)
    await run(g.vcpu, X, 5)
    tables = table_pages(g.vm)
    await run(g.vcpu, R, 7, 300)
    for gfn in (5, 7, 300):
        assert leaf(g.vm, gfn).level == 1
    assert leaf(g.vm, 7).pfn == leaf(g.vm, 5).pfn + 2
    assert g.vm.stats()["pages_2m"] == 0 and g.vm.stats()["pages_4k"] == 3
    assert table_pages(g.vm) == tables
    assert splits(g.vm) == 1
    # A 2M range no fetch touched maps huge (not executable).
    await run(g.vcpu, R, 512)
    assert (leaf(g.vm, 512).level, leaf(g.vm, 512).executable) == (2, False)


async def test_recovery_zaps_the_oldest_share_and_reads_map_huge_again(make_guest):
    g = await thp_guest(make_guest, nx_huge_pages=True)
    await run(g.vcpu, X, 0, 512, 1024, 1536)        # four 2M ranges, oldest first
    assert splits(g.vm) == 4
    flushes = g.vm.stats()["remote_tlb_flush_requests"]

    assert await g.vm.recover_nx_huge_pages(3) == 2           # ceil(4 / 3)
    assert splits(g.vm) == 2
    assert g.vm.stats()["remote_tlb_flush_requests"] == flushes + 1
    assert g.vm.walk(0)[-1].kind != "leaf" and g.vm.walk(512 << 12)[-1].kind != "leaf"
    assert leaf(g.vm, 1024).level == 1 and leaf(g.vm, 1536).level == 1
    await run(g.vcpu, R, 1, 513, 1025)
    assert [leaf(g.vm, gfn).level for gfn in (1, 513, 1025)] == [2, 2, 1]

    assert await g.vm.recover_nx_huge_pages(1) == 2
    assert splits(g.vm) == 0
    assert await g.vm.recover_nx_huge_pages(1) == 0          # an empty list: nothing


async def test_recovery_only_unaccounts_in_a_dirty_logged_slot(make_guest):
    g = await thp_guest(make_guest, nx_huge_pages=True)
    await run(g.vcpu, X, 5)
    await g.vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, g.gpa, g.size,
                                      g.region.hva)
    assert await g.vm.recover_nx_huge_pages(1) == 0
    assert splits(g.vm) == 0
    assert leaf(g.vm, 5).level == 1                         # still mapped, still small
    # Not disallowed any more: with logging off again, a read may map it huge.
    await g.vm.set_user_memory_region(0, 0, g.gpa, g.size, g.region.hva)
    await g.vm.madvise_dontneed(g.region.hva, 2 * MIB)     # zap the leaves, keep the table
    await g.vm.madvise_populate_write(g.region.hva, 2 * MIB)
    await run(g.vcpu, R, 5)
    assert leaf(g.vm, 5).level == 2


async def test_a_table_leaves_the_list_when_its_tree_goes(make_guest):
    """Unlinked tables are untracked: after a slot delete zaps every root, recovery finds
    nothing to zap (it would find a table no root links)."""
    g = await thp_guest(make_guest, nx_huge_pages=True)
    await run(g.vcpu, X, 5, 600)
    assert splits(g.vm) == 2
    await g.vm.set_user_memory_region(0, 0, g.gpa, 0, g.region.hva)
    assert splits(g.vm) == 0
    assert await g.vm.recover_nx_huge_pages(1) == 0


async def test_a_fetch_from_1g_tracks_both_levels_and_a_read_maps_2m_beside_it(make_guest):
    g = await make_guest(Backing.HUGETLB_1G, 1 << 30, nx_huge_pages=True)
    await g.vm.madvise_populate_write(g.region.hva, 1 << 30)
    await run(g.vcpu, X, 5)
    assert leaf(g.vm, 5).level == 1
    assert splits(g.vm) == 2                 # the 2M table and the 4K table under it
    await run(g.vcpu, R, 512)
    assert (leaf(g.vm, 512).level, leaf(g.vm, 512).executable) == (2, False)
    await run(g.vcpu, R, 7)
    assert leaf(g.vm, 7).level == 1


async def test_bad_recovery_requests_change_nothing(make_guest, make_kvm_vm):
    g = await thp_guest(make_guest, nx_huge_pages=True)
    await run(g.vcpu, X, 5)
    for ratio in (0, -1, 1 << 32):
        with pytest.raises(KvmError) as err:
            await g.vm.recover_nx_huge_pages(ratio)
        assert err.value.errno == errno.EINVAL
    assert splits(g.vm) == 1
    with pytest.raises(KvmError) as err:
        await make_kvm_vm().recover_nx_huge_pages(1)
    assert err.value.errno == errno.EOPNOTSUPP


@pytest.mark.tdp_only        # the legacy MMU splits no huge leaf when logging starts
async def test_huge_leaves_rebuilt_when_logging_stops_are_not_executable(make_guest):
    g = await thp_guest(make_guest, nx_huge_pages=True)
    await run(g.vcpu, R, 5)
    await g.vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, g.gpa, g.size,
                                      g.region.hva)
    assert (leaf(g.vm, 5).level, leaf(g.vm, 5).executable) == (1, True)   # split: 4K, X
    await g.vm.set_user_memory_region(0, 0, g.gpa, g.size, g.region.hva)
    assert (leaf(g.vm, 5).level, leaf(g.vm, 5).executable) == (2, False)


async def test_destroy_leaves_no_freed_table_on_the_list(make_guest):
    g = await thp_guest(make_guest, nx_huge_pages=True)
    await run(g.vcpu, X, 5)
    await g.vm.destroy()
    assert len(g.vm.mmu.possible_nx_huge_pages) == 0 and g.vm.stat.nx_lpage_splits == 0


async def test_recovery_of_a_1g_range_leaves_no_table_on_the_list(make_guest):
    """Zapping the 2M table takes the 4K table under it with it: the TDP MMU tears the
    subtree down (one zap), the legacy MMU unlinks the child, which stays in the hash and on
    the list until the worker zaps it too (two zaps). Then a read maps 1G again."""
    g = await make_guest(Backing.HUGETLB_1G, 1 << 30, nx_huge_pages=True)
    await g.vm.madvise_populate_write(g.region.hva, 1 << 30)
    await run(g.vcpu, X, 5)
    assert splits(g.vm) == 2
    assert await g.vm.recover_nx_huge_pages(1) == (1 if g.vm.tdp is not None else 2)
    assert splits(g.vm) == 0 and len(g.vm.mmu.possible_nx_huge_pages) == 0
    await run(g.vcpu, R, 7)
    assert (leaf(g.vm, 7).level, leaf(g.vm, 7).executable) == (3, False)


# -- the periodic recovery worker (nx_recovery.py) -------------------------------------

async def wait_for(predicate, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.005)


async def test_the_worker_starts_at_the_first_run_and_recovers_every_period(make_guest):
    g = await thp_guest(make_guest, nx_huge_pages=True, nx_huge_pages_recovery_ratio=1,
                        nx_huge_pages_recovery_period_ms=10)
    worker = g.vm.nx_recovery
    assert not worker.running                      # no KVM_RUN yet
    await run(g.vcpu, X, 5, 600)
    assert worker.running
    await wait_for(lambda: splits(g.vm) == 0)
    assert g.vm.walk(5 << 12)[-1].kind != "leaf"   # the fetches' tables were zapped
    await run(g.vcpu, R, 5)
    assert leaf(g.vm, 5).level == 2
    await run(g.vcpu, X, 1030)                     # and later fetches are recovered too
    await wait_for(lambda: splits(g.vm) == 0)
    assert worker.passes >= 2
    await g.vm.destroy()
    assert not worker.running


async def test_destroy_stops_the_worker_in_its_pass_and_leaves_nothing_held(make_guest):
    """Destroy while the worker's pass waits for mmu_lock: the pass ends, then the
    teardown takes the lock; nothing stays held or running."""
    g = await thp_guest(make_guest, nx_huge_pages=True, nx_huge_pages_recovery_ratio=1,
                        nx_huge_pages_recovery_period_ms=1)
    await run(g.vcpu, X, 5)
    worker = g.vm.nx_recovery
    await g.vm.mmu_lock.acquire_read()             # the next pass queues for the write lock
    await wait_for(lambda: g.vm.mmu_lock.statistics().waiters == 1)
    destroy = asyncio.create_task(g.vm.destroy())
    await asyncio.sleep(0.01)
    assert not destroy.done()                      # waits for the pass under way
    g.vm.mmu_lock.release_read()
    await asyncio.wait_for(destroy, 5)
    assert not worker.running and g.vm.destroyed
    assert g.vm.mmu_lock.statistics().waiters == 0


async def test_a_dead_vm_ends_its_worker(make_guest):
    g = await thp_guest(make_guest, nx_huge_pages=True, nx_huge_pages_recovery_ratio=1,
                        nx_huge_pages_recovery_period_ms=1)
    await run(g.vcpu, X, 5)
    g.vm.mark_dead(VmBugged("test: the VM is bugged"))
    worker = g.vm.nx_recovery
    await wait_for(lambda: not worker.running)
    assert worker.failure is None                  # ended, not failed
    assert splits(g.vm) == 1                       # a dead VM is not touched
    await g.vm.destroy()


async def test_destroy_wakes_a_sleeping_worker(make_guest):
    g = await thp_guest(make_guest, nx_huge_pages=True, nx_huge_pages_recovery_ratio=1,
                        nx_huge_pages_recovery_period_ms=3_600_000)
    await run(g.vcpu, X, 5)
    worker = g.vm.nx_recovery
    assert worker.running
    await asyncio.wait_for(g.vm.destroy(), 5)      # not after the hour
    assert not worker.running and worker.failure is None and worker.passes == 0


@pytest.mark.parametrize("config, reason", [
    (dict(nx_huge_pages_recovery_ratio=1), "needs nx_huge_pages"),
    (dict(nx_huge_pages=True, nx_huge_pages_recovery_period_ms=10), "needs a recovery ratio"),
    (dict(nx_huge_pages=True, nx_huge_pages_recovery_ratio=1 << 32), "not a u32"),
    (dict(nx_huge_pages=True, nx_huge_pages_recovery_ratio=-1), "not a u32"),
    (dict(nx_huge_pages=True, nx_huge_pages_recovery_ratio=1,
          nx_huge_pages_recovery_period_ms=1 << 32), "not a u32"),
    (dict(nx_huge_pages=True, nx_huge_pages_recovery_ratio=1, clock="virtual"), "wall time"),
])
def test_bad_worker_configs_are_einval(config, reason, mmu):
    with pytest.raises(KvmError) as err:
        VmConfig(mmu=mmu, **config).validate()
    assert err.value.errno == errno.EINVAL and reason in str(err.value)


def test_the_period_defaults_to_an_hour_over_the_ratio_and_at_least_a_second():
    assert recovery_period_ms(60, 0) == 60_000           # KVM's default ratio: a minute
    assert recovery_period_ms(1 << 20, 0) == 1000
    assert recovery_period_ms(60, 250) == 250
