"""The server's limits: how much one server, one VM and one call may hold or allocate.

Every limit is checked before the call changes anything; passing one raises
`LimitExceeded` naming it (RESOURCE_EXHAUSTED on the wire, the limit's name and value in
the message and in the ErrorInfo's metadata, and the identity for an `identity_*` limit).
The server-wide limits hold per identity too (the client a server tells apart: a token's
identity, else the peer's host), each with its own, lower, `identity_*` limit. Host memory
is charged as nested memory cgroups charge it: to the VM, through it to its identity, and
through that to the server. A guest access that
would populate past a memory limit fails as host memory the kernel cannot allocate does,
with a MEMORY_FAULT exit (errno ENOMEM) at that access; the accesses before it stand.

The defaults (`DEFAULT_LIMITS`, what `vmmu serve` and `start_server` use) keep one server
within a few GiB of real memory whatever its clients send; an embedded `Kvm()` has
`NO_LIMITS`. docs/limits.md describes each limit and how to set them (`vmmu serve --limit
NAME=VALUE`, `--limits-file FILE`).
"""

from __future__ import annotations

import dataclasses
import errno
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import LimitExceeded

__all__ = ["Limits", "MemoryCharge", "DEFAULT_LIMITS", "NO_LIMITS"]

KIB, MIB, GIB, TIB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@dataclass(frozen=True)
class Limits:
    vms: int = 256                          # VMs per server
    identity_vms: int = 128                 # ... per identity
    vcpus: int = 64                         # vCPUs per VM (a max_vcpus above it is refused)
    vm_mapped_bytes: int = 1 * TIB          # hva a VM's regions may span
    server_mapped_bytes: int = 4 * TIB      # ... all VMs' regions together
    identity_mapped_bytes: int = 2 * TIB    # ... one identity's VMs' regions together
    vm_populated_bytes: int = 2 * GIB       # host pages a VM may have populated
    server_populated_bytes: int = 8 * GIB   # ... all VMs together
    identity_populated_bytes: int = 4 * GIB  # ... one identity's VMs together
    memslot_bytes: int = 1 * TIB            # the size of one memslot
    batch_accesses: int = 1 << 20           # accesses in one batch
    batch_bytes: int = 512 * MIB            # memory one batch may make the server allocate
    name_bytes: int = 256                   # a VM's name, in UTF-8 bytes
    trace_subscribers: int = 64             # open Trace streams per server
    identity_trace_subscribers: int = 32    # ... per identity
    holds: int = 64                         # held invalidations (streams, leases) per VM
    explore_seeds: int = 10_000             # seeds one Explore call may run
    response_bytes: int = 16 * MIB          # the data one response may carry

    @classmethod
    def from_mapping(cls, values: Mapping[str, object], base: Limits | None = None) -> Limits:
        """`base` (the defaults) with `values` replaced; an unknown name or a value that
        is not a positive integer is a ValueError naming it."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown limits {unknown}; known: {sorted(known)}")
        for name, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"limit {name} = {value!r} is not a positive integer")
        return dataclasses.replace(base or cls(), **values)

    @classmethod
    def from_file(cls, path: str | Path) -> Limits:
        """The defaults with the `[limits]` table of the TOML file at `path` replaced."""
        with open(path, "rb") as f:
            table = tomllib.load(f).get("limits", {})
        return cls.from_mapping(table)

    def check(self, name: str, wanted: int, what: str, errno_: int = errno.ENOSPC,
              identity: str | None = None) -> None:
        """Raise LimitExceeded if `wanted` is above limit `name` (of `identity`, if given)."""
        limit = getattr(self, name)
        if wanted > limit:
            raise LimitExceeded(errno_, name, limit, what, identity)

    def check_name(self, name: str) -> None:
        size = len(name.encode())
        if size > self.name_bytes:
            raise LimitExceeded(errno.E2BIG, "name_bytes", self.name_bytes,
                                f"the name is {size} bytes")

    def check_response(self, size: int, what: str) -> None:
        self.check("response_bytes", size, f"{what} would answer {size} bytes", errno.E2BIG)


DEFAULT_LIMITS = Limits()
# What the model has when embedded without limits (`Kvm()`): bounded by nothing but memory.
NO_LIMITS = Limits(**{f.name: 1 << 62 for f in dataclasses.fields(Limits)})


class MemoryCharge:
    """Bytes charged against limit `name` of `limits`, and against `parent` too (a VM's
    charge inside its identity's, that one inside its server's): a charge that would pass
    any of them is refused whole. `identity` names the identity whose charge this is."""

    def __init__(self, limits: Limits, name: str, parent: MemoryCharge | None = None,
                 identity: str | None = None) -> None:
        self.limits, self.name, self.parent, self.identity = limits, name, parent, identity
        self.limit: int = getattr(limits, name)     # Limits is frozen: looked up once
        self.usage = 0

    def try_charge(self, size: int) -> None:
        self.check(size)
        charge: MemoryCharge | None = self
        while charge is not None:
            charge.usage += size
            charge = charge.parent

    def check(self, size: int) -> None:
        """Raise LimitExceeded (ENOMEM) if `size` more bytes would pass a limit."""
        charge: MemoryCharge | None = self
        while charge is not None:
            if charge.usage + size > charge.limit:
                raise LimitExceeded(errno.ENOMEM, charge.name, charge.limit,
                                    f"{size} more bytes on the {charge.usage} in use",
                                    charge.identity)
            charge = charge.parent

    def uncharge(self, size: int) -> None:
        charge: MemoryCharge | None = self
        while charge is not None:
            charge.usage -= size
            charge = charge.parent

