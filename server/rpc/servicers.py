"""The gRPC servicers of vmmu.v1: each method converts, makes one model call, converts.

Servicers hold no state but the `Kvm` they adapt, take no locks and make no decisions;
model errors rise through them to `errors.ErrorInterceptor`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from vmmu.server.kvm import Kvm, Vcpu, Vm
from vmmu.server.rpc import convert
from vmmu.server.rpc.explore import ExploreServicer
from vmmu.v1 import (explore_pb2, explore_pb2_grpc, host_memory_pb2, host_memory_pb2_grpc,
                     memslot_pb2, memslot_pb2_grpc, vcpu_pb2, vcpu_pb2_grpc, vm_pb2,
                     vm_pb2_grpc)

__all__ = ["VmServicer", "HostMemoryServicer", "MemslotServicer", "VcpuServicer",
           "add_servicers"]

Context = grpc.aio.ServicerContext


class _Servicer:
    def __init__(self, kvm: Kvm) -> None:
        self.kvm = kvm

    def _vm(self, request) -> Vm:
        return self.kvm.get_vm(request.vm_id)

    def _vcpu(self, request) -> Vcpu:
        return self.kvm.get_vm(request.vm_id).vcpu(request.vcpu_id)


class VmServicer(_Servicer, vm_pb2_grpc.VmServiceServicer):
    async def CreateVm(self, request: vm_pb2.CreateVmRequest, context: Context
                       ) -> vm_pb2.CreateVmResponse:
        vm = self.kvm.create_vm(convert.vm_config(request))
        return vm_pb2.CreateVmResponse(vm=convert.vm_info(vm.info()))

    async def DestroyVm(self, request: vm_pb2.DestroyVmRequest, context: Context
                        ) -> vm_pb2.DestroyVmResponse:
        await self.kvm.destroy_vm(request.vm_id)
        return vm_pb2.DestroyVmResponse()

    async def ListVms(self, request: vm_pb2.ListVmsRequest, context: Context
                      ) -> vm_pb2.ListVmsResponse:
        return vm_pb2.ListVmsResponse(vms=[convert.vm_info(vm.info()) for vm in self.kvm.vms()])

    async def GetVm(self, request: vm_pb2.GetVmRequest, context: Context
                    ) -> vm_pb2.GetVmResponse:
        return vm_pb2.GetVmResponse(vm=convert.vm_info(self._vm(request).info()))

    async def GetVmStats(self, request: vm_pb2.GetVmStatsRequest, context: Context
                         ) -> vm_pb2.GetVmStatsResponse:
        return vm_pb2.GetVmStatsResponse(stats=self._vm(request).stats())

    async def WalkEpt(self, request: vm_pb2.WalkEptRequest, context: Context
                      ) -> vm_pb2.WalkEptResponse:
        walk = self._vm(request).walk(request.gpa, as_id=request.as_id)
        return vm_pb2.WalkEptResponse(sptes=[convert.spte(s) for s in walk])


class HostMemoryServicer(_Servicer, host_memory_pb2_grpc.HostMemoryServiceServicer):
    async def CreateRegion(self, request: host_memory_pb2.CreateRegionRequest, context: Context
                           ) -> host_memory_pb2.CreateRegionResponse:
        backing = convert.backing(request.backing)
        hva = request.hva if request.HasField("hva") else None
        region = self._vm(request).mmap(request.size, backing, writable=not request.read_only,
                                        hva=hva)
        return host_memory_pb2.CreateRegionResponse(region=convert.host_region(region))

    async def DestroyRegion(self, request: host_memory_pb2.DestroyRegionRequest,
                            context: Context) -> host_memory_pb2.DestroyRegionResponse:
        await self._vm(request).munmap(request.hva, request.size)
        return host_memory_pb2.DestroyRegionResponse()

    async def ListRegions(self, request: host_memory_pb2.ListRegionsRequest, context: Context
                          ) -> host_memory_pb2.ListRegionsResponse:
        regions = self._vm(request).host_regions()
        return host_memory_pb2.ListRegionsResponse(
            regions=[convert.host_region(r) for r in regions])

    async def ReadHva(self, request: host_memory_pb2.ReadHvaRequest, context: Context
                      ) -> host_memory_pb2.ReadHvaResponse:
        data = self._vm(request).read_hva(request.hva, request.length)
        return host_memory_pb2.ReadHvaResponse(data=data)

    async def WriteHva(self, request: host_memory_pb2.WriteHvaRequest, context: Context
                       ) -> host_memory_pb2.WriteHvaResponse:
        self._vm(request).write_hva(request.hva, request.data)
        return host_memory_pb2.WriteHvaResponse()


class MemslotServicer(_Servicer, memslot_pb2_grpc.MemslotServiceServicer):
    async def SetUserMemoryRegion(self, request: memslot_pb2.SetUserMemoryRegionRequest,
                                  context: Context) -> memslot_pb2.SetUserMemoryRegionResponse:
        await self._vm(request).set_user_memory_region(
            slot=request.slot, flags=request.flags, guest_phys_addr=request.guest_phys_addr,
            memory_size=request.memory_size, userspace_addr=request.userspace_addr)
        return memslot_pb2.SetUserMemoryRegionResponse()

    async def ListMemslots(self, request: memslot_pb2.ListMemslotsRequest, context: Context
                           ) -> memslot_pb2.ListMemslotsResponse:
        slots = self._vm(request).memslots()
        return memslot_pb2.ListMemslotsResponse(memslots=[convert.memslot(s) for s in slots])


class VcpuServicer(_Servicer, vcpu_pb2_grpc.VcpuServiceServicer):
    async def CreateVcpu(self, request: vcpu_pb2.CreateVcpuRequest, context: Context
                         ) -> vcpu_pb2.CreateVcpuResponse:
        vcpu = self._vm(request).create_vcpu(request.vcpu_id)
        return vcpu_pb2.CreateVcpuResponse(vcpu=convert.vcpu_info(vcpu.info()))

    async def GetVcpu(self, request: vcpu_pb2.GetVcpuRequest, context: Context
                      ) -> vcpu_pb2.GetVcpuResponse:
        return vcpu_pb2.GetVcpuResponse(vcpu=convert.vcpu_info(self._vcpu(request).info()))

    async def GetVcpuStats(self, request: vcpu_pb2.GetVcpuStatsRequest, context: Context
                           ) -> vcpu_pb2.GetVcpuStatsResponse:
        return vcpu_pb2.GetVcpuStatsResponse(stats=self._vcpu(request).stats())

    async def Run(self, requests: AsyncIterator[vcpu_pb2.RunRequest], context: Context
                  ) -> AsyncIterator[vcpu_pb2.RunResponse]:
        async for request in requests:
            step = convert.run_step(request)
            result = await self._vcpu(request).run(**step)
            yield vcpu_pb2.RunResponse(result=convert.run_result(result))

    async def RunBatch(self, request: vcpu_pb2.RunBatchRequest, context: Context
                       ) -> vcpu_pb2.RunBatchResponse:
        step = convert.run_step(request)
        result = await self._vcpu(request).run(**step)
        return vcpu_pb2.RunBatchResponse(result=convert.run_result(result))


def add_servicers(kvm: Kvm, server: grpc.aio.Server) -> list[str]:
    """Register every vmmu.v1 servicer for `kvm` on `server`; return the service names."""
    vm_pb2_grpc.add_VmServiceServicer_to_server(VmServicer(kvm), server)
    host_memory_pb2_grpc.add_HostMemoryServiceServicer_to_server(HostMemoryServicer(kvm),
                                                                  server)
    memslot_pb2_grpc.add_MemslotServiceServicer_to_server(MemslotServicer(kvm), server)
    vcpu_pb2_grpc.add_VcpuServiceServicer_to_server(VcpuServicer(kvm), server)
    explore_pb2_grpc.add_ExploreServiceServicer_to_server(ExploreServicer(), server)
    return [service.full_name
            for module in (vm_pb2, host_memory_pb2, memslot_pb2, vcpu_pb2, explore_pb2)
            for service in module.DESCRIPTOR.services_by_name.values()]
