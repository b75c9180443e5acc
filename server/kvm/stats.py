"""Statistics with KVM's names (binary stats descriptors), per VM and per vCPU.

Names KVM has are KVM's; the few vmmu adds (`accesses`, `ept_violations`, `ept_misconfigs`,
`pf_retry`, `tdp_mmu_pages`, `mmio_spte_hits`) are listed in docs/stats.md.
"""

from __future__ import annotations

__all__ = ["VmStats", "VcpuStats"]


class _Stats:
    __slots__ = ()

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class VmStats(_Stats):
    __slots__ = ("remote_tlb_flush_requests", "remote_tlb_flush", "pages_4k", "pages_2m",
                 "pages_1g", "nx_lpage_splits", "tdp_mmu_pages", "mmu_invalidate_seq",
                 "tdp_mmu_yields",
                 "mmu_shadow_zapped", "mmu_cache_miss", "max_mmu_rmap_size",
                 "mmu_shadow_pages", "shadow_mmu_yields",
                 "invalidations_held", "invalidations_lease_expired",
                 "invalidations_client_gone",
                 "gpc_invalidations", "gpc_refreshes", "gpc_refresh_retries",
                 "gpc_refresh_wait_ns")

    def account_leaf(self, level: int, delta: int) -> None:
        """The pages_4k/2m/1g stats: leaves mapped at each level."""
        if level == 1:
            self.pages_4k += delta
        elif level == 2:
            self.pages_2m += delta
        else:
            self.pages_1g += delta


class VcpuStats(_Stats):
    __slots__ = ("pf_taken", "pf_fixed", "pf_emulate", "pf_spurious", "pf_fast",
                 "pf_mmio_spte_created", "pf_guest", "pf_retry", "tlb_flush", "exits",
                 "mmio_exits", "ept_violations", "ept_misconfigs", "mmio_spte_hits",
                 "accesses", "halt_exits")
