"""The virtual-time calls of both clients (GetClock and AdvanceClock), as `_base.Call`s."""

from __future__ import annotations

from vmmu.client._base import Call
from vmmu.v1 import vm_pb2

__all__ = ["virtual_now", "costs", "advance"]


def virtual_now(vm_id: int) -> Call[int]:
    return Call("vm", "GetClock", vm_pb2.GetClockRequest(vm_id=vm_id), lambda r: r.now_ns)


def costs(vm_id: int) -> Call[dict[str, int]]:
    return Call("vm", "GetClock", vm_pb2.GetClockRequest(vm_id=vm_id),
                lambda r: dict(sorted(r.costs.items())))


def advance(vm_id: int, until_ns: int) -> Call[int]:
    return Call("vm", "AdvanceClock", vm_pb2.AdvanceClockRequest(vm_id=vm_id, until_ns=until_ns),
                lambda r: r.now_ns)
