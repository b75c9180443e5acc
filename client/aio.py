"""The asyncio client: `AsyncClient` and its `AsyncVm`, `AsyncVcpu` and `AsyncRunStream`
handles, method for method the twins of `sync`.

    async with AsyncClient("127.0.0.1:50051") as client:
        vm = await client.create_vm(max_vcpus=2)
        vcpu = await vm.create_vcpu(0)
        async with vcpu.stream() as stream:
            result = await stream.run(batch)

Methods that make an RPC are coroutines; making a handle (`vm`, `vcpu`, `stream`) is not.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any, TypeVar

import grpc

from vmmu.client import _base
from vmmu.client.batch import Batch
from vmmu.client.errors import VmmuError, error_from_rpc, error_from_status
from vmmu.client.types import Backing, HostRegion, Memslot, RunResult, Spte, VcpuInfo, VmInfo

__all__ = ["AsyncClient", "AsyncVm", "AsyncVcpu", "AsyncRunStream"]

T = TypeVar("T")


class AsyncClient:
    """A connection to a vmmu server, for asyncio."""

    def __init__(self, target: str) -> None:
        self._channel = grpc.aio.insecure_channel(target, options=_base.CHANNEL_OPTIONS)
        self._stubs = _base.Stubs(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def _invoke(self, call: _base.Call[T]) -> T:
        try:
            response = await call.stub_method(self._stubs)(call.request)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc
        return call.parse(response)

    async def create_vm(self, *, max_vcpus: int = 8, tdp_levels: int = 4,
                        ad_bits: bool = True, name: str = "") -> AsyncVm:
        info = await self._invoke(_base.create_vm(max_vcpus, tdp_levels, ad_bits, name))
        return AsyncVm(self, info.id)

    def vm(self, vm_id: int) -> AsyncVm:
        return AsyncVm(self, vm_id)

    async def list_vms(self) -> list[VmInfo]:
        return await self._invoke(_base.list_vms())


class AsyncVm:
    """A VM on the server; its methods are the VM ioctls and the VMM's host memory."""

    __slots__ = ("_client", "id")

    def __init__(self, client: AsyncClient, vm_id: int) -> None:
        self._client = client
        self.id = vm_id

    def __repr__(self) -> str:
        return f"AsyncVm(id={self.id})"

    async def info(self) -> VmInfo:
        return await self._client._invoke(_base.get_vm(self.id))

    async def stats(self) -> dict[str, int]:
        return await self._client._invoke(_base.vm_stats(self.id))

    async def walk(self, gpa: int, as_id: int = 0) -> list[Spte]:
        return await self._client._invoke(_base.walk(self.id, gpa, as_id))

    async def destroy(self) -> None:
        await self._client._invoke(_base.destroy_vm(self.id))

    async def mmap(self, size: int, backing: Backing, *, writable: bool = True,
                   hva: int | None = None) -> HostRegion:
        return await self._client._invoke(_base.mmap(self.id, size, backing, writable, hva))

    async def munmap(self, hva: int, size: int) -> None:
        await self._client._invoke(_base.munmap(self.id, hva, size))

    async def host_regions(self) -> list[HostRegion]:
        return await self._client._invoke(_base.host_regions(self.id))

    async def read_hva(self, hva: int, length: int) -> bytes:
        return await self._client._invoke(_base.read_hva(self.id, hva, length))

    async def write_hva(self, hva: int, data: bytes) -> None:
        await self._client._invoke(_base.write_hva(self.id, hva, data))

    async def set_user_memory_region(self, slot: int, flags: int, guest_phys_addr: int,
                                     memory_size: int, userspace_addr: int) -> None:
        await self._client._invoke(_base.set_user_memory_region(
            self.id, slot, flags, guest_phys_addr, memory_size, userspace_addr))

    async def memslots(self) -> list[Memslot]:
        return await self._client._invoke(_base.memslots(self.id))

    async def create_vcpu(self, vcpu_id: int) -> AsyncVcpu:
        info = await self._client._invoke(_base.create_vcpu(self.id, vcpu_id))
        return AsyncVcpu(self._client, self.id, info.id)

    def vcpu(self, vcpu_id: int) -> AsyncVcpu:
        return AsyncVcpu(self._client, self.id, vcpu_id)


class AsyncVcpu:
    """A vCPU on the server: run batches on it, one step per call or over a stream."""

    __slots__ = ("_client", "vm_id", "id")

    def __init__(self, client: AsyncClient, vm_id: int, vcpu_id: int) -> None:
        self._client = client
        self.vm_id = vm_id
        self.id = vcpu_id

    def __repr__(self) -> str:
        return f"AsyncVcpu(vm_id={self.vm_id}, id={self.id})"

    async def info(self) -> VcpuInfo:
        return await self._client._invoke(_base.get_vcpu(self.vm_id, self.id))

    async def stats(self) -> dict[str, int]:
        return await self._client._invoke(_base.vcpu_stats(self.vm_id, self.id))

    async def run(self, batch: Batch) -> RunResult:
        """Run `batch` from its first access until it is done or exits."""
        return await self._client._invoke(_base.run_batch(self.vm_id, self.id, batch))

    async def complete_mmio(self, data: bytes = b"") -> RunResult:
        """Complete the pending MMIO access (a read's `length` bytes, or nothing for a
        write) and resume its batch."""
        return await self._client._invoke(_base.complete_mmio(self.vm_id, self.id, data))

    def stream(self) -> AsyncRunStream:
        """Open a Run stream on this vCPU; use it with `async with`."""
        return AsyncRunStream(self._client._stubs, self.vm_id, self.id)


class AsyncRunStream:
    """The bidirectional Run stream of one vCPU. Each step sends one request and awaits
    its answer; an error ends the stream."""

    def __init__(self, stubs: _base.Stubs, vm_id: int, vcpu_id: int) -> None:
        self.vm_id = vm_id
        self.vcpu_id = vcpu_id
        self._call = stubs.vcpu.Run()

    async def __aenter__(self) -> AsyncRunStream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def run(self, batch: Batch) -> RunResult:
        return await self._step(_base.run_request(self.vm_id, self.vcpu_id, batch))

    async def complete_mmio(self, data: bytes = b"") -> RunResult:
        return await self._step(_base.mmio_request(self.vm_id, self.vcpu_id, data))

    async def close(self) -> None:
        """Half-close the stream and wait for the server to end it."""
        try:
            await self._call.done_writing()
            while await self._call.read() is not grpc.aio.EOF:
                pass
        except grpc.RpcError:
            pass    # the step that failed has raised it already

    async def _step(self, request: Any) -> RunResult:
        try:
            await self._call.write(request)
            response = await self._call.read()
        except asyncio.InvalidStateError:       # the stream ended before this step
            response = grpc.aio.EOF
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc
        if response is grpc.aio.EOF:
            code = await self._call.code()
            if code is grpc.StatusCode.OK:
                raise VmmuError(grpc.StatusCode.CANCELLED, "the Run stream is closed")
            raise error_from_status(code, await self._call.details())
        return _base.run_result(response.result)
