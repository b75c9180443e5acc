"""The servicer of private memory (vmmu.v1.GuestMemfdService) and its conversions.

Each method converts, makes one call on the VM, converts; model errors rise to
`errors.ErrorInterceptor`.
"""

from __future__ import annotations

import grpc

from vmmu.server.kvm import Kvm, Vm
from vmmu.server.kvm.guest_memfd import GuestMemfdInfo
from vmmu.v1 import guest_memfd_pb2, guest_memfd_pb2_grpc

__all__ = ["GuestMemfdServicer", "guest_memfd"]

Context = grpc.aio.ServicerContext


def guest_memfd(info: GuestMemfdInfo) -> guest_memfd_pb2.GuestMemfd:
    return guest_memfd_pb2.GuestMemfd(
        fd=info.fd, size=info.size, flags=info.flags, pages=info.pages,
        bindings=[guest_memfd_pb2.GuestMemfdBinding(slot=slot, offset=offset, size=size)
                  for slot, offset, size in info.bindings])


class GuestMemfdServicer(guest_memfd_pb2_grpc.GuestMemfdServiceServicer):
    def __init__(self, kvm: Kvm) -> None:
        self.kvm = kvm

    def _vm(self, request) -> Vm:
        return self.kvm.get_vm(request.vm_id)

    async def CreateGuestMemfd(self, request: guest_memfd_pb2.CreateGuestMemfdRequest,
                               context: Context) -> guest_memfd_pb2.CreateGuestMemfdResponse:
        info = self._vm(request).create_guest_memfd(request.size, request.flags)
        return guest_memfd_pb2.CreateGuestMemfdResponse(guest_memfd=guest_memfd(info))

    async def FallocateGuestMemfd(self, request: guest_memfd_pb2.FallocateGuestMemfdRequest,
                                  context: Context
                                  ) -> guest_memfd_pb2.FallocateGuestMemfdResponse:
        await self._vm(request).guest_memfd_fallocate(request.fd, request.mode,
                                                      request.offset, request.length)
        return guest_memfd_pb2.FallocateGuestMemfdResponse()

    async def ListGuestMemfds(self, request: guest_memfd_pb2.ListGuestMemfdsRequest,
                              context: Context) -> guest_memfd_pb2.ListGuestMemfdsResponse:
        infos = self._vm(request).guest_memfds()
        return guest_memfd_pb2.ListGuestMemfdsResponse(
            guest_memfds=[guest_memfd(info) for info in infos])

    async def SetMemoryAttributes(self, request: guest_memfd_pb2.SetMemoryAttributesRequest,
                                  context: Context
                                  ) -> guest_memfd_pb2.SetMemoryAttributesResponse:
        await self._vm(request).set_memory_attributes(request.address, request.size,
                                                      request.attributes, request.flags)
        return guest_memfd_pb2.SetMemoryAttributesResponse()

    async def ListPrivateRanges(self, request: guest_memfd_pb2.ListPrivateRangesRequest,
                                context: Context) -> guest_memfd_pb2.ListPrivateRangesResponse:
        ranges = self._vm(request).private_ranges()
        return guest_memfd_pb2.ListPrivateRangesResponse(
            ranges=[guest_memfd_pb2.GpaRange(start=start, end=end) for start, end in ranges])
