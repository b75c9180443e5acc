"""The vmmu gRPC server: one `Kvm` behind the vmmu.v1 services, reflection and health.

    serving = await start_server("127.0.0.1:0")    # bound; serving.port is the real port
    ...
    await serving.stop()                           # new RPCs refused, in-flight ones end
                                                   # (cancelled after `grace`), then
                                                   # kvm.shutdown()

`Serving` unpacks as `server, port, kvm`. Health reports SERVING for the whole server ("")
and for every vmmu.v1 service until `stop`.
"""

from __future__ import annotations

from typing import NamedTuple

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from vmmu.server.kvm import Kvm
from vmmu.server.kvm.limits import DEFAULT_LIMITS, Limits
from vmmu.server.rpc.errors import ErrorInterceptor
from vmmu.server.rpc.servicers import add_servicers

__all__ = ["Serving", "start_server", "DEFAULT_GRACE", "MAX_MESSAGE_BYTES"]

DEFAULT_GRACE = 5.0   # seconds an open Run stream may take to finish at shutdown
# The largest batch (AccessBatch.MAX_ACCESSES accesses of 8 bytes with data) is 17 MiB
# on the wire; gRPC's default limit of 4 MiB would refuse it before the model could.
MAX_MESSAGE_BYTES = 32 << 20
KEEPALIVE_TIME_MS = 30_000       # a quiet connection is pinged this often
KEEPALIVE_TIMEOUT_MS = 20_000    # and closed when a ping goes unanswered this long


class Serving(NamedTuple):
    """A started server, its bound port and the model behind it."""

    server: grpc.aio.Server
    port: int
    kvm: Kvm

    async def stop(self, grace: float | None = DEFAULT_GRACE) -> None:
        await self.server.stop(grace)
        await self.kvm.shutdown()


async def start_server(address: str = "127.0.0.1:0", limits: Limits = DEFAULT_LIMITS
                       ) -> Serving:
    """Build and start a server for a new `Kvm` with `limits` on `address` ("host:0" picks
    a free port).

    Raises OSError if the address cannot be bound (in use, or not local).
    """
    kvm = Kvm(limits)
    # A response may carry `response_bytes` of data and its framing.
    max_send = max(MAX_MESSAGE_BYTES, limits.response_bytes + (1 << 20))
    server = grpc.aio.server(
        interceptors=[ErrorInterceptor()],
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.max_send_message_length", max_send),
                 # Each server has its own Kvm: two sharing a port would split a client's
                 # calls between two sets of VMs.
                 ("grpc.so_reuseport", 0),
                 # A HoldInvalidation stream stalls its VM's memslot updates until it ends:
                 # ping quiet connections, so that a client that vanished without closing
                 # its connection is noticed (and its streams cancelled) within a minute.
                 # gRPC core 1.85 waits `ping_timeout` for the ack, not `keepalive_timeout`.
                 ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
                 ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
                 ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS)])
    services = add_servicers(kvm, server)

    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in ("", *services):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)

    reflection.enable_server_reflection(
        [*services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME], server)

    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address}: {exc}") from None
    await server.start()
    return Serving(server, port, kvm)
