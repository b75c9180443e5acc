"""The gfn-to-pfn cache calls of both clients (vmmu.v1.GpcService), as `_base.Call`s."""

from __future__ import annotations

from vmmu.client._base import Call
from vmmu.client.types import Gpc, GpcState
from vmmu.v1 import gpc_pb2

__all__ = ["create_gpc", "check_gpc", "refresh_gpc", "read_gpc", "write_gpc",
           "deactivate_gpc", "gpcs"]

_STATE_FROM_WIRE = {gpc_pb2.GpcState.Value(f"GPC_STATE_{s.name}"): s for s in GpcState}


def gpc(m: gpc_pb2.Gpc) -> Gpc:
    return Gpc(id=m.id, gpa=m.gpa, uhva=m.uhva if m.HasField("uhva") else None,
               pfn=m.pfn if m.HasField("pfn") else None, state=_STATE_FROM_WIRE[m.state],
               active=m.active, valid=m.valid, generation=m.generation,
               refreshes=m.refreshes, retries=m.retries, wait_ns=m.wait_ns)


def create_gpc(vm_id: int, gpa: int, length: int) -> Call[Gpc]:
    return Call("gpc", "CreateGpc",
                gpc_pb2.CreateGpcRequest(vm_id=vm_id, gpa=gpa, length=length),
                lambda r: gpc(r.gpc))


def check_gpc(vm_id: int, gpc_id: int, length: int) -> Call[bool]:
    return Call("gpc", "CheckGpc",
                gpc_pb2.CheckGpcRequest(vm_id=vm_id, gpc_id=gpc_id, length=length),
                lambda r: r.usable)


def refresh_gpc(vm_id: int, gpc_id: int, length: int) -> Call[Gpc]:
    return Call("gpc", "RefreshGpc",
                gpc_pb2.RefreshGpcRequest(vm_id=vm_id, gpc_id=gpc_id, length=length),
                lambda r: gpc(r.gpc))


def read_gpc(vm_id: int, gpc_id: int, offset: int, length: int) -> Call[bytes]:
    return Call("gpc", "ReadGpc",
                gpc_pb2.ReadGpcRequest(vm_id=vm_id, gpc_id=gpc_id, offset=offset,
                                       length=length),
                lambda r: r.data)


def write_gpc(vm_id: int, gpc_id: int, offset: int, data: bytes) -> Call[None]:
    return Call("gpc", "WriteGpc",
                gpc_pb2.WriteGpcRequest(vm_id=vm_id, gpc_id=gpc_id, offset=offset, data=data),
                lambda r: None)


def deactivate_gpc(vm_id: int, gpc_id: int) -> Call[Gpc]:
    return Call("gpc", "DeactivateGpc",
                gpc_pb2.DeactivateGpcRequest(vm_id=vm_id, gpc_id=gpc_id),
                lambda r: gpc(r.gpc))


def gpcs(vm_id: int) -> Call[list[Gpc]]:
    return Call("gpc", "ListGpcs", gpc_pb2.ListGpcsRequest(vm_id=vm_id),
                lambda r: [gpc(m) for m in r.gpcs])
