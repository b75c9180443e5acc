"""The dirty-log calls of both clients (vmmu.v1.DirtyLogService), as `_base.Call`s."""

from __future__ import annotations

from vmmu.client._base import Call
from vmmu.client.types import DirtyGfn
from vmmu.v1 import dirty_log_pb2

__all__ = ["get_dirty_log", "clear_dirty_log", "harvest_dirty_ring", "reset_dirty_rings"]


def get_dirty_log(vm_id: int, slot: int) -> Call[bytes]:
    return Call("dirty_log", "GetDirtyLog",
                dirty_log_pb2.GetDirtyLogRequest(vm_id=vm_id, slot=slot),
                lambda r: r.bitmap)


def clear_dirty_log(vm_id: int, slot: int, first_page: int, num_pages: int,
                    bitmap: bytes) -> Call[int]:
    request = dirty_log_pb2.ClearDirtyLogRequest(vm_id=vm_id, slot=slot, first_page=first_page,
                                                 num_pages=num_pages, bitmap=bitmap)
    return Call("dirty_log", "ClearDirtyLog", request, lambda r: r.pages_cleared)


def harvest_dirty_ring(vm_id: int, vcpu_id: int) -> Call[list[DirtyGfn]]:
    return Call("dirty_log", "HarvestDirtyRing",
                dirty_log_pb2.HarvestDirtyRingRequest(vm_id=vm_id, vcpu_id=vcpu_id),
                lambda r: [DirtyGfn(slot=e.slot, offset=e.offset) for e in r.entries])


def reset_dirty_rings(vm_id: int) -> Call[int]:
    return Call("dirty_log", "ResetDirtyRings",
                dirty_log_pb2.ResetDirtyRingsRequest(vm_id=vm_id), lambda r: r.entries_reset)
