"""KVM_ENABLE_CAP on a live VM: the capabilities vmmu models, with KVM's checks and errnos.

    MANUAL_DIRTY_LOG_PROTECT2 (168)   args[0]: 0, ENABLE (1) or ENABLE | INITIALLY_SET (3);
                                      any flags, or INITIALLY_SET without ENABLE, EINVAL.
                                      A slot that logs already keeps the bitmap it has: one
                                      gets all ones only when its logging is next enabled.
    DIRTY_LOG_RING (192)              args[0]: the ring's size in bytes (a power of two, at
                                      least a page and the reserved entries: EINVAL; above
                                      65536 entries: E2BIG); once only, and only before the
                                      first vCPU exists (EINVAL). flags are not looked at.
    DIRTY_LOG_RING_WITH_BITMAP (225)  no args; a dirty ring first, no flags, and no memslot
                                      yet (EINVAL): every logging slot must get a bitmap.

Any other capability is EINVAL, as KVM's x86 `kvm_vm_ioctl_enable_cap` answers one it does
not know. The VM's configuration at creation is a shorthand for the same calls. Each call
runs under `slots_lock`, so it never overlaps a memslot update or a dirty-log harvest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from .dirty_log import check_manual_protect
from .dirty_ring import check_ring_size
from .errors import einval

if TYPE_CHECKING:
    from .vm import Vm

__all__ = ["KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2", "KVM_CAP_DIRTY_LOG_RING",
           "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP", "KVM_ENABLE_CAP_ARGS", "enable_cap"]

KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_DIRTY_LOG_RING = 192
KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP = 225
KVM_ENABLE_CAP_ARGS = 4                 # struct kvm_enable_cap: __u64 args[4]
_U64 = 1 << 64


async def enable_cap(vm: "Vm", cap: int, flags: int, args: Sequence[int]) -> None:
    """`kvm_vm_ioctl_enable_cap_generic` for the capabilities above (args padded with
    zeroes to four, as the ioctl's struct has them)."""
    if len(args) > KVM_ENABLE_CAP_ARGS:
        raise einval(f"{len(args)} args; struct kvm_enable_cap has {KVM_ENABLE_CAP_ARGS}")
    if not 0 <= flags < 1 << 32 or not all(0 <= arg < _U64 for arg in args):
        raise einval("flags must be a u32 and args u64s")
    args = list(args) + [0] * (KVM_ENABLE_CAP_ARGS - len(args))
    async with vm.slots_lock:
        vm.check_alive()
        if cap == KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2:
            if flags:
                raise einval(f"KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 takes no flags ({flags:#x})")
            check_manual_protect(args[0])
            vm.manual_dirty_log_protect = args[0]
        elif cap == KVM_CAP_DIRTY_LOG_RING:
            check_ring_size(args[0])
            if vm.dirty_ring_size:
                raise einval(f"VM {vm.id} has a dirty ring of {vm.dirty_ring_size} bytes "
                             "already: it is set once")
            if vm.vcpus():
                raise einval(f"VM {vm.id} has vCPUs: the dirty ring is set before the first")
            vm.dirty_ring_size = args[0]
        elif cap == KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP:
            if not vm.dirty_ring_size:
                raise einval("KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP needs a dirty ring first")
            if flags:
                raise einval(f"KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP takes no flags ({flags:#x})")
            if any(len(slots) for slots in vm.memslot_sets):
                raise einval(f"VM {vm.id} has memslots: the bitmap beside the rings is "
                             "enabled before the first")
            vm.dirty_ring_with_bitmap = True
        else:
            raise einval(f"capability {cap} cannot be enabled on a VM (vmmu models "
                         f"{KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2}, {KVM_CAP_DIRTY_LOG_RING} and "
                         f"{KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP})")
