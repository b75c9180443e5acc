"""The model's one error family.

    KvmError(errno)            a call KVM would fail with -errno; nothing was changed
     +-- NoSuchObject          an unknown VM, vCPU, slot, region... (ENOENT)
     +-- MemoryFault           a fault KVM_RUN ends with KVM_EXIT_MEMORY_FAULT's details
     +-- LimitExceeded         a configured limit of the server (limits.py) would be passed
    VmBugged                   a broken invariant (KVM_BUG_ON): the VM is dead from now on

`KvmError` is the caller's fault and is mapped to a gRPC status by the RPC layer (the errno
name travels in the message, `metadata` names the field or object at fault). `VmBugged` is
ours: the VM refuses all further work.
"""

from __future__ import annotations

import errno as _errno

__all__ = ["KvmError", "NoSuchObject", "LimitExceeded", "MemoryFault", "VmBugged", "einval"]


class KvmError(Exception):
    """A request KVM would reject with `-errno`. The model state is unchanged."""

    def __init__(self, errno: int, message: str, **metadata: str) -> None:
        self.errno = errno
        self.errno_name = _errno.errorcode.get(errno, str(errno))
        self.reason = message
        self.metadata = metadata
        super().__init__(f"{self.errno_name}: {message}")


class NoSuchObject(KvmError):
    def __init__(self, message: str, **metadata: str) -> None:
        super().__init__(_errno.ENOENT, message, **metadata)


class MemoryFault(KvmError):
    """`kvm_prepare_memory_fault_exit`: KVM_RUN fails with EFAULT and `run->memory_fault`
    says where (gpa, size) and how (flags: KVM_MEMORY_EXIT_FLAG_PRIVATE)."""

    def __init__(self, gpa: int, size: int, flags: int, message: str) -> None:
        super().__init__(_errno.EFAULT, message)
        self.gpa, self.size, self.flags = gpa, size, flags


class LimitExceeded(KvmError):
    """The call would pass the server's limit `limit` (ENOMEM for memory, ENOSPC for a
    count, E2BIG for a size), or `identity`'s share of it; checked before anything
    changes."""

    def __init__(self, errno: int, limit: str, value: int, message: str,
                 identity: str | None = None) -> None:
        if identity is None:
            super().__init__(errno, f"{message} (limit {limit} = {value})", limit=limit,
                             limit_value=str(value))
        else:
            super().__init__(errno, f"{message} (limit {limit} = {value} for identity "
                             f"{identity!r})", limit=limit, limit_value=str(value),
                             identity=identity)


class VmBugged(Exception):
    """KVM_BUG_ON: an invariant of the model broke. The VM is marked dead."""


def einval(message: str, **metadata: str) -> KvmError:
    return KvmError(_errno.EINVAL, message, **metadata)
