"""Units and small enums shared by every layer of the model.

Addresses are plain ints at run time; the NewTypes say which address space a value lives in,
so that a reader can hold the kernel source beside ours: a gpa is a guest physical address, a
gfn its frame number, an hva a host (VMM process) virtual address, a pfn a host frame number.
"""

from __future__ import annotations

import enum
from typing import NewType

__all__ = [
    "Gpa", "Gfn", "Hva", "Pfn",
    "PAGE_SHIFT", "PAGE_SIZE", "PAGE_MASK", "PT_ENTRIES", "TASK_SIZE_MAX",
    "PG_LEVEL_4K", "PG_LEVEL_2M", "PG_LEVEL_1G", "MAX_HUGEPAGE_LEVEL",
    "level_shift", "LEVEL_SHIFT", "pages_per_level", "gfn_round_down",
    "Backing", "AccessKind",
]

Gpa = NewType("Gpa", int)
Gfn = NewType("Gfn", int)
Hva = NewType("Hva", int)
Pfn = NewType("Pfn", int)

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = ~(PAGE_SIZE - 1)
PT_ENTRIES = 512          # SPTEs in one page-table page
PT_INDEX_BITS = 9
# The end of the user address space of a 4-level x86-64 host: one page below 2^47 (the
# last page is a guard against speculation past the canonical boundary). mmap places
# nothing above it, and a memslot's hva range must end at or below it (`access_ok`).
TASK_SIZE_MAX = (1 << 47) - PAGE_SIZE

PG_LEVEL_4K = 1
PG_LEVEL_2M = 2
PG_LEVEL_1G = 3
MAX_HUGEPAGE_LEVEL = PG_LEVEL_1G


def level_shift(level: int) -> int:
    """Number of gfn bits covered below an SPTE at `level` (0 for a 4K leaf)."""
    return (level - 1) * PT_INDEX_BITS


# `level_shift` by level (index 0 unused), for the walks that take it at every level.
LEVEL_SHIFT = (0,) + tuple(level_shift(level) for level in range(1, 6))


def pages_per_level(level: int) -> int:
    """4K pages mapped by one leaf at `level`: 1, 512, 262144."""
    # `level_shift` spelled out: the host's side of a fault asks this several times.
    return 1 << (level - 1) * PT_INDEX_BITS


def gfn_round_down(gfn: int, level: int) -> int:
    return gfn & ~(pages_per_level(level) - 1)


class Backing(enum.Enum):
    """How the host backs an hva range: what `host_pfn_mapping_level` can report for it."""

    PAGE_4K = "4k"          # ordinary anonymous memory
    THP = "thp"             # transparent huge pages: 2M host mappings where a whole 2M fits
    HUGETLB_1G = "hugetlb_1g"  # hugetlbfs with 1G pages: the range must be 1G aligned

    @property
    def page_level(self) -> int:
        return _BACKING_LEVEL[self.value]


class AccessKind(enum.IntEnum):
    """The kind of one guest access, as the low two bits of its op byte on the wire."""

    READ = 1
    WRITE = 2
    EXEC = 3


_BACKING_LEVEL = {Backing.PAGE_4K.value: PG_LEVEL_4K, Backing.THP.value: PG_LEVEL_2M,
                  Backing.HUGETLB_1G.value: PG_LEVEL_1G}
