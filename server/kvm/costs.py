"""The cost table of virtual time: what each step of the model costs a simulated CPU, in ns.

A VM in virtual time (clock.py) charges these as its actors work. The defaults describe a
current x86 server running KVM with EPT; where each number comes from is in
docs/virtual-time.md. A VM may override any of them (`VmConfig.costs`), and `vmmu
calibrate` writes a cost file measured on the host's /dev/kvm.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from vmmu.cost_file import read_cost_file

from .errors import einval

__all__ = ["DEFAULT_COSTS", "Costs", "check_costs", "load_cost_file"]

DEFAULT_COSTS: Mapping[str, int] = MappingProxyType({
    # vCPU and exits
    "vmexit_entry": 500,          # a VM exit and the VM entry back: the hardware round trip
    "tlb_hit": 1,                 # a guest access that hits the TLB
    "ept_walk_level": 20,         # one level of the hardware's EPT walk on a TLB miss
    "tlb_flush_local": 100,       # INVEPT of this vCPU's context
    # fault path
    "fault_base": 400,            # kvm_mmu_page_fault's own work, exit decode to return
    "fast_pf": 150,               # fast_page_fault's walk and checks (cmpxchg apart)
    "memslot_lookup": 25,         # the memslot of a gfn
    "gup_fast": 120,              # get_user_pages_fast: the pfn of a mapped host page
    "gup_slow": 1500,             # the slow lookup: the host mm's fault path
    "page_alloc_4k": 250,         # a 4K page from the buddy allocator
    "page_zero_4k": 150,          # clearing it
    "page_alloc_2m": 2500,        # a THP
    "page_zero_2m": 60000,        # clearing 2 MiB
    "tdp_walk_level": 40,         # one level of the fault's walk under mmu_lock (tdp_mmu_map)
    "make_spte": 150,             # building and checking the new leaf (make_spte)
    "spte_cmpxchg": 20,           # one compare-and-exchange of an SPTE
    "spte_write": 5,              # one plain SPTE store under the write lock (a zap step)
    "table_alloc": 300,           # a page-table page from the MMU's caches, zeroed
    "table_free": 100,            # freeing one
    # the legacy MMU (shadow_mmu.py, rmap.py)
    "sp_hash_lookup": 40,         # finding a shadow page by gfn and role in the page hash
    "rmap_lock": 25,              # taking an rmap head's lock bit (cmpxchg) and releasing it
    "rmap_add": 30,               # pte_list_add: an entry into the head or a descriptor
    "rmap_remove": 40,            # pte_list_remove: finding the entry, moving the last in
    # locks, cache lines, IPIs, RCU
    "lock_acquire": 20,           # an uncontended rwlock acquire or release (an atomic op)
    "cacheline_transfer": 70,     # a contended line moving to this CPU (per other CPU on it)
    "ipi_send": 250,              # sending one IPI
    "ipi_receive": 1200,          # an IPI taken by a vCPU in guest mode: exit, flush, entry
    "rcu_grace_period": 20000,    # the shortest grace period synchronize_rcu waits
    # MMU notifier, aging, dirty logging, GPC
    "notifier_callback": 200,     # one invalidate_range_start or _end callback
    "age_spte": 10,               # reading and aging one SPTE
    "dirty_bitmap_set": 10,       # one bit set in a dirty bitmap
    "dirty_bitmap_word": 30,      # harvesting one 64-page word of a dirty bitmap
    "ring_push": 25,              # one dirty-ring entry
    "gpc_refresh": 300,           # a GPC refresh's own work (the pfn lookup apart)
    "host_op_page": 100,          # the host mm's work per 4K page of madvise/migrate/...
})


class Costs:
    """A cost table: every name of DEFAULT_COSTS as an attribute, in ns."""

    __slots__ = tuple(DEFAULT_COSTS)

    def __init__(self, overrides: Mapping[str, int] | None = None) -> None:
        check_costs(overrides or {})
        for name, ns in {**DEFAULT_COSTS, **(overrides or {})}.items():
            setattr(self, name, ns)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


def check_costs(overrides: Mapping[str, int]) -> None:
    """EINVAL for an unknown name or a cost that is not a non-negative integer of ns."""
    unknown = sorted(set(overrides) - set(DEFAULT_COSTS))
    if unknown:
        raise einval(f"unknown costs {unknown}; known: {sorted(DEFAULT_COSTS)}")
    for name, ns in overrides.items():
        if isinstance(ns, bool) or not isinstance(ns, int) or not 0 <= ns < 1 << 40:
            raise einval(f"cost {name} = {ns!r} is not a whole number of ns in 0..2^40")


def load_cost_file(path: str) -> dict[str, int]:
    """The overrides in a cost file (its format: `vmmu.cost_file`), checked: EINVAL for a
    file that is no cost file or names an unknown cost."""
    try:
        costs = read_cost_file(path)
    except ValueError as e:
        raise einval(str(e)) from None
    check_costs(costs)
    return costs
