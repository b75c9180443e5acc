"""The servicer of dirty logs (vmmu.v1.DirtyLogService) and its conversions.

Each method converts, makes one call on the VM, converts; model errors rise to
`errors.ErrorInterceptor`.
"""

from __future__ import annotations

import grpc

from vmmu.server.kvm import Kvm
from vmmu.v1 import dirty_log_pb2, dirty_log_pb2_grpc

__all__ = ["DirtyLogServicer"]

Context = grpc.aio.ServicerContext


class DirtyLogServicer(dirty_log_pb2_grpc.DirtyLogServiceServicer):
    def __init__(self, kvm: Kvm) -> None:
        self.kvm = kvm

    async def GetDirtyLog(self, request: dirty_log_pb2.GetDirtyLogRequest, context: Context
                          ) -> dirty_log_pb2.GetDirtyLogResponse:
        bitmap = await self.kvm.get_vm(request.vm_id).get_dirty_log(request.slot)
        return dirty_log_pb2.GetDirtyLogResponse(bitmap=bitmap)

    async def ClearDirtyLog(self, request: dirty_log_pb2.ClearDirtyLogRequest,
                            context: Context) -> dirty_log_pb2.ClearDirtyLogResponse:
        cleared = await self.kvm.get_vm(request.vm_id).clear_dirty_log(
            request.slot, request.first_page, request.num_pages, request.bitmap)
        return dirty_log_pb2.ClearDirtyLogResponse(pages_cleared=cleared)

    async def HarvestDirtyRing(self, request: dirty_log_pb2.HarvestDirtyRingRequest,
                               context: Context) -> dirty_log_pb2.HarvestDirtyRingResponse:
        entries = self.kvm.get_vm(request.vm_id).harvest_dirty_ring(request.vcpu_id)
        return dirty_log_pb2.HarvestDirtyRingResponse(
            entries=[dirty_log_pb2.DirtyGfn(slot=e.slot, offset=e.offset) for e in entries])

    async def ResetDirtyRings(self, request: dirty_log_pb2.ResetDirtyRingsRequest,
                              context: Context) -> dirty_log_pb2.ResetDirtyRingsResponse:
        count = await self.kvm.get_vm(request.vm_id).reset_dirty_rings()
        return dirty_log_pb2.ResetDirtyRingsResponse(entries_reset=count)
