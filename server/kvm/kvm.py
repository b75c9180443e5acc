"""The registry of VMs a server hosts: what opening /dev/kvm gives a VMM."""

from __future__ import annotations

from collections.abc import Iterable

from .errors import NoSuchObject
from .limits import NO_LIMITS, Limits, MemoryCharge
from .trace import DEFAULT_CAPACITY, Subscription
from .vm import Vm, VmConfig

__all__ = ["Kvm"]


class Kvm:
    def __init__(self, limits: Limits = NO_LIMITS) -> None:
        self.limits = limits
        self._vms: dict[int, Vm] = {}
        self._next_id = 1
        self._tracing_all: list[Subscription] = []     # subscriptions that follow new VMs
        self._subscriptions: list[Subscription] = []
        # The server's memory charges, the parents of every VM's.
        self.mapped = MemoryCharge(limits, "server_mapped_bytes")
        self.populated = MemoryCharge(limits, "server_populated_bytes")

    def create_vm(self, config: VmConfig | None = None) -> Vm:
        config = config or VmConfig()
        config.validate()
        self.limits.check("vms", len(self._vms) + 1, f"a VM beyond the {len(self._vms)} "
                          "this server hosts")
        self.limits.check_name(config.name)
        self.limits.check("vcpus", config.max_vcpus, f"max_vcpus {config.max_vcpus}")
        vm = Vm(self._next_id, config, self.limits, self.mapped, self.populated)
        for sub in self._following():
            vm.tracer.attach(sub)
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

    def trace(self, vm_ids: Iterable[int] = (), events: Iterable[str] = (),
              capacity: int = DEFAULT_CAPACITY) -> Subscription:
        """Subscribe to the events of `vm_ids`, or of every VM, those created later
        included, when `vm_ids` is empty; `events` filters by name (empty: all). A
        subscription to named VMs ends when the last of them is destroyed."""
        vms = [self.get_vm(vm_id) for vm_id in dict.fromkeys(vm_ids)]
        self._subscriptions = [s for s in self._subscriptions if not s.closed]
        self.limits.check("trace_subscribers", len(self._subscriptions) + 1,
                          f"a subscription beyond the {len(self._subscriptions)} open")
        sub = Subscription(events, capacity, ends_with_tracers=bool(vms))
        self._subscriptions.append(sub)
        if not vms:
            vms = self.vms()
            self._tracing_all = [*self._following(), sub]
        for vm in vms:
            vm.tracer.attach(sub)
        return sub

    def _following(self) -> list[Subscription]:
        self._tracing_all = [sub for sub in self._tracing_all if not sub.closed]
        return self._tracing_all

    async def shutdown(self) -> None:
        for vm_id in list(self._vms):
            await self.destroy_vm(vm_id)
