"""The values the vmmu clients return: frozen dataclasses and enums, never protobuf messages.

They mirror the model's result types (docs/model-api.md) field for field, so a script
reads the same whether it embeds the model or talks to a server.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "KVM_MEM_LOG_DIRTY_PAGES", "KVM_MEM_READONLY", "KVM_MEM_GUEST_MEMFD",
    "KVM_MEMORY_ATTRIBUTE_PRIVATE", "KVM_MEMORY_EXIT_FLAG_PRIVATE", "FALLOC_FL_KEEP_SIZE",
    "FALLOC_FL_PUNCH_HOLE", "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
    "KVM_CAP_DIRTY_LOG_RING", "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP",
    "KVM_INTERNAL_ERROR_EMULATION",
    "Backing", "ExitReason", "HoldState", "Protection",
    "VmConfig", "VmInfo", "Spte", "HostRegion", "Memslot", "VcpuInfo", "Exit", "RunResult",
    "HeldInvalidation", "Invalidations", "TraceEvent", "GpcState", "Gpc", "DirtyGfn",
    "ClientTls", "GuestMemfd", "GuestMemfdBinding",
]

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
# Private memory: the memslot flag that binds a guest_memfd, the private attribute
# (Vm.set_memory_attributes), the flag of a private MEMORY_FAULT exit, fallocate's modes.
KVM_MEM_GUEST_MEMFD = 1 << 2
KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3
KVM_MEMORY_EXIT_FLAG_PRIVATE = 1 << 3
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
# KVM_ENABLE_CAP capabilities a VM takes (Vm.enable_cap) and KVM_INTERNAL_ERROR_EMULATION,
# the suberror of an INTERNAL_ERROR exit for a fetch the emulator cannot make.
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_DIRTY_LOG_RING = 192
KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP = 225
KVM_INTERNAL_ERROR_EMULATION = 1


@dataclass(frozen=True)
class ClientTls:
    """TLS to the server, in PEM bytes: the CA to trust (None: the system's roots), and
    for mutual TLS the client's own certificate chain and key."""

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None


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
    DIRTY_RING_FULL = "dirty_ring_full"
    HLT = "hlt"


class Protection(enum.Enum):
    """The prot of mprotect(2) (on x86 write implies read)."""

    NONE = "none"
    READ = "read"
    READ_WRITE = "read_write"


class HoldState(enum.Enum):
    """Where a held invalidation is in its life: HELD, then how it ended."""

    HELD = "held"
    ENDED_BY_CLIENT = "ended_by_client"
    LEASE_EXPIRED = "lease_expired"
    CLIENT_GONE = "client_gone"
    VM_DESTROYED = "vm_destroyed"


@dataclass(frozen=True, slots=True)
class VmConfig:
    """`schedule_seed` None: no deterministic schedule; `debug`: the debug knobs on;
    `gpc_policy`: what makes a gfn-to-pfn cache refresh retry, "global" or "range";
    dirty logging: `eager_page_split`, `manual_dirty_log_protect` (bits 1 ENABLE, 2
    INITIALLY_SET), `dirty_ring_size` (bytes per vCPU, 0: bitmaps only),
    `dirty_ring_with_bitmap`; `fast_page_fault`. Virtual time: `clock` ("wall" or
    "virtual"), `costs` (the cost overrides given at creation, (name, ns) pairs sorted
    by name); the policies `fault_lock` ("read" or "write"), `table_free` ("rcu" or
    "write_section"), `aging_lock` ("none", "read" or "write"), `zap_leafs_only`; `mmu`, "tdp" or "legacy";
    `nx_huge_pages`, the NX huge page mitigation, and its recovery worker's
    `nx_huge_pages_recovery_ratio` (0: none) and `nx_huge_pages_recovery_period_ms`."""

    max_vcpus: int
    tdp_levels: int
    ad_bits: bool
    name: str
    schedule_seed: int | None
    sanitizers: bool
    debug: frozenset[str]
    gpc_policy: str = "global"
    eager_page_split: bool = True
    manual_dirty_log_protect: int = 0
    dirty_ring_size: int = 0
    dirty_ring_with_bitmap: bool = False
    fast_page_fault: bool = True
    clock: str = "wall"
    costs: tuple[tuple[str, int], ...] = ()
    fault_lock: str = "read"
    table_free: str = "rcu"
    aging_lock: str = "none"
    zap_leafs_only: bool = True
    mmu: str = "tdp"
    nx_huge_pages: bool = False
    nx_huge_pages_recovery_ratio: int = 0
    nx_huge_pages_recovery_period_ms: int = 0


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
    zero_page: bool = False


@dataclass(frozen=True, slots=True)
class HostRegion:
    hva: int
    size: int
    backing: Backing
    writable: bool
    populated_4k_pages: int
    zero_pages: int = 0


@dataclass(frozen=True, slots=True)
class Memslot:
    as_id: int
    id: int
    flags: int
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    guest_memfd: int = 0             # with KVM_MEM_GUEST_MEMFD: the fd and offset bound
    guest_memfd_offset: int = 0

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
    """How a run step returned. For MMIO, MEMORY_FAULT and an INTERNAL_ERROR of suberror
    KVM_INTERNAL_ERROR_EMULATION, `gpa`, `length` and `is_write` describe the access at
    index `completed`; `data` holds an MMIO write's bytes; `suberror` is 0 for a dead VM.
    A MEMORY_FAULT of a private/shared mismatch reports the page (`gpa` page aligned,
    `length` 4096) and `flags` KVM_MEMORY_EXIT_FLAG_PRIVATE if the access was private."""

    reason: ExitReason
    gpa: int
    length: int
    is_write: bool
    data: bytes
    errno: int
    message: str
    suberror: int = 0
    flags: int = 0


@dataclass(frozen=True, slots=True)
class RunResult:
    """`completed` counts from the start of the batch; `read_data` is the data of every
    WITH_DATA read of the batch completed so far, concatenated in order. In virtual time
    `start_ns` is when the step entered the guest and `end_ns` the vCPU's time when it
    returned (both 0 in wall time)."""

    completed: int
    exit: Exit
    read_data: bytes
    start_ns: int = 0
    end_ns: int = 0


@dataclass(frozen=True, slots=True)
class HeldInvalidation:
    """An MMU-notifier invalidation of hva [start, end) that a client holds or held;
    `lease_s` is None for a hold of a `hold_invalidation` stream."""

    id: int
    start: int
    end: int
    state: HoldState
    lease_s: float | None


@dataclass(frozen=True, slots=True)
class Invalidations:
    """The invalidations a VM holds now, and how the latest ones ended (oldest first)."""

    held: list[HeldInvalidation]
    ended: list[HeldInvalidation]


@dataclass(frozen=True, slots=True)
class TraceEvent:
    """One tracepoint hit. `seq` counts the VM's events in emission order;
    `dropped_before` is how many events this stream lost just before this one because
    its reader fell behind. `virtual_ns` is the emitter's virtual time for a VM in virtual
    time, None in wall time."""

    seq: int
    time_ns: int
    vm_id: int
    event: str
    fields: Mapping[str, int | str | bool]
    dropped_before: int
    virtual_ns: int | None = None


class GpcState(enum.Enum):
    """Where a gfn-to-pfn cache is in its life."""

    INACTIVE = "inactive"
    ACTIVE_INVALID = "active-invalid"
    ACTIVE_VALID = "active-valid"


@dataclass(frozen=True, slots=True)
class GuestMemfdBinding:
    """The range [offset, offset + size) of a guest_memfd bound to memslot `slot`
    (as_id << 16 | id)."""

    slot: int
    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class GuestMemfd:
    """A guest_memfd: its fd, size and flags, the pages allocated in it, its bindings."""

    fd: int
    size: int
    flags: int
    pages: int
    bindings: tuple[GuestMemfdBinding, ...]


@dataclass(frozen=True, slots=True)
class Gpc:
    """A gfn-to-pfn cache. `uhva` is None until the gpa resolved to one, `pfn` None while
    the cache holds none; `generation` is the memslot generation of that resolution;
    `retries` counts pfn lookups an invalidation made it throw away, `wait_ns` the time
    refreshes waited for invalidations to end."""

    id: int
    gpa: int
    uhva: int | None
    pfn: int | None
    state: GpcState
    active: bool
    valid: bool
    generation: int
    refreshes: int
    retries: int
    wait_ns: int


@dataclass(frozen=True, slots=True)
class SeedOutcome:
    """What one seed of an exploration found: the oracle that fired and its report."""

    seed: int
    violation: str
    oracle: str
    gfn: int
    trace: str
    points: int


@dataclass(frozen=True, slots=True)
class Exploration:
    """An exploration's result: the seeds run (up to the lowest violating one), that
    seed's outcome or None if every seed passed, and the workers that died meanwhile."""

    seeds_run: int
    first_violation: SeedOutcome | None
    workers_lost: int


@dataclass(frozen=True, slots=True)
class DirtyGfn:
    """One dirty ring entry: page `offset` (in pages from the slot's first gfn) of memslot
    `slot` (`as_id << 16 | id`)."""

    slot: int
    offset: int
