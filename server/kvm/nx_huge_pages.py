"""The NX huge page mitigation: its rules, and the list of possible NX huge pages.

Under `nx_huge_pages` (KVM's iTLB multihit mitigation) no huge leaf is executable
(`make_spte`: `executable`), so an instruction fetch from memory mapped huge faults, and the
fault maps 4K (`hugepage_adjust`: `huge_page_disallowed`). Every table such a fault links
is marked `nx_huge_page_disallowed`; while it is linked, no fault replaces it with a huge
leaf, reads and writes included (`disallowed_hugepage_adjust`, in the `map` of both MMUs).
The tables it links where a huge leaf could have been (`req_level` reaches the level of the
entry) go on this list, oldest first (`account_nx_huge_page`); `nx_lpage_splits` counts
them. The recovery worker (`recover_nx_huge_pages` of either MMU, choosing its pages with
`recover`) zaps a fraction of the list so that the next faults that are not fetches map
those ranges huge again. Both MMUs keep the list the same way; a VM runs one of them.

Invariant: a table is on the list only while it is marked and not zapped; zapping it (the
TDP MMU: unlinking it, or the teardown of its tree; the legacy MMU:
`kvm_mmu_prepare_zap_page`) takes it off (`unlink`). A legacy shadow page unlinked from its
parent but still in the hash (a zapped parent) stays on the list, as in KVM.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from .errors import VmBugged
from .mmu_internal import PageFault
from .mmu_page import MmuPage
from .spte import MMU_PRESENT, PRESENT_LARGE
from .stats import VmStats
from .types import PG_LEVEL_4K, pages_per_level

if TYPE_CHECKING:
    from .memslots import Memslots

__all__ = ["PossibleNxHugePages", "disallowed_hugepage_adjust", "executable"]


def executable(level: int, nx_huge_pages: bool) -> bool:
    """`make_spte`'s rule: under the mitigation a huge leaf is never executable."""
    return level == PG_LEVEL_4K or not nx_huge_pages


def disallowed_hugepage_adjust(fault: PageFault, table: MmuPage, index: int, spte: int
                               ) -> bool:
    """`disallowed_hugepage_adjust`: the fault would make a huge leaf at entry `index` of
    `table` (read as `spte`), where a table a fetch linked under the mitigation is: map one
    level lower instead (the pfn gets back the gfn's bits of that level). Whether it did."""
    level = table.level
    if level == PG_LEVEL_4K or level != fault.goal_level or \
            spte & PRESENT_LARGE != MMU_PRESENT or \
            not table.children[index].nx_huge_page_disallowed:
        return False
    fault.pfn |= fault.gfn & (pages_per_level(level) - pages_per_level(level - 1))
    fault.goal_level = level - 1
    return True


class PossibleNxHugePages:
    """`kvm->arch.possible_nx_huge_pages` of the VM's MMU, in the order tables were added."""

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

    def account(self, page: MmuPage, possible: bool) -> None:
        """`account_nx_huge_page`: a fetch linked `page`; `possible` when a huge leaf
        could have been where it is (a page linked again is tracked once)."""
        page.nx_huge_page_disallowed = True
        if possible:
            self.track(page)

    def untrack(self, page: MmuPage) -> None:
        """`unaccount_nx_huge_page`: the table stays linked and marked no more."""
        page.nx_huge_page_disallowed = False
        if self._pages.pop(page, False) is None:
            self.stat.nx_lpage_splits -= 1

    def unlink(self, page: MmuPage) -> None:
        """`tdp_mmu_unlink_sp`'s and `__kvm_mmu_prepare_zap_page`'s part: a zapped table
        leaves the list."""
        if page.nx_huge_page_disallowed:
            self.untrack(page)

    def recover(self, memslot_sets: "list[Memslots]", ratio: int
                ) -> Iterator[tuple[MmuPage, bool]]:
        """`kvm_recover_nx_huge_pages`' choice: the oldest ceil(n / ratio) of the n pages,
        each with whether to zap it. A page whose memslot logs dirty pages would fault back
        4K: it is only unaccounted here (turning logging off recovers it). The caller zaps
        each page it is told to before asking for the next, which takes it off the list."""
        for _ in range(-(-len(self._pages) // ratio)):
            if not self._pages:
                return
            sp = self.oldest()
            if not sp.nx_huge_page_disallowed:
                raise VmBugged(f"{sp!r} is a possible NX huge page but not disallowed")
            slot = memslot_sets[sp.as_id].lookup(sp.gfn)
            if slot is not None and slot.dirty_logging:
                self.untrack(sp)
                yield sp, False
                continue
            yield sp, True
            if sp in self._pages:
                raise VmBugged(f"{sp!r} was zapped for NX recovery but is still on the list")
