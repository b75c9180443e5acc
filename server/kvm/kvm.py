"""The registry of VMs a server hosts: what opening /dev/kvm gives a VMM."""

from __future__ import annotations

from .errors import NoSuchObject
from .vm import Vm, VmConfig

__all__ = ["Kvm"]


class Kvm:
    def __init__(self) -> None:
        self._vms: dict[int, Vm] = {}
        self._next_id = 1

    def create_vm(self, config: VmConfig | None = None) -> Vm:
        vm = Vm(self._next_id, config or VmConfig())
        self._vms[vm.id] = vm
        self._next_id += 1
        return vm

    def get_vm(self, vm_id: int) -> Vm:
        try:
            return self._vms[vm_id]
        except KeyError:
            raise NoSuchObject(f"no VM {vm_id}") from None

    def vms(self) -> list[Vm]:
        return list(self._vms.values())

    async def destroy_vm(self, vm_id: int) -> None:
        vm = self.get_vm(vm_id)
        del self._vms[vm_id]
        await vm.destroy()

    async def shutdown(self) -> None:
        for vm_id in list(self._vms):
            await self.destroy_vm(vm_id)
