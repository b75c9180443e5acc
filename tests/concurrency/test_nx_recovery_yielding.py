"""NX huge page recovery yields mmu_lock to a waiter, as `kvm_recover_nx_huge_pages` does
(`rwlock_needbreak`), after flushing (and, on the legacy MMU, committing) what it zapped."""

import pytest

from test_rmap_walk_yielding import contended
from vmmu.server.kvm import AccessBatch, AccessKind, Backing, Kvm, VmConfig

MIB = 1 << 20
RANGES = 32                       # 2M ranges, one fetch in each: 32 possible NX huge pages


@pytest.mark.parametrize("mmu", ["tdp", "legacy"])
async def test_recovery_flushes_then_yields_to_a_waiter_and_recovers_everything(mmu):
    vm = Kvm().create_vm(VmConfig(name="nx-yield", mmu=mmu, nx_huge_pages=True))
    region = vm.mmap(RANGES * 2 * MIB, Backing.THP)
    await vm.madvise_populate_write(region.hva, region.size)
    await vm.set_user_memory_region(0, 0, 0, region.size, region.hva)
    vcpu = vm.create_vcpu(0)
    result = await vcpu.run(AccessBatch.build((i * 2 * MIB, AccessKind.EXEC, 8, None)
                                              for i in range(RANGES)))
    assert result.completed == RANGES
    assert vm.stat.nx_lpage_splits == RANGES
    flushes = vm.stat.remote_tlb_flush_requests
    left, flushed = await contended(
        vm, lambda: vm.recover_nx_huge_pages(1),
        lambda: (vm.stat.nx_lpage_splits, vm.stat.remote_tlb_flush_requests - flushes))
    # The waiter ran in the middle of the pass, after a flush of what was zapped so far.
    assert 0 < left < RANGES
    assert flushed >= 1
    assert vm.stat.nx_lpage_splits == 0
    if mmu == "legacy":
        assert vm.stats()["shadow_mmu_yields"] >= 1
