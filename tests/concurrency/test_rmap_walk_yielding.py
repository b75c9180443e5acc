"""The legacy MMU's rmap walks yield mmu_lock as `walk_slot_rmaps` does: to a waiter, or
after a batch of heads; a zap flushes before it lets anyone in."""

import asyncio

from vmmu.server.kvm import AccessBatch, AccessKind, Backing, Kvm, VmConfig
from vmmu.server.kvm import spte as S
from vmmu.server.kvm.memslots import KVM_MEM_LOG_DIRTY_PAGES
from vmmu.server.kvm.rmap_aging import young_leaves
from vmmu.server.kvm.tdp_mmu import YIELD_BATCH


async def legacy_guest(pages: int, ad_bits: bool = True, kind=AccessKind.READ):
    vm = Kvm().create_vm(VmConfig(name="yield", mmu="legacy", ad_bits=ad_bits))
    region = vm.mmap(pages << 12, Backing.PAGE_4K)
    await vm.set_user_memory_region(0, 0, 0, pages << 12, region.hva)
    vcpu = vm.create_vcpu(0)
    result = await vcpu.run(AccessBatch.build((g << 12, kind, 1, b"x" if kind is
                                               AccessKind.WRITE else None)
                                              for g in range(pages)))
    assert result.completed == pages
    return vm, vcpu, region


async def contended(vm, operation, during):
    """Run `operation` while a task waits for mmu_lock for write; `during()` runs when that
    task gets it. Returns what `during` returned."""
    await vm.mmu_lock.acquire_read()                  # held: the operation must queue
    seen = []

    async def waiter():
        async with vm.mmu_lock.write:
            seen.append(during())

    work = asyncio.create_task(operation())
    await asyncio.sleep(0)
    assert vm.mmu_lock.statistics().waiters == 1
    other = asyncio.create_task(waiter())
    await asyncio.sleep(0)
    vm.mmu_lock.release_read()                        # the operation runs, the waiter waits
    await asyncio.gather(work, other)
    return seen[0]


def writable_leaves(vm) -> int:
    return sum(1 for sp in vm.shadow.active for s in sp.spt
               if S.is_leaf_present(s, sp.level) and s & S.WRITABLE)


async def test_a_notifier_zap_flushes_then_yields_to_a_waiter_and_zaps_everything():
    pages = 1024
    vm, _, region = await legacy_guest(pages)
    flushes = vm.stat.remote_tlb_flush_requests
    mapped, flushed = await contended(
        vm, lambda: vm.munmap(region.hva, region.size),
        lambda: (vm.stat.pages_4k, vm.stat.remote_tlb_flush_requests - flushes))
    # The waiter ran in the middle of the zap, after a flush of what was zapped so far.
    assert 0 < mapped < pages
    assert flushed >= 1
    assert vm.stat.pages_4k == 0
    assert vm.stats()["shadow_mmu_yields"] >= 1


async def test_aging_with_the_write_lock_yields_and_ages_everything():
    pages = 1024
    vm, _, region = await legacy_guest(pages, ad_bits=False)      # A/D off: the write lock
    slot = next(iter(vm.memslot_sets[0]))

    def young() -> int:
        return sum(1 for _ in young_leaves(vm.shadow, slot, slot.base_gfn, slot.end_gfn))

    assert young() == pages
    young_then = await contended(vm, lambda: vm.clear_young(region.hva, region.hva +
                                                            region.size), young)
    assert 0 < young_then < pages
    assert young() == 0
    assert vm.stats()["shadow_mmu_yields"] >= 1


async def test_write_protecting_a_slot_yields_and_protects_everything():
    pages = 1024
    vm, _, region = await legacy_guest(pages, kind=AccessKind.WRITE)
    assert writable_leaves(vm) == pages
    writable_then = await contended(
        vm, lambda: vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, region.size,
                                              region.hva),
        lambda: writable_leaves(vm))
    assert 0 < writable_then < pages
    assert writable_leaves(vm) == 0
    assert vm.stats()["shadow_mmu_yields"] >= 1


async def test_an_uncontended_walk_yields_only_after_a_batch_of_heads():
    pages = 1024
    vm, _, region = await legacy_guest(pages)
    await vm.munmap(region.hva, region.size)
    assert vm.stat.pages_4k == 0
    assert pages + 2 + 1 < YIELD_BATCH                 # heads of 4K, 2M and 1G
    assert vm.stats()["shadow_mmu_yields"] == 0
    pages = 2 * YIELD_BATCH
    vm, _, region = await legacy_guest(pages)
    await vm.munmap(region.hva, region.size)
    assert vm.stat.pages_4k == 0
    assert vm.stats()["shadow_mmu_yields"] >= 1
