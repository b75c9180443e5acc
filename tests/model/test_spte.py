"""The EPT SPTE encoding (reference §1): bit positions, special values, constructors."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmmu.server.kvm import spte as S
from vmmu.server.kvm.types import PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K

PFN = st.integers(0, (1 << 40) - 1)
GEN = st.integers(0, (1 << 19) - 1)
LEVEL = st.sampled_from([PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G])


@pytest.mark.parametrize("mask, bit", [
    (S.READABLE, 0), (S.WRITABLE, 1), (S.EXECUTABLE, 2), (S.LARGE, 7), (S.ACCESSED, 8),
    (S.DIRTY, 9), (S.MMU_PRESENT, 11), (S.AD_DISABLED, 52), (S.HOST_WRITABLE, 57),
    (S.MMU_WRITABLE, 58), (S.SUPPRESS_VE, 63),
])
def test_bit_positions_follow_the_reference(mask, bit):
    assert mask == 1 << bit


def test_pfn_field_is_bits_12_to_51():
    assert S.BASE_ADDR_MASK == sum(1 << b for b in range(12, 52))


def test_special_values():
    assert S.NONPRESENT == 0x8000_0000_0000_0000
    assert S.FROZEN == 0x8000_0000_0000_05A0
    for value in (S.NONPRESENT, S.FROZEN):
        assert not S.is_shadow_present(value)
        assert not S.is_mmio(value)
        assert value & S.RWX == 0
    assert S.is_frozen(S.FROZEN) and not S.is_frozen(S.NONPRESENT)
    assert S.describe(S.FROZEN, PG_LEVEL_4K) == "frozen"
    assert S.describe(S.NONPRESENT, PG_LEVEL_2M) == "non-present"


@given(pfn=PFN, level=LEVEL, ad=st.booleans(), writable=st.booleans())
def test_make_leaf_round_trip(pfn, level, ad, writable):
    spte = S.make_leaf(pfn, level, host_writable=True, writable=writable, ad_enabled=ad)
    assert S.spte_to_pfn(spte) == pfn
    assert S.is_leaf_present(spte, level) and S.is_last(spte, level)
    assert S.describe(spte, level) == "leaf"
    assert S.is_large(spte) == (level > PG_LEVEL_4K)
    assert spte & S.READABLE and spte & S.EXECUTABLE
    assert S.is_writable(spte) == writable
    assert S.is_host_writable(spte) and S.is_mmu_writable(spte)
    assert S.is_accessed(spte)                      # not a prefetch: starts young
    assert S.ad_disabled(spte) == (not ad)
    assert S.is_dirty(spte) == (writable and ad)    # D is preset only where hardware has D
    assert spte & S.SUPPRESS_VE
    assert S.check_writable_invariants(spte)


def test_read_only_leaf_is_000():
    spte = S.make_leaf(0x1234, PG_LEVEL_4K, host_writable=False, writable=True, ad_enabled=True)
    assert not (S.is_writable(spte) or S.is_mmu_writable(spte) or S.is_host_writable(spte))
    assert not S.is_dirty(spte)


@pytest.mark.parametrize("ad", [True, False])
def test_prefetched_leaf_starts_old(ad):
    spte = S.make_leaf(7, PG_LEVEL_4K, host_writable=True, writable=True, ad_enabled=ad,
                       prefetch=True)
    assert not S.is_accessed(spte)
    assert S.is_shadow_present(spte)
    assert S.is_access_track(spte) == (not ad)


@given(pfn=PFN, ad=st.booleans())
def test_make_nonleaf(pfn, ad):
    spte = S.make_nonleaf(pfn, ad)
    assert spte & S.RWX == S.RWX
    assert S.is_shadow_present(spte) and not S.is_large(spte)
    assert S.spte_to_pfn(spte) == pfn
    assert S.describe(spte, PG_LEVEL_2M) == "table"
    assert S.is_accessed(spte) == ad
    assert S.ad_disabled(spte) == (not ad)


@given(gfn=PFN, generation=GEN, level=LEVEL)
def test_make_mmio_round_trip(gfn, generation, level):
    spte = S.make_mmio(gfn, generation)
    assert S.is_mmio(spte)
    assert S.describe(spte, level) == "mmio"
    assert not S.is_shadow_present(spte)
    assert S.mmio_gfn(spte) == gfn
    assert S.mmio_generation(spte) == generation
    assert spte & S.RWX == S.WRITABLE | S.EXECUTABLE     # W+X without R: a misconfiguration


@pytest.mark.parametrize("generation, bits", [
    (0xFF, 0xFF << 3),                    # low 8 generation bits in 3-10
    (1 << 8, 1 << 52),                    # high 11 in 52-62
    ((1 << 19) - 1, (0xFF << 3) | (0x7FF << 52)),
])
def test_mmio_generation_bit_placement(generation, bits):
    assert S.make_mmio(0, generation) == S.WRITABLE | S.EXECUTABLE | bits


@given(level=st.sampled_from([PG_LEVEL_2M, PG_LEVEL_1G]), index=st.integers(0, 511),
       ad=st.booleans())
def test_make_small_advances_the_pfn(level, index, ad):
    huge_pfn = 0x40000 * 3                  # aligned for a 1G page, hence for 2M too
    huge = S.make_leaf(huge_pfn, level, host_writable=True, writable=True, ad_enabled=ad)
    child = S.make_small(huge, level, index)
    per_child = 1 << (9 * (level - 2))
    assert S.spte_to_pfn(child) == huge_pfn + index * per_child
    assert S.is_large(child) == (level - 1 > PG_LEVEL_4K)
    assert child & ~(S.BASE_ADDR_MASK | S.LARGE) == huge & ~(S.BASE_ADDR_MASK | S.LARGE)


@pytest.mark.parametrize("writable", [True, False])
def test_access_tracking_with_ad_bits_clears_only_accessed(writable):
    spte = S.make_leaf(9, PG_LEVEL_4K, host_writable=True, writable=writable, ad_enabled=True)
    aged = S.mark_for_access_track(spte)
    assert aged == spte & ~S.ACCESSED
    assert not S.is_access_track(aged)
    assert S.restore_access_track(aged) == spte


@pytest.mark.parametrize("writable", [True, False])
def test_access_tracking_without_ad_bits_stashes_r_and_x(writable):
    spte = S.make_leaf(9, PG_LEVEL_4K, host_writable=True, writable=writable, ad_enabled=False)
    aged = S.mark_for_access_track(spte)
    assert aged & (S.RWX | S.ACCESSED) == 0
    assert S.is_access_track(aged) and S.is_shadow_present(aged)
    assert (aged >> 54) & 1 and (aged >> 56) & 1          # R and X saved
    assert S.spte_to_pfn(aged) == 9 and S.is_mmu_writable(aged)
    restored = S.restore_access_track(aged)
    assert restored == spte & ~S.WRITABLE                 # W is not saved: the fast path
    assert S.check_writable_invariants(restored)          # restores it (MMU-writable kept)


def test_aging_an_aged_spte_keeps_its_saved_bits():
    spte = S.make_leaf(9, PG_LEVEL_4K, host_writable=True, writable=False, ad_enabled=False)
    aged = S.mark_for_access_track(spte)
    assert S.mark_for_access_track(aged) == aged
    assert S.restore_access_track(S.mark_for_access_track(aged)) == spte


def _leaf(ad=True, writable=True, dirty=True):
    spte = S.make_leaf(5, PG_LEVEL_4K, host_writable=True, writable=writable, ad_enabled=ad)
    return spte if dirty else spte & ~S.DIRTY


@pytest.mark.parametrize("spte, level, expected", [
    (_leaf(), PG_LEVEL_4K, False),                               # W and D: nothing volatile
    (_leaf(dirty=False), PG_LEVEL_4K, True),                     # the CPU may set D
    (_leaf(writable=False), PG_LEVEL_4K, True),                  # fast #PF may set W
    (_leaf(ad=False), PG_LEVEL_4K, True),                        # aging may access-track it
    (_leaf() & ~S.ACCESSED, PG_LEVEL_4K, False),                 # A alone does not count
    (S.make_leaf(5, PG_LEVEL_4K, host_writable=False, writable=False, ad_enabled=True),
     PG_LEVEL_4K, False),
    (S.make_nonleaf(5, False), PG_LEVEL_2M, False),              # not a leaf
    (S.NONPRESENT, PG_LEVEL_4K, False),
    (S.make_mmio(5, 1), PG_LEVEL_4K, False),
])
def test_needs_atomic_update(spte, level, expected):
    assert S.needs_atomic_update(spte, level) == expected


@pytest.mark.parametrize("new, flush", [
    (_leaf() & ~S.MMU_WRITABLE & ~S.WRITABLE, True),             # write tracking: flush now
    (_leaf() & ~S.WRITABLE, False),                              # dirty logging: no flush
    (_leaf() & ~S.ACCESSED, False),                              # aging
    (_leaf() & ~S.DIRTY, False),
])
def test_leaf_change_needs_tlb_flush(new, flush):
    assert S.leaf_change_needs_tlb_flush(_leaf(), new) == flush


def test_no_flush_when_the_old_spte_was_not_mmu_writable():
    ro = S.make_leaf(5, PG_LEVEL_4K, host_writable=False, writable=False, ad_enabled=True)
    assert not S.leaf_change_needs_tlb_flush(ro, S.NONPRESENT)


@pytest.mark.parametrize("host", [0, 1])
@pytest.mark.parametrize("mmu", [0, 1])
@pytest.mark.parametrize("w", [0, 1])
def test_writable_invariants(host, mmu, w):
    spte = _leaf() & ~(S.HOST_WRITABLE | S.MMU_WRITABLE | S.WRITABLE)
    spte |= (S.HOST_WRITABLE if host else 0) | (S.MMU_WRITABLE if mmu else 0) | \
        (S.WRITABLE if w else 0)
    legal = {(1, 1, 1), (1, 1, 0), (1, 0, 0), (0, 0, 0)}
    assert S.check_writable_invariants(spte) == ((host, mmu, w) in legal)
