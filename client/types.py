"""The values the vmmu clients return: frozen dataclasses and enums, never protobuf messages.

They mirror the model's result types (docs/model-api.md) field for field, so a script
reads the same whether it embeds the model or talks to a server.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "KVM_MEM_LOG_DIRTY_PAGES", "KVM_MEM_READONLY",
    "Backing", "ExitReason",
    "VmConfig", "VmInfo", "Spte", "HostRegion", "Memslot", "VcpuInfo", "Exit", "RunResult",
]

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1


class Backing(enum.Enum):
    """The host pages behind a region: the largest mapping level the host can offer."""

    PAGE_4K = "4k"
    THP = "thp"
    HUGETLB_1G = "hugetlb_1g"


class ExitReason(enum.Enum):
    """Why a run step returned."""

    DONE = "done"
    MMIO = "mmio"
    MEMORY_FAULT = "memory_fault"
    INTERNAL_ERROR = "internal_error"


@dataclass(frozen=True, slots=True)
class VmConfig:
    max_vcpus: int
    tdp_levels: int
    ad_bits: bool
    name: str


@dataclass(frozen=True, slots=True)
class VmInfo:
    id: int
    name: str
    config: VmConfig
    nr_vcpus: int
    nr_memslots: int
    nr_host_regions: int
    dead: bool


@dataclass(frozen=True, slots=True)
class Spte:
    """One entry on a walk of the TDP page tables; `kind` is one of "non-present",
    "frozen", "mmio", "table", "leaf"."""

    level: int
    gfn: int
    index: int
    spte: int
    kind: str
    pfn: int
    readable: bool
    writable: bool
    executable: bool
    large: bool
    accessed: bool
    dirty: bool
    host_writable: bool
    mmu_writable: bool


@dataclass(frozen=True, slots=True)
class HostRegion:
    hva: int
    size: int
    backing: Backing
    writable: bool
    populated_4k_pages: int


@dataclass(frozen=True, slots=True)
class Memslot:
    as_id: int
    id: int
    flags: int
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int

    @property
    def slot(self) -> int:
        """The `slot` argument of set_user_memory_region that names this memslot."""
        return self.as_id << 16 | self.id


@dataclass(frozen=True, slots=True)
class VcpuInfo:
    id: int
    running: bool
    mmio_pending: bool


@dataclass(frozen=True, slots=True)
class Exit:
    """How a run step returned. For MMIO and MEMORY_FAULT, `gpa`, `length` and `is_write`
    describe the access at index `completed`; `data` holds an MMIO write's bytes."""

    reason: ExitReason
    gpa: int
    length: int
    is_write: bool
    data: bytes
    errno: int
    message: str


@dataclass(frozen=True, slots=True)
class RunResult:
    """`completed` counts from the start of the batch; `read_data` is the data of every
    WITH_DATA read of the batch completed so far, concatenated in order."""

    completed: int
    exit: Exit
    read_data: bytes
