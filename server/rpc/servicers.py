"""The gRPC servicers of vmmu.v1: each method converts, makes one model call, converts.

Servicers hold no state but the `Kvm` they adapt (and the vCPU runs' `RunQueue`), take no
locks and make no decisions; model errors rise through them to `errors.ErrorInterceptor`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from vmmu.server.kvm import Exit, ExitReason, Kvm, RunResult, Vcpu, Vm
from vmmu.server.rpc import convert
from vmmu.server.rpc.auth import CallerKvm
from vmmu.server.rpc.dirty_log import DirtyLogServicer
from vmmu.server.rpc.errors import refusable
from vmmu.server.rpc.explore import ExploreServicer
from vmmu.server.rpc.gpc import GpcServicer
from vmmu.server.rpc.guest_memfd import GuestMemfdServicer
from vmmu.server.rpc.runqueue import RUN_BATCH_COMPLETIONS, RUN_STEP_COMPLETIONS, RunQueue
from vmmu.v1 import (dirty_log_pb2, dirty_log_pb2_grpc, explore_pb2, explore_pb2_grpc, gpc_pb2,
                     gpc_pb2_grpc, guest_memfd_pb2, guest_memfd_pb2_grpc,
                     host_memory_pb2, host_memory_pb2_grpc,
                     memslot_pb2, memslot_pb2_grpc, notifier_pb2, notifier_pb2_grpc,
                     trace_pb2, trace_pb2_grpc, vcpu_pb2, vcpu_pb2_grpc, vm_pb2,
                     vm_pb2_grpc)

__all__ = ["VmServicer", "HostMemoryServicer", "MemslotServicer", "VcpuServicer",
           "NotifierServicer", "TraceServicer", "add_servicers"]

Context = grpc.aio.ServicerContext
RUN = "/vmmu.v1.VcpuService/Run"


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

    async def EnableCap(self, request: vm_pb2.EnableCapRequest, context: Context
                        ) -> vm_pb2.EnableCapResponse:
        await self._vm(request).enable_cap(request.cap, request.flags, list(request.args))
        return vm_pb2.EnableCapResponse()

    async def RecoverNxHugePages(self, request: vm_pb2.RecoverNxHugePagesRequest,
                                 context: Context) -> vm_pb2.RecoverNxHugePagesResponse:
        zapped = await self._vm(request).recover_nx_huge_pages(request.ratio)
        return vm_pb2.RecoverNxHugePagesResponse(zapped=zapped)

    async def SetNrMmuPages(self, request: vm_pb2.SetNrMmuPagesRequest,
                            context: Context) -> vm_pb2.SetNrMmuPagesResponse:
        await self._vm(request).set_nr_mmu_pages(request.nr_mmu_pages)
        return vm_pb2.SetNrMmuPagesResponse()

    async def MmuShrinkScan(self, request: vm_pb2.MmuShrinkScanRequest,
                            context: Context) -> vm_pb2.MmuShrinkScanResponse:
        freed = await self._vm(request).mmu_shrink_scan(request.nr_to_scan)
        return vm_pb2.MmuShrinkScanResponse(freed=freed)

    async def GetClock(self, request: vm_pb2.GetClockRequest, context: Context
                       ) -> vm_pb2.GetClockResponse:
        return convert.clock(self._vm(request))

    async def AdvanceClock(self, request: vm_pb2.AdvanceClockRequest, context: Context
                           ) -> vm_pb2.AdvanceClockResponse:
        now_ns = await self._vm(request).advance(request.until_ns)
        return vm_pb2.AdvanceClockResponse(now_ns=now_ns)


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
        data = await self._vm(request).read_hva(request.hva, request.length)
        return host_memory_pb2.ReadHvaResponse(data=data)

    async def WriteHva(self, request: host_memory_pb2.WriteHvaRequest, context: Context
                       ) -> host_memory_pb2.WriteHvaResponse:
        await self._vm(request).write_hva(request.hva, request.data)
        return host_memory_pb2.WriteHvaResponse()

    async def Madvise(self, request: host_memory_pb2.MadviseRequest, context: Context
                      ) -> host_memory_pb2.MadviseResponse:
        madvise = convert.madvise(self._vm(request), request.advice)
        populated = await madvise(request.hva, request.size)
        return host_memory_pb2.MadviseResponse(pages_populated=populated or 0)

    async def MigratePages(self, request: host_memory_pb2.MigratePagesRequest,
                           context: Context) -> host_memory_pb2.MigratePagesResponse:
        moved = await self._vm(request).migrate_pages(request.hva, request.size)
        return host_memory_pb2.MigratePagesResponse(pages_migrated=moved)

    async def SwapOut(self, request: host_memory_pb2.SwapOutRequest, context: Context
                      ) -> host_memory_pb2.SwapOutResponse:
        out = await self._vm(request).swap_out(request.hva, request.size)
        return host_memory_pb2.SwapOutResponse(pages_swapped=out)

    async def Mprotect(self, request: host_memory_pb2.MprotectRequest, context: Context
                       ) -> host_memory_pb2.MprotectResponse:
        await self._vm(request).mprotect(request.hva, request.size,
                                         convert.protection(request))
        return host_memory_pb2.MprotectResponse()

    async def KsmMerge(self, request: host_memory_pb2.KsmMergeRequest, context: Context
                       ) -> host_memory_pb2.KsmMergeResponse:
        merged = await self._vm(request).ksm_merge(list(request.hvas))
        return host_memory_pb2.KsmMergeResponse(pages_merged=merged)

    async def ThpSplit(self, request: host_memory_pb2.ThpSplitRequest, context: Context
                       ) -> host_memory_pb2.ThpSplitResponse:
        await self._vm(request).thp_split(request.hva)
        return host_memory_pb2.ThpSplitResponse()

    async def ThpCollapse(self, request: host_memory_pb2.ThpCollapseRequest, context: Context
                          ) -> host_memory_pb2.ThpCollapseResponse:
        await self._vm(request).thp_collapse(request.hva)
        return host_memory_pb2.ThpCollapseResponse()

    async def ClearYoung(self, request: host_memory_pb2.ClearYoungRequest, context: Context
                         ) -> host_memory_pb2.ClearYoungResponse:
        young = await self._vm(request).clear_young(request.start, request.end,
                                                    request.fast_only)
        return host_memory_pb2.ClearYoungResponse(young=young)

    async def ClearFlushYoung(self, request: host_memory_pb2.ClearFlushYoungRequest,
                              context: Context) -> host_memory_pb2.ClearFlushYoungResponse:
        young = await self._vm(request).clear_flush_young(request.start, request.end)
        return host_memory_pb2.ClearFlushYoungResponse(young=young)

    async def TestYoung(self, request: host_memory_pb2.TestYoungRequest, context: Context
                        ) -> host_memory_pb2.TestYoungResponse:
        bitmap = self._vm(request).young_bitmap(request.start, request.end)
        return host_memory_pb2.TestYoungResponse(young=any(bitmap), young_bitmap=bitmap)


class MemslotServicer(_Servicer, memslot_pb2_grpc.MemslotServiceServicer):
    async def SetUserMemoryRegion(self, request: memslot_pb2.SetUserMemoryRegionRequest,
                                  context: Context) -> memslot_pb2.SetUserMemoryRegionResponse:
        await self._vm(request).set_user_memory_region(
            slot=request.slot, flags=request.flags, guest_phys_addr=request.guest_phys_addr,
            memory_size=request.memory_size, userspace_addr=request.userspace_addr,
            guest_memfd=request.guest_memfd, guest_memfd_offset=request.guest_memfd_offset)
        return memslot_pb2.SetUserMemoryRegionResponse()

    async def ListMemslots(self, request: memslot_pb2.ListMemslotsRequest, context: Context
                           ) -> memslot_pb2.ListMemslotsResponse:
        slots = self._vm(request).memslots()
        return memslot_pb2.ListMemslotsResponse(memslots=[convert.memslot(s) for s in slots])


class VcpuServicer(_Servicer, vcpu_pb2_grpc.VcpuServiceServicer):
    def __init__(self, kvm: Kvm) -> None:
        super().__init__(kvm)
        self.run_queue = RunQueue()       # RunBatch calls and Run steps start in turn

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
                  ) -> None:
        # The MMIO exits this stream left pending, by vCPU: dropped when the stream ends.
        pending: dict[Vcpu, Exit] = {}
        try:
            # context.read/write rather than iterating `requests`: a step less per message.
            while (request := await context.read()) is not grpc.aio.EOF:
                outcome = await refusable(self._run_step(request, pending), RUN, context)
                await context.write(convert.run_response(outcome))
        finally:
            for vcpu, mmio in pending.items():
                vcpu.cancel_mmio(mmio)

    async def RunBatch(self, request: vcpu_pb2.RunBatchRequest, context: Context
                       ) -> vcpu_pb2.RunBatchResponse:
        result = await self._run_step(request)
        return vcpu_pb2.RunBatchResponse(result=convert.run_result(result))

    async def _run_step(self, request: vcpu_pb2.RunRequest | vcpu_pb2.RunBatchRequest,
                        pending: dict[Vcpu, Exit] | None = None) -> RunResult:
        # `pending` is a Run stream's; without it the run is a RunBatch call's.
        await self.run_queue.admit(RUN_BATCH_COMPLETIONS if pending is None
                                   else RUN_STEP_COMPLETIONS)
        vcpu = self._vcpu(request)
        result = await vcpu.run(**convert.run_step(request, vcpu.vm.config.gpa_bits))
        if pending is not None and result.exit.reason is ExitReason.MMIO:
            pending[vcpu] = result.exit
        elif pending is not None:
            pending.pop(vcpu, None)
        return result


class NotifierServicer(_Servicer, notifier_pb2_grpc.NotifierServiceServicer):
    async def BeginInvalidation(self, request: notifier_pb2.BeginInvalidationRequest,
                                context: Context) -> notifier_pb2.BeginInvalidationResponse:
        held_id = await self._vm(request).begin_invalidation(request.start, request.end,
                                                             convert.lease_s(request))
        return notifier_pb2.BeginInvalidationResponse(invalidation_id=held_id)

    async def EndInvalidation(self, request: notifier_pb2.EndInvalidationRequest,
                              context: Context) -> notifier_pb2.EndInvalidationResponse:
        await self._vm(request).end_invalidation(request.invalidation_id)
        return notifier_pb2.EndInvalidationResponse()

    async def HoldInvalidation(self, request: notifier_pb2.HoldInvalidationRequest,
                               context: Context
                               ) -> AsyncIterator[notifier_pb2.HoldInvalidationResponse]:
        # A cancelled stream leaves the `async with` by CancelledError: CLIENT_GONE.
        async with self._vm(request).hold_invalidation(request.start, request.end) as held:
            yield notifier_pb2.HoldInvalidationResponse(
                invalidation=convert.held_invalidation(held.info()))
            await held.wait_ended()
        yield notifier_pb2.HoldInvalidationResponse(
            invalidation=convert.held_invalidation(held.info()))

    async def ListInvalidations(self, request: notifier_pb2.ListInvalidationsRequest,
                                context: Context) -> notifier_pb2.ListInvalidationsResponse:
        vm = self._vm(request)
        return notifier_pb2.ListInvalidationsResponse(
            held=[convert.held_invalidation(h) for h in vm.held_invalidations()],
            ended=[convert.held_invalidation(h) for h in vm.ended_invalidations()])


class TraceServicer(_Servicer, trace_pb2_grpc.TraceServiceServicer):
    async def Trace(self, request: trace_pb2.TraceRequest, context: Context
                    ) -> AsyncIterator[trace_pb2.TraceResponse]:
        # Leaving the `with`, by the end of the VMs or a cancelled stream, unsubscribes.
        with self.kvm.trace(**convert.trace_subscription(request)) as subscription:
            yield trace_pb2.TraceResponse()             # the subscription is live
            async for event, dropped_before in subscription:
                yield trace_pb2.TraceResponse(event=convert.trace_event(event, dropped_before))


def add_servicers(model: Kvm, server: grpc.aio.Server) -> list[str]:
    """Register every vmmu.v1 servicer for `model` on `server`, each seeing it as the
    caller does (`CallerKvm`); return the service names."""
    kvm = CallerKvm(model)
    vm_pb2_grpc.add_VmServiceServicer_to_server(VmServicer(kvm), server)
    host_memory_pb2_grpc.add_HostMemoryServiceServicer_to_server(HostMemoryServicer(kvm),
                                                                  server)
    memslot_pb2_grpc.add_MemslotServiceServicer_to_server(MemslotServicer(kvm), server)
    vcpu_pb2_grpc.add_VcpuServiceServicer_to_server(VcpuServicer(kvm), server)
    explore_pb2_grpc.add_ExploreServiceServicer_to_server(ExploreServicer(model.limits),
                                                        server)
    notifier_pb2_grpc.add_NotifierServiceServicer_to_server(NotifierServicer(kvm), server)
    trace_pb2_grpc.add_TraceServiceServicer_to_server(TraceServicer(kvm), server)
    gpc_pb2_grpc.add_GpcServiceServicer_to_server(GpcServicer(kvm), server)
    dirty_log_pb2_grpc.add_DirtyLogServiceServicer_to_server(DirtyLogServicer(kvm), server)
    guest_memfd_pb2_grpc.add_GuestMemfdServiceServicer_to_server(GuestMemfdServicer(kvm),
                                                                  server)
    return [service.full_name
            for module in (vm_pb2, host_memory_pb2, memslot_pb2, vcpu_pb2, explore_pb2,
                           notifier_pb2, trace_pb2, gpc_pb2, dirty_log_pb2, guest_memfd_pb2)
            for service in module.DESCRIPTOR.services_by_name.values()]
