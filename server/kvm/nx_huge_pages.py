"""The NX huge page mitigation: the list of possible NX huge pages.

Under `nx_huge_pages` (KVM's iTLB multihit mitigation) no huge leaf is executable
(`make_spte`), so an instruction fetch from memory mapped huge faults, and the fault maps
4K (`hugepage_adjust`: `huge_page_disallowed`). Every table such a fault links is marked
`nx_huge_page_disallowed`; while it is linked, no fault replaces it with a huge leaf, reads
and writes included (`disallowed_hugepage_adjust`, in `TdpMmu.map`). The tables it links
where a huge leaf could have been (`req_level` reaches the level of the entry) go on this
list, oldest first; `nx_lpage_splits` counts them. The recovery worker
(`TdpMmu.recover_nx_huge_pages`) zaps a fraction of the list so that the next faults that
are not fetches map those ranges huge again.

Invariant: a table is on the list only while it is linked and marked; unlinking it (a zap,
the teardown of a tree) takes it off (`unlink`).
"""

from __future__ import annotations

from .mmu_page import MmuPage
from .stats import VmStats

__all__ = ["PossibleNxHugePages"]


class PossibleNxHugePages:
    """`kvm->arch.possible_nx_huge_pages` of the TDP MMU, in the order tables were added."""

    def __init__(self, stats: VmStats) -> None:
        self.stat = stats
        self._pages: dict[MmuPage, None] = {}      # insertion-ordered: the oldest first

    def __len__(self) -> int:
        return len(self._pages)

    def oldest(self) -> MmuPage:
        return next(iter(self._pages))

    def track(self, page: MmuPage) -> None:
        """`track_possible_nx_huge_page`: a marked table where a huge leaf could be."""
        if page not in self._pages:
            self._pages[page] = None
            self.stat.nx_lpage_splits += 1

    def untrack(self, page: MmuPage) -> None:
        """`unaccount_nx_huge_page`: the table stays linked and marked no more."""
        page.nx_huge_page_disallowed = False
        if self._pages.pop(page, False) is None:
            self.stat.nx_lpage_splits -= 1

    def unlink(self, page: MmuPage) -> None:
        """`tdp_mmu_unlink_sp`'s part: a table leaving its tree leaves the list."""
        if page.nx_huge_page_disallowed:
            self.untrack(page)
