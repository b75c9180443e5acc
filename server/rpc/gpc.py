"""The servicer of gfn-to-pfn caches (vmmu.v1.GpcService) and its conversions.

Each method converts, makes one call on the VM's `Gpcs` or one of its caches, converts;
model errors rise to `errors.ErrorInterceptor`.
"""

from __future__ import annotations

import grpc

from vmmu.server.kvm import Kvm
from vmmu.server.kvm.gpc import Gpc, GpcInfo, Gpcs, GpcState
from vmmu.v1 import gpc_pb2, gpc_pb2_grpc

__all__ = ["GpcServicer", "gpc"]

Context = grpc.aio.ServicerContext

_STATE_TO_WIRE = {s: gpc_pb2.GpcState.Value(f"GPC_STATE_{s.name}") for s in GpcState}


def gpc(info: GpcInfo) -> gpc_pb2.Gpc:
    return gpc_pb2.Gpc(id=info.id, gpa=info.gpa, uhva=info.uhva, pfn=info.pfn,
                       state=_STATE_TO_WIRE[info.state], active=info.active,
                       valid=info.valid, generation=info.generation,
                       refreshes=info.refreshes, retries=info.retries, wait_ns=info.wait_ns)


class GpcServicer(gpc_pb2_grpc.GpcServiceServicer):
    def __init__(self, kvm: Kvm) -> None:
        self.kvm = kvm

    def _gpcs(self, request) -> Gpcs:
        return self.kvm.get_vm(request.vm_id).gpcs

    def _gpc(self, request) -> Gpc:
        return self._gpcs(request).get(request.gpc_id)

    async def CreateGpc(self, request: gpc_pb2.CreateGpcRequest, context: Context
                        ) -> gpc_pb2.CreateGpcResponse:
        cache = await self._gpcs(request).create(request.gpa, request.length)
        return gpc_pb2.CreateGpcResponse(gpc=gpc(cache.info()))

    async def CheckGpc(self, request: gpc_pb2.CheckGpcRequest, context: Context
                       ) -> gpc_pb2.CheckGpcResponse:
        return gpc_pb2.CheckGpcResponse(usable=self._gpc(request).check(request.length))

    async def RefreshGpc(self, request: gpc_pb2.RefreshGpcRequest, context: Context
                         ) -> gpc_pb2.RefreshGpcResponse:
        cache = self._gpc(request)
        await cache.refresh(request.length)
        return gpc_pb2.RefreshGpcResponse(gpc=gpc(cache.info()))

    async def ReadGpc(self, request: gpc_pb2.ReadGpcRequest, context: Context
                      ) -> gpc_pb2.ReadGpcResponse:
        data = self._gpc(request).read(request.offset, request.length)
        return gpc_pb2.ReadGpcResponse(data=data)

    async def WriteGpc(self, request: gpc_pb2.WriteGpcRequest, context: Context
                       ) -> gpc_pb2.WriteGpcResponse:
        self._gpc(request).write(request.offset, request.data)
        return gpc_pb2.WriteGpcResponse()

    async def DeactivateGpc(self, request: gpc_pb2.DeactivateGpcRequest, context: Context
                            ) -> gpc_pb2.DeactivateGpcResponse:
        info = await self._gpcs(request).deactivate(request.gpc_id)
        return gpc_pb2.DeactivateGpcResponse(gpc=gpc(info))

    async def ListGpcs(self, request: gpc_pb2.ListGpcsRequest, context: Context
                       ) -> gpc_pb2.ListGpcsResponse:
        return gpc_pb2.ListGpcsResponse(gpcs=[gpc(i) for i in self._gpcs(request).infos()])
