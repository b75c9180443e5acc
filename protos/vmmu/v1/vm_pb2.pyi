from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Clock(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CLOCK_UNSPECIFIED: _ClassVar[Clock]
    CLOCK_WALL: _ClassVar[Clock]
    CLOCK_VIRTUAL: _ClassVar[Clock]

class FaultLock(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FAULT_LOCK_UNSPECIFIED: _ClassVar[FaultLock]
    FAULT_LOCK_READ: _ClassVar[FaultLock]
    FAULT_LOCK_WRITE: _ClassVar[FaultLock]

class TableFree(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TABLE_FREE_UNSPECIFIED: _ClassVar[TableFree]
    TABLE_FREE_RCU: _ClassVar[TableFree]
    TABLE_FREE_WRITE_SECTION: _ClassVar[TableFree]

class AgingLock(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AGING_LOCK_UNSPECIFIED: _ClassVar[AgingLock]
    AGING_LOCK_NONE: _ClassVar[AgingLock]
    AGING_LOCK_READ: _ClassVar[AgingLock]
    AGING_LOCK_WRITE: _ClassVar[AgingLock]

class SpteKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SPTE_KIND_UNSPECIFIED: _ClassVar[SpteKind]
    SPTE_KIND_NON_PRESENT: _ClassVar[SpteKind]
    SPTE_KIND_FROZEN: _ClassVar[SpteKind]
    SPTE_KIND_MMIO: _ClassVar[SpteKind]
    SPTE_KIND_TABLE: _ClassVar[SpteKind]
    SPTE_KIND_LEAF: _ClassVar[SpteKind]
CLOCK_UNSPECIFIED: Clock
CLOCK_WALL: Clock
CLOCK_VIRTUAL: Clock
FAULT_LOCK_UNSPECIFIED: FaultLock
FAULT_LOCK_READ: FaultLock
FAULT_LOCK_WRITE: FaultLock
TABLE_FREE_UNSPECIFIED: TableFree
TABLE_FREE_RCU: TableFree
TABLE_FREE_WRITE_SECTION: TableFree
AGING_LOCK_UNSPECIFIED: AgingLock
AGING_LOCK_NONE: AgingLock
AGING_LOCK_READ: AgingLock
AGING_LOCK_WRITE: AgingLock
SPTE_KIND_UNSPECIFIED: SpteKind
SPTE_KIND_NON_PRESENT: SpteKind
SPTE_KIND_FROZEN: SpteKind
SPTE_KIND_MMIO: SpteKind
SPTE_KIND_TABLE: SpteKind
SPTE_KIND_LEAF: SpteKind

class VmConfig(_message.Message):
    __slots__ = ("max_vcpus", "tdp_levels", "ad_bits", "name", "schedule_seed", "sanitizers", "debug_knobs", "gpc_policy", "eager_page_split", "manual_dirty_log_protect", "dirty_ring_size", "dirty_ring_with_bitmap", "fast_page_fault", "clock", "costs", "fault_lock", "table_free", "aging_lock", "zap_leafs_only", "mmu", "nx_huge_pages", "nx_huge_pages_recovery_ratio", "nx_huge_pages_recovery_period_ms")
    class CostsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    MAX_VCPUS_FIELD_NUMBER: _ClassVar[int]
    TDP_LEVELS_FIELD_NUMBER: _ClassVar[int]
    AD_BITS_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_SEED_FIELD_NUMBER: _ClassVar[int]
    SANITIZERS_FIELD_NUMBER: _ClassVar[int]
    DEBUG_KNOBS_FIELD_NUMBER: _ClassVar[int]
    GPC_POLICY_FIELD_NUMBER: _ClassVar[int]
    EAGER_PAGE_SPLIT_FIELD_NUMBER: _ClassVar[int]
    MANUAL_DIRTY_LOG_PROTECT_FIELD_NUMBER: _ClassVar[int]
    DIRTY_RING_SIZE_FIELD_NUMBER: _ClassVar[int]
    DIRTY_RING_WITH_BITMAP_FIELD_NUMBER: _ClassVar[int]
    FAST_PAGE_FAULT_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    COSTS_FIELD_NUMBER: _ClassVar[int]
    FAULT_LOCK_FIELD_NUMBER: _ClassVar[int]
    TABLE_FREE_FIELD_NUMBER: _ClassVar[int]
    AGING_LOCK_FIELD_NUMBER: _ClassVar[int]
    ZAP_LEAFS_ONLY_FIELD_NUMBER: _ClassVar[int]
    MMU_FIELD_NUMBER: _ClassVar[int]
    NX_HUGE_PAGES_FIELD_NUMBER: _ClassVar[int]
    NX_HUGE_PAGES_RECOVERY_RATIO_FIELD_NUMBER: _ClassVar[int]
    NX_HUGE_PAGES_RECOVERY_PERIOD_MS_FIELD_NUMBER: _ClassVar[int]
    max_vcpus: int
    tdp_levels: int
    ad_bits: bool
    name: str
    schedule_seed: int
    sanitizers: bool
    debug_knobs: _containers.RepeatedScalarFieldContainer[str]
    gpc_policy: str
    eager_page_split: bool
    manual_dirty_log_protect: int
    dirty_ring_size: int
    dirty_ring_with_bitmap: bool
    fast_page_fault: bool
    clock: Clock
    costs: _containers.ScalarMap[str, int]
    fault_lock: FaultLock
    table_free: TableFree
    aging_lock: AgingLock
    zap_leafs_only: bool
    mmu: str
    nx_huge_pages: bool
    nx_huge_pages_recovery_ratio: int
    nx_huge_pages_recovery_period_ms: int
    def __init__(self, max_vcpus: _Optional[int] = ..., tdp_levels: _Optional[int] = ..., ad_bits: _Optional[bool] = ..., name: _Optional[str] = ..., schedule_seed: _Optional[int] = ..., sanitizers: _Optional[bool] = ..., debug_knobs: _Optional[_Iterable[str]] = ..., gpc_policy: _Optional[str] = ..., eager_page_split: _Optional[bool] = ..., manual_dirty_log_protect: _Optional[int] = ..., dirty_ring_size: _Optional[int] = ..., dirty_ring_with_bitmap: _Optional[bool] = ..., fast_page_fault: _Optional[bool] = ..., clock: _Optional[_Union[Clock, str]] = ..., costs: _Optional[_Mapping[str, int]] = ..., fault_lock: _Optional[_Union[FaultLock, str]] = ..., table_free: _Optional[_Union[TableFree, str]] = ..., aging_lock: _Optional[_Union[AgingLock, str]] = ..., zap_leafs_only: _Optional[bool] = ..., mmu: _Optional[str] = ..., nx_huge_pages: _Optional[bool] = ..., nx_huge_pages_recovery_ratio: _Optional[int] = ..., nx_huge_pages_recovery_period_ms: _Optional[int] = ...) -> None: ...

class VmInfo(_message.Message):
    __slots__ = ("id", "name", "config", "nr_vcpus", "nr_memslots", "nr_host_regions", "dead")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    NR_VCPUS_FIELD_NUMBER: _ClassVar[int]
    NR_MEMSLOTS_FIELD_NUMBER: _ClassVar[int]
    NR_HOST_REGIONS_FIELD_NUMBER: _ClassVar[int]
    DEAD_FIELD_NUMBER: _ClassVar[int]
    id: int
    name: str
    config: VmConfig
    nr_vcpus: int
    nr_memslots: int
    nr_host_regions: int
    dead: bool
    def __init__(self, id: _Optional[int] = ..., name: _Optional[str] = ..., config: _Optional[_Union[VmConfig, _Mapping]] = ..., nr_vcpus: _Optional[int] = ..., nr_memslots: _Optional[int] = ..., nr_host_regions: _Optional[int] = ..., dead: _Optional[bool] = ...) -> None: ...

class Spte(_message.Message):
    __slots__ = ("level", "gfn", "index", "spte", "kind", "pfn", "readable", "writable", "executable", "large", "accessed", "dirty", "host_writable", "mmu_writable", "zero_page")
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    GFN_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SPTE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PFN_FIELD_NUMBER: _ClassVar[int]
    READABLE_FIELD_NUMBER: _ClassVar[int]
    WRITABLE_FIELD_NUMBER: _ClassVar[int]
    EXECUTABLE_FIELD_NUMBER: _ClassVar[int]
    LARGE_FIELD_NUMBER: _ClassVar[int]
    ACCESSED_FIELD_NUMBER: _ClassVar[int]
    DIRTY_FIELD_NUMBER: _ClassVar[int]
    HOST_WRITABLE_FIELD_NUMBER: _ClassVar[int]
    MMU_WRITABLE_FIELD_NUMBER: _ClassVar[int]
    ZERO_PAGE_FIELD_NUMBER: _ClassVar[int]
    level: int
    gfn: int
    index: int
    spte: int
    kind: SpteKind
    pfn: int
    readable: bool
    writable: bool
    executable: bool
    large: bool
    accessed: bool
    dirty: bool
    host_writable: bool
    mmu_writable: bool
    zero_page: bool
    def __init__(self, level: _Optional[int] = ..., gfn: _Optional[int] = ..., index: _Optional[int] = ..., spte: _Optional[int] = ..., kind: _Optional[_Union[SpteKind, str]] = ..., pfn: _Optional[int] = ..., readable: _Optional[bool] = ..., writable: _Optional[bool] = ..., executable: _Optional[bool] = ..., large: _Optional[bool] = ..., accessed: _Optional[bool] = ..., dirty: _Optional[bool] = ..., host_writable: _Optional[bool] = ..., mmu_writable: _Optional[bool] = ..., zero_page: _Optional[bool] = ...) -> None: ...

class CreateVmRequest(_message.Message):
    __slots__ = ("config",)
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    config: VmConfig
    def __init__(self, config: _Optional[_Union[VmConfig, _Mapping]] = ...) -> None: ...

class CreateVmResponse(_message.Message):
    __slots__ = ("vm",)
    VM_FIELD_NUMBER: _ClassVar[int]
    vm: VmInfo
    def __init__(self, vm: _Optional[_Union[VmInfo, _Mapping]] = ...) -> None: ...

class DestroyVmRequest(_message.Message):
    __slots__ = ("vm_id",)
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    def __init__(self, vm_id: _Optional[int] = ...) -> None: ...

class DestroyVmResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListVmsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListVmsResponse(_message.Message):
    __slots__ = ("vms",)
    VMS_FIELD_NUMBER: _ClassVar[int]
    vms: _containers.RepeatedCompositeFieldContainer[VmInfo]
    def __init__(self, vms: _Optional[_Iterable[_Union[VmInfo, _Mapping]]] = ...) -> None: ...

class GetVmRequest(_message.Message):
    __slots__ = ("vm_id",)
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    def __init__(self, vm_id: _Optional[int] = ...) -> None: ...

class GetVmResponse(_message.Message):
    __slots__ = ("vm",)
    VM_FIELD_NUMBER: _ClassVar[int]
    vm: VmInfo
    def __init__(self, vm: _Optional[_Union[VmInfo, _Mapping]] = ...) -> None: ...

class GetVmStatsRequest(_message.Message):
    __slots__ = ("vm_id",)
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    def __init__(self, vm_id: _Optional[int] = ...) -> None: ...

class GetVmStatsResponse(_message.Message):
    __slots__ = ("stats",)
    class StatsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    STATS_FIELD_NUMBER: _ClassVar[int]
    stats: _containers.ScalarMap[str, int]
    def __init__(self, stats: _Optional[_Mapping[str, int]] = ...) -> None: ...

class WalkEptRequest(_message.Message):
    __slots__ = ("vm_id", "gpa", "as_id")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    GPA_FIELD_NUMBER: _ClassVar[int]
    AS_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    gpa: int
    as_id: int
    def __init__(self, vm_id: _Optional[int] = ..., gpa: _Optional[int] = ..., as_id: _Optional[int] = ...) -> None: ...

class WalkEptResponse(_message.Message):
    __slots__ = ("sptes",)
    SPTES_FIELD_NUMBER: _ClassVar[int]
    sptes: _containers.RepeatedCompositeFieldContainer[Spte]
    def __init__(self, sptes: _Optional[_Iterable[_Union[Spte, _Mapping]]] = ...) -> None: ...

class EnableCapRequest(_message.Message):
    __slots__ = ("vm_id", "cap", "flags", "args")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    CAP_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    cap: int
    flags: int
    args: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, vm_id: _Optional[int] = ..., cap: _Optional[int] = ..., flags: _Optional[int] = ..., args: _Optional[_Iterable[int]] = ...) -> None: ...

class EnableCapResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetClockRequest(_message.Message):
    __slots__ = ("vm_id",)
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    def __init__(self, vm_id: _Optional[int] = ...) -> None: ...

class GetClockResponse(_message.Message):
    __slots__ = ("now_ns", "costs")
    class CostsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NOW_NS_FIELD_NUMBER: _ClassVar[int]
    COSTS_FIELD_NUMBER: _ClassVar[int]
    now_ns: int
    costs: _containers.ScalarMap[str, int]
    def __init__(self, now_ns: _Optional[int] = ..., costs: _Optional[_Mapping[str, int]] = ...) -> None: ...

class AdvanceClockRequest(_message.Message):
    __slots__ = ("vm_id", "until_ns")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    UNTIL_NS_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    until_ns: int
    def __init__(self, vm_id: _Optional[int] = ..., until_ns: _Optional[int] = ...) -> None: ...

class AdvanceClockResponse(_message.Message):
    __slots__ = ("now_ns",)
    NOW_NS_FIELD_NUMBER: _ClassVar[int]
    now_ns: int
    def __init__(self, now_ns: _Optional[int] = ...) -> None: ...

class RecoverNxHugePagesRequest(_message.Message):
    __slots__ = ("vm_id", "ratio")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    RATIO_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    ratio: int
    def __init__(self, vm_id: _Optional[int] = ..., ratio: _Optional[int] = ...) -> None: ...

class RecoverNxHugePagesResponse(_message.Message):
    __slots__ = ("zapped",)
    ZAPPED_FIELD_NUMBER: _ClassVar[int]
    zapped: int
    def __init__(self, zapped: _Optional[int] = ...) -> None: ...

class SetNrMmuPagesRequest(_message.Message):
    __slots__ = ("vm_id", "nr_mmu_pages")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    NR_MMU_PAGES_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    nr_mmu_pages: int
    def __init__(self, vm_id: _Optional[int] = ..., nr_mmu_pages: _Optional[int] = ...) -> None: ...

class SetNrMmuPagesResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MmuShrinkScanRequest(_message.Message):
    __slots__ = ("vm_id", "nr_to_scan")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    NR_TO_SCAN_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    nr_to_scan: int
    def __init__(self, vm_id: _Optional[int] = ..., nr_to_scan: _Optional[int] = ...) -> None: ...

class MmuShrinkScanResponse(_message.Message):
    __slots__ = ("freed",)
    FREED_FIELD_NUMBER: _ClassVar[int]
    freed: int
    def __init__(self, freed: _Optional[int] = ...) -> None: ...
