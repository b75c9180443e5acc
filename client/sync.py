"""The blocking client: `Client` and its `Vm`, `Vcpu` and `RunStream` handles.

    with Client("127.0.0.1:50051") as client:
        vm = client.create_vm(max_vcpus=2)
        region = vm.mmap(2 << 20, Backing.THP)
        vm.set_user_memory_region(slot=0, flags=0, guest_phys_addr=0,
                                  memory_size=2 << 20, userspace_addr=region.hva)
        vcpu = vm.create_vcpu(0)
        result = vcpu.run(BatchBuilder().write(0x1000, data=b"12345678").build())

Handles are an id and the client: making one costs no RPC, and a handle to an object the
server does not have fails with NotFound on first use. `AsyncClient` mirrors every method.
"""

from __future__ import annotations

import queue
from types import TracebackType
from typing import Any, TypeVar

import grpc

from vmmu.client import _base
from vmmu.client.batch import Batch
from vmmu.client.errors import VmmuError, error_from_rpc
from vmmu.client.types import Backing, HostRegion, Memslot, RunResult, Spte, VcpuInfo, VmInfo

__all__ = ["Client", "Vm", "Vcpu", "RunStream"]

T = TypeVar("T")


class Client:
    """A connection to a vmmu server."""

    def __init__(self, target: str) -> None:
        self._channel = grpc.insecure_channel(target, options=_base.CHANNEL_OPTIONS)
        self._stubs = _base.Stubs(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _invoke(self, call: _base.Call[T]) -> T:
        try:
            response = call.stub_method(self._stubs)(call.request)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc
        return call.parse(response)

    def create_vm(self, *, max_vcpus: int = 8, tdp_levels: int = 4, ad_bits: bool = True,
                  name: str = "") -> Vm:
        info = self._invoke(_base.create_vm(max_vcpus, tdp_levels, ad_bits, name))
        return Vm(self, info.id)

    def vm(self, vm_id: int) -> Vm:
        return Vm(self, vm_id)

    def list_vms(self) -> list[VmInfo]:
        return self._invoke(_base.list_vms())


class Vm:
    """A VM on the server; its methods are the VM ioctls and the VMM's host memory."""

    __slots__ = ("_client", "id")

    def __init__(self, client: Client, vm_id: int) -> None:
        self._client = client
        self.id = vm_id

    def __repr__(self) -> str:
        return f"Vm(id={self.id})"

    def info(self) -> VmInfo:
        return self._client._invoke(_base.get_vm(self.id))

    def stats(self) -> dict[str, int]:
        return self._client._invoke(_base.vm_stats(self.id))

    def walk(self, gpa: int, as_id: int = 0) -> list[Spte]:
        return self._client._invoke(_base.walk(self.id, gpa, as_id))

    def destroy(self) -> None:
        self._client._invoke(_base.destroy_vm(self.id))

    def mmap(self, size: int, backing: Backing, *, writable: bool = True,
             hva: int | None = None) -> HostRegion:
        return self._client._invoke(_base.mmap(self.id, size, backing, writable, hva))

    def munmap(self, hva: int, size: int) -> None:
        self._client._invoke(_base.munmap(self.id, hva, size))

    def host_regions(self) -> list[HostRegion]:
        return self._client._invoke(_base.host_regions(self.id))

    def read_hva(self, hva: int, length: int) -> bytes:
        return self._client._invoke(_base.read_hva(self.id, hva, length))

    def write_hva(self, hva: int, data: bytes) -> None:
        self._client._invoke(_base.write_hva(self.id, hva, data))

    def set_user_memory_region(self, slot: int, flags: int, guest_phys_addr: int,
                               memory_size: int, userspace_addr: int) -> None:
        self._client._invoke(_base.set_user_memory_region(
            self.id, slot, flags, guest_phys_addr, memory_size, userspace_addr))

    def memslots(self) -> list[Memslot]:
        return self._client._invoke(_base.memslots(self.id))

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        info = self._client._invoke(_base.create_vcpu(self.id, vcpu_id))
        return Vcpu(self._client, self.id, info.id)

    def vcpu(self, vcpu_id: int) -> Vcpu:
        return Vcpu(self._client, self.id, vcpu_id)


class Vcpu:
    """A vCPU on the server: run batches on it, one step per call or over a stream."""

    __slots__ = ("_client", "vm_id", "id")

    def __init__(self, client: Client, vm_id: int, vcpu_id: int) -> None:
        self._client = client
        self.vm_id = vm_id
        self.id = vcpu_id

    def __repr__(self) -> str:
        return f"Vcpu(vm_id={self.vm_id}, id={self.id})"

    def info(self) -> VcpuInfo:
        return self._client._invoke(_base.get_vcpu(self.vm_id, self.id))

    def stats(self) -> dict[str, int]:
        return self._client._invoke(_base.vcpu_stats(self.vm_id, self.id))

    def run(self, batch: Batch) -> RunResult:
        """Run `batch` from its first access until it is done or exits."""
        return self._client._invoke(_base.run_batch(self.vm_id, self.id, batch))

    def complete_mmio(self, data: bytes = b"") -> RunResult:
        """Complete the pending MMIO access (a read's `length` bytes, or nothing for a
        write) and resume its batch."""
        return self._client._invoke(_base.complete_mmio(self.vm_id, self.id, data))

    def stream(self) -> RunStream:
        """Open a Run stream on this vCPU; use it as a context manager."""
        return RunStream(self._client._stubs, self.vm_id, self.id)


_CLOSE = object()


class RunStream:
    """The bidirectional Run stream of one vCPU. Each step sends one request and blocks
    for its answer; an error ends the stream."""

    def __init__(self, stubs: _base.Stubs, vm_id: int, vcpu_id: int) -> None:
        self.vm_id = vm_id
        self.vcpu_id = vcpu_id
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._responses = stubs.vcpu.Run(iter(self._requests.get, _CLOSE))

    def __enter__(self) -> RunStream:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def run(self, batch: Batch) -> RunResult:
        return self._step(_base.run_request(self.vm_id, self.vcpu_id, batch))

    def complete_mmio(self, data: bytes = b"") -> RunResult:
        return self._step(_base.mmio_request(self.vm_id, self.vcpu_id, data))

    def close(self) -> None:
        """Half-close the stream and wait for the server to end it."""
        self._requests.put(_CLOSE)
        try:
            for _ in self._responses:
                pass
        except grpc.RpcError:
            pass    # the step that failed has raised it already

    def _step(self, request: Any) -> RunResult:
        self._requests.put(request)
        try:
            response = next(self._responses, None)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc
        if response is None:
            raise VmmuError(grpc.StatusCode.CANCELLED, "the Run stream is closed")
        return _base.run_result(response.result)
