"""The registry of VMs a server hosts: what opening /dev/kvm gives a VMM.

A VM may belong to an owner (a name the server gives a caller): as a VM's file descriptor
belongs to the process that created it, a VM with an owner exists only for that owner.
Every lookup takes `owner`; `None` is the view of a server without identities, which sees
every VM.

A VM and a trace subscription are also charged to an identity (`identity`: the owner, or on
a server without identities whoever the server tells its callers apart by), which the
`identity_*` limits bound as the server-wide ones bound the server: the VMs it created,
the host memory of their regions (its charges sit between each VM's and the server's),
its open subscriptions. `None` is charged to the server alone.
"""

from __future__ import annotations

import weakref
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
        self._owners: dict[int, str | None] = {}
        self._identities: dict[int, str | None] = {}     # vm id -> the identity charged
        self._next_id = 1
        # Subscriptions that follow new VMs, each with the owner whose VMs it follows.
        self._tracing_all: list[tuple[Subscription, str | None]] = []
        self._subscriptions: weakref.WeakKeyDictionary[Subscription, str | None] = \
            weakref.WeakKeyDictionary()                  # -> the identity charged
        # The server's memory charges, the parents of every identity's.
        self.mapped = MemoryCharge(limits, "server_mapped_bytes")
        self.populated = MemoryCharge(limits, "server_populated_bytes")
        # Each identity's with a VM, the parents of its VMs'.
        self._charges: dict[str, tuple[MemoryCharge, MemoryCharge]] = {}

    def create_vm(self, config: VmConfig | None = None, owner: str | None = None,
                  identity: str | None = None) -> Vm:
        """A new VM seen by `owner` (everyone if `None`), charged to `identity`."""
        config = config or VmConfig()
        config.validate()
        self.limits.check("vms", len(self._vms) + 1, f"a VM beyond the {len(self._vms)} "
                          "this server hosts")
        if identity is not None:
            held = sum(1 for charged in self._identities.values() if charged == identity)
            self.limits.check("identity_vms", held + 1,
                              f"a VM beyond the {held} this identity has", identity=identity)
        self.limits.check_name(config.name)
        self.limits.check("vcpus", config.max_vcpus, f"max_vcpus {config.max_vcpus}")
        mapped, populated = self._charges_of(identity)
        vm = Vm(self._next_id, config, self.limits, mapped, populated)
        for sub, follows in self._following():
            if self._visible(owner, follows):
                vm.tracer.attach(sub)
        self._vms[vm.id] = vm
        self._owners[vm.id] = owner
        self._identities[vm.id] = identity
        self._next_id += 1
        return vm

    def _charges_of(self, identity: str | None) -> tuple[MemoryCharge, MemoryCharge]:
        """The memory charges a VM of `identity` nests in: the identity's, else the
        server's."""
        if identity is None:
            return self.mapped, self.populated
        if identity not in self._charges:
            self._charges[identity] = (
                MemoryCharge(self.limits, "identity_mapped_bytes", self.mapped, identity),
                MemoryCharge(self.limits, "identity_populated_bytes", self.populated,
                             identity))
        return self._charges[identity]

    def get_vm(self, vm_id: int, owner: str | None = None) -> Vm:
        vm = self._vms.get(vm_id)
        if vm is None or not self._visible(self._owners[vm_id], owner):
            raise NoSuchObject(f"no VM {vm_id}")
        return vm

    def vms(self, owner: str | None = None) -> list[Vm]:
        return [vm for vm in self._vms.values() if self._visible(self._owners[vm.id], owner)]

    async def destroy_vm(self, vm_id: int, owner: str | None = None) -> None:
        vm = self.get_vm(vm_id, owner)
        del self._vms[vm_id]
        del self._owners[vm_id]
        identity = self._identities.pop(vm_id)
        await vm.destroy()
        # The identity's charges go with its last VM (which gave all it held back).
        if identity in self._charges and identity not in self._identities.values():
            del self._charges[identity]

    def trace(self, vm_ids: Iterable[int] = (), events: Iterable[str] = (),
              capacity: int = DEFAULT_CAPACITY, owner: str | None = None,
              identity: str | None = None) -> Subscription:
        """Subscribe to the events of `vm_ids`, or of every VM `owner` sees, those created
        later included, when `vm_ids` is empty; `events` filters by name (empty: all). A
        subscription to named VMs ends when the last of them is destroyed. It counts
        against `identity`'s subscriptions."""
        vms = [self.get_vm(vm_id, owner) for vm_id in dict.fromkeys(vm_ids)]
        open_subs = self.subscriptions()
        self.limits.check("trace_subscribers", len(open_subs) + 1,
                          f"a subscription beyond the {len(open_subs)} open")
        if identity is not None:
            held = sum(1 for sub in open_subs if self._subscriptions[sub] == identity)
            self.limits.check("identity_trace_subscribers", held + 1,
                              f"a subscription beyond the {held} this identity has open",
                              identity=identity)
        sub = Subscription(events, capacity, ends_with_tracers=bool(vms))
        self._subscriptions[sub] = identity
        if not vms:
            vms = self.vms(owner)
            self._tracing_all = [*self._following(), (sub, owner)]
        for vm in vms:
            vm.tracer.attach(sub)
        return sub

    def subscriptions(self) -> list[Subscription]:
        """The trace subscriptions made by `trace` that are still open."""
        return [sub for sub in self._subscriptions if not sub.closed]

    def _following(self) -> list[tuple[Subscription, str | None]]:
        self._tracing_all = [(sub, owner) for sub, owner in self._tracing_all
                             if not sub.closed]
        return self._tracing_all

    @staticmethod
    def _visible(vm_owner: str | None, viewer: str | None) -> bool:
        return viewer is None or vm_owner == viewer

    async def shutdown(self) -> None:
        for vm_id in list(self._vms):
            await self.destroy_vm(vm_id)
