"""The private-memory calls of both clients (vmmu.v1.GuestMemfdService), as `_base.Call`s."""

from __future__ import annotations

from vmmu.client._base import Call
from vmmu.client.types import GuestMemfd, GuestMemfdBinding
from vmmu.v1 import guest_memfd_pb2

__all__ = ["create_guest_memfd", "fallocate", "guest_memfds", "set_memory_attributes",
           "private_ranges"]


def guest_memfd(m: guest_memfd_pb2.GuestMemfd) -> GuestMemfd:
    return GuestMemfd(fd=m.fd, size=m.size, flags=m.flags, pages=m.pages,
                      bindings=tuple(GuestMemfdBinding(slot=b.slot, offset=b.offset,
                                                       size=b.size) for b in m.bindings))


def create_guest_memfd(vm_id: int, size: int, flags: int) -> Call[GuestMemfd]:
    return Call("guest_memfd", "CreateGuestMemfd",
                guest_memfd_pb2.CreateGuestMemfdRequest(vm_id=vm_id, size=size, flags=flags),
                lambda r: guest_memfd(r.guest_memfd))


def fallocate(vm_id: int, fd: int, mode: int, offset: int, length: int) -> Call[None]:
    return Call("guest_memfd", "FallocateGuestMemfd",
                guest_memfd_pb2.FallocateGuestMemfdRequest(vm_id=vm_id, fd=fd, mode=mode,
                                                           offset=offset, length=length),
                lambda r: None)


def guest_memfds(vm_id: int) -> Call[list[GuestMemfd]]:
    return Call("guest_memfd", "ListGuestMemfds",
                guest_memfd_pb2.ListGuestMemfdsRequest(vm_id=vm_id),
                lambda r: [guest_memfd(m) for m in r.guest_memfds])


def set_memory_attributes(vm_id: int, address: int, size: int, attributes: int,
                          flags: int) -> Call[None]:
    return Call("guest_memfd", "SetMemoryAttributes",
                guest_memfd_pb2.SetMemoryAttributesRequest(
                    vm_id=vm_id, address=address, size=size, attributes=attributes,
                    flags=flags),
                lambda r: None)


def private_ranges(vm_id: int) -> Call[list[tuple[int, int]]]:
    return Call("guest_memfd", "ListPrivateRanges",
                guest_memfd_pb2.ListPrivateRangesRequest(vm_id=vm_id),
                lambda r: [(g.start, g.end) for g in r.ranges])
