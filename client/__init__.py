"""Python clients of the vmmu gRPC API: `Client` (blocking) and `AsyncClient` (asyncio).

Both expose the same methods and return the frozen dataclasses of `types`; failures raise
the `errors.VmmuError` family. Batches of guest accesses are built with `BatchBuilder`;
`load_cost_file` reads the cost table of a VM in virtual time (what `vmmu calibrate` wrote).
The client imports only the generated vmmu.v1 code, never the server.
"""

from vmmu.client.aio import (AsyncClient, AsyncInvalidationHold, AsyncRunStream,
                             AsyncTraceStream, AsyncVcpu, AsyncVm)
from vmmu.client.batch import Access, Batch, BatchBuilder
from vmmu.client.costs import load_cost_file
from vmmu.client.errors import (Aborted, AlreadyExists, FailedPrecondition, Internal,
                                InvalidArgument, NotFound, PermissionDenied, ResourceExhausted,
                                Unauthenticated, Unavailable, VmmuError)
from vmmu.client.sync import Client, InvalidationHold, RunStream, TraceStream, Vcpu, Vm
from vmmu.client.types import (KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP,
                               KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_INTERNAL_ERROR_EMULATION,
                               KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, KVM_MEM_GUEST_MEMFD,
                               KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_MEMORY_EXIT_FLAG_PRIVATE,
                               FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, Backing, ClientTls,
                               DirtyGfn, Exploration, GuestMemfd, GuestMemfdBinding,
                               Exit, ExitReason, Gpc, GpcState, HeldInvalidation, HoldState,
                               HostRegion, Invalidations, Memslot, Protection, RunResult,
                               SeedOutcome, Spte, TraceEvent, VcpuInfo, VmConfig, VmInfo)

__all__ = [
    "Client", "Vm", "Vcpu", "RunStream", "InvalidationHold", "TraceStream",
    "AsyncClient", "AsyncVm", "AsyncVcpu", "AsyncRunStream", "AsyncInvalidationHold",
    "AsyncTraceStream",
    "Access", "Batch", "BatchBuilder", "load_cost_file",
    "VmmuError", "InvalidArgument", "NotFound", "AlreadyExists", "FailedPrecondition",
    "ResourceExhausted", "PermissionDenied", "Aborted", "Internal", "Unavailable",
    "Unauthenticated", "ClientTls",
    "KVM_MEM_LOG_DIRTY_PAGES", "KVM_MEM_READONLY", "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
    "KVM_CAP_DIRTY_LOG_RING", "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP",
    "KVM_INTERNAL_ERROR_EMULATION", "Backing", "ExitReason", "Protection",
    "VmConfig", "VmInfo", "Spte", "HostRegion", "Memslot", "VcpuInfo", "Exit", "RunResult",
    "HoldState", "HeldInvalidation", "Invalidations", "TraceEvent", "GpcState", "Gpc",
    "DirtyGfn", "KVM_MEM_GUEST_MEMFD", "KVM_MEMORY_ATTRIBUTE_PRIVATE",
    "KVM_MEMORY_EXIT_FLAG_PRIVATE", "FALLOC_FL_KEEP_SIZE", "FALLOC_FL_PUNCH_HOLE",
    "GuestMemfd", "GuestMemfdBinding", "SeedOutcome", "Exploration",
]
