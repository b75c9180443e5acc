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
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from vmmu.server.kvm import Kvm
from vmmu.server.kvm.limits import DEFAULT_LIMITS, Limits
from vmmu.server.rpc.errors import ErrorInterceptor
from vmmu.server.rpc.servicers import add_servicers

__all__ = ["Serving", "start_server", "DEFAULT_GRACE", "MAX_MESSAGE_BYTES"]

DEFAULT_GRACE = 5.0   # seconds an open Run stream may take to finish at shutdown
# The largest batch (AccessBatch.MAX_ACCESSES accesses of 8 bytes with data) is 17 MiB
# on the wire; gRPC's default limit of 4 MiB would refuse it before the model could.
MAX_MESSAGE_BYTES = 32 << 20
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
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


def _enable_reflection(services: list[str], server: grpc.aio.Server) -> None:
    """Server reflection, as grpc.reflection.v1 and v1alpha: grpcio-reflection serves
    v1alpha only, and v1's messages are v1alpha's under another package (the same fields
    and numbers), so one servicer answers both."""
    servicer = reflection.aio.ReflectionServicer(
        [*services, reflection.SERVICE_NAME, REFLECTION_V1], pool=None)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    info = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        REFLECTION_V1, {"ServerReflectionInfo": info}),))


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

    _enable_reflection([*services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name],
                       server)

    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address}: {exc}") from None
    await server.start()
    return Serving(server, port, kvm)
