"""The model: a KVM VM with a TDP MMU, in pure Python (no grpc, no protobuf).

See docs/model-api.md for the surface and docs/design.md for how the parts fit.
"""

from .batch import OP_HLT, OP_WITH_DATA, AccessBatch, make_op
from .caps import (KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP,
                   KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
from .dirty_log import KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
from .dirty_ring import DirtyGfn
from .errors import KvmError, NoSuchObject, VmBugged
from .held import HeldInvalidationInfo, HoldState
from .host_mm import HostRegionInfo
from .host_region import PROT_EXEC, PROT_NONE, PROT_READ, PROT_WRITE
from .kvm import Kvm
from .memslots import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, KVM_USER_MEM_SLOTS, MemslotInfo
from .trace import Subscription, TraceEvent
from .types import AccessKind, Backing
from .vcpu import Exit, ExitReason, RunResult, Vcpu, VcpuInfo
from .vm import SpteInfo, Vm, VmConfig, VmInfo

__all__ = [
    "Kvm", "Vm", "VmConfig", "VmInfo", "Vcpu", "VcpuInfo", "AccessBatch", "AccessKind",
    "Backing", "OP_WITH_DATA", "make_op", "RunResult", "Exit", "ExitReason", "SpteInfo",
    "HostRegionInfo", "MemslotInfo", "KvmError", "NoSuchObject", "VmBugged",
    "KVM_MEM_LOG_DIRTY_PAGES", "KVM_MEM_READONLY", "KVM_USER_MEM_SLOTS",
    "HoldState", "HeldInvalidationInfo", "Subscription", "TraceEvent",
    "DirtyGfn", "KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE", "KVM_DIRTY_LOG_INITIALLY_SET",
    "PROT_NONE", "PROT_READ", "PROT_WRITE", "PROT_EXEC", "OP_HLT",
    "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2", "KVM_CAP_DIRTY_LOG_RING",
    "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP",
]
