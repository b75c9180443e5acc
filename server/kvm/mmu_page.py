"""Page-table pages (`kvm_mmu_page`): 512 real 64-bit SPTEs in an `array('Q')`.

An SPTE points at its child table by pfn, so pages are registered by pfn in `PageTables`.
Beside its SPTEs a page above 4K keeps `children`: for each entry, the page its present
non-leaf SPTE links (what `spte_to_child_pt` computes from the SPTE), else None. The doors that
write SPTEs keep it in the same step as the write, so a walker that has read a present
non-leaf SPTE follows it without a lookup by pfn.

A page unlinked from its tree is torn down (every entry frozen) and freed only after an RCU
grace period; a freed page is poisoned: its entries hold POISON, its children are gone, and
any walker that reads it or follows an entry of it gets `UseAfterFree`.
"""

from __future__ import annotations

from array import array

from .errors import VmBugged
from .host_mm import PfnAllocator
from .spte import NONPRESENT
from .types import PG_LEVEL_4K, PT_ENTRIES

__all__ = ["MmuPage", "PageTables", "UseAfterFree", "POISON"]

POISON = 0x6B6B_6B6B_6B6B_6B6B            # what a freed page holds (looks present: a walk
                                          # that follows it must fail, see _FreedChildren)
FIRST_TABLE_PFN = 0x1000                  # kernel memory for tables: below guest memory
_FRESH = array("Q", [NONPRESENT]) * PT_ENTRIES


class UseAfterFree(VmBugged):
    """A walker read a page-table page after it was freed."""


class _FreedChildren:
    """The children of a freed page: following any of its entries is a use after free."""

    __slots__ = ("page",)

    def __init__(self, page: "MmuPage") -> None:
        self.page = page

    def __getitem__(self, index: int) -> "MmuPage":
        raise UseAfterFree(f"walk through entry {index} of freed {self.page!r}")


class MmuPage:
    __slots__ = ("spt", "children", "pfn", "level", "gfn", "as_id", "invalid", "freed", "is_root",
                 "root_refs", "nx_huge_page_disallowed")

    def __init__(self, pfn: int, level: int, gfn: int, as_id: int, is_root: bool) -> None:
        self.spt = array("Q", _FRESH)
        # A 4K-level table's entries are leaves or not present: it links no children.
        self.children: list[MmuPage | None] | None = \
            [None] * PT_ENTRIES if level > PG_LEVEL_4K else None
        self.pfn, self.level, self.gfn, self.as_id = pfn, level, gfn, as_id
        self.invalid = False          # role.invalid: a root that must not be used for new faults
        self.freed = False
        self.is_root = is_root
        self.root_refs = 2 if is_root else 0   # the creating vCPU's and the TDP MMU's own
        # Made by an instruction fetch under the NX huge page mitigation: a fault must not
        # replace this table with a huge leaf (`disallowed_hugepage_adjust`).
        self.nx_huge_page_disallowed = False

    def __repr__(self) -> str:
        return f"MmuPage(pfn={self.pfn:#x}, level={self.level}, gfn={self.gfn:#x})"


class PageTables:
    """Allocation, lookup by pfn and poisoning of page-table pages."""

    def __init__(self) -> None:
        self._pfns = PfnAllocator(FIRST_TABLE_PFN)
        self.by_pfn: dict[int, MmuPage] = {}
        self.freed = 0

    def alloc(self, level: int, gfn: int, as_id: int, is_root: bool = False) -> MmuPage:
        page = MmuPage(self._pfns.alloc(PG_LEVEL_4K), level, gfn, as_id, is_root)
        self.by_pfn[page.pfn] = page
        return page

    def free(self, page: MmuPage) -> None:
        if page.freed:
            raise VmBugged(f"{page!r} freed twice")
        page.freed = True
        page.spt[:] = array("Q", [POISON]) * PT_ENTRIES
        page.children = _FreedChildren(page)
        del self.by_pfn[page.pfn]
        self._pfns.free(page.pfn, PG_LEVEL_4K)
        self.freed += 1

    def child(self, pfn: int) -> MmuPage:
        page = self.by_pfn.get(pfn)
        if page is None:
            raise UseAfterFree(f"SPTE points at pfn {pfn:#x}, which is no page table")
        return page

    def __len__(self) -> int:
        return len(self.by_pfn)
