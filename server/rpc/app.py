"""The vmmu gRPC server: one `Kvm` behind the vmmu.v1 services, reflection and health.

    serving = await start_server("127.0.0.1:0")    # bound; serving.port is the real port
    serving = await start_server("0.0.0.0:50051", tls=ServerTls.from_files(cert, key),
                                 tokens=Tokens.from_file(path))
    ...
    await serving.stop()                           # new RPCs refused, in-flight ones end
                                                   # (cancelled after `grace`), then
                                                   # kvm.shutdown()

`Serving` unpacks as `server, port, kvm, metrics` (the Prometheus endpoint, if any).
Health reports SERVING for the whole server ("") and for every vmmu.v1 service until
`stop`. Who may call and what each caller sees is `auth`'s: plaintext only on a loopback
address unless `insecure`, and with `tokens` every call names its identity and sees only
the VMs it created.
"""

from __future__ import annotations

import asyncio
from typing import NamedTuple

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from vmmu.server.kvm import Kvm
from vmmu.server.kvm.limits import DEFAULT_LIMITS, Limits
from vmmu.server.rpc.auth import ServerTls, Tokens, check_listener, identity_interceptor
from vmmu.server.rpc.errors import ErrorInterceptor
from vmmu.server.rpc.metrics import Metrics, serve_metrics
from vmmu.server.rpc.servicers import add_servicers

__all__ = ["Serving", "start_server", "DEFAULT_GRACE", "DEFAULT_KEEPALIVE_S",
           "MAX_MESSAGE_BYTES"]

DEFAULT_GRACE = 5.0   # seconds an open Run stream may take to finish at shutdown
# The largest batch (AccessBatch.MAX_ACCESSES accesses of 8 bytes with data) is 17 MiB
# on the wire; gRPC's default limit of 4 MiB would refuse it before the model could.
MAX_MESSAGE_BYTES = 32 << 20
# A connection whose client answers no ping for this long is closed, its streams cancelled:
# a HoldInvalidation stream stalls its VM's memslot updates and faults in its range until
# it ends, so a client that stops without closing its connection (its process stopped,
# its host gone) must not hold a VM for long. Pings go out every half of it.
DEFAULT_KEEPALIVE_S = 4.0
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


class Serving(NamedTuple):
    """A started server, its bound port and the model behind it."""

    server: grpc.aio.Server
    port: int
    kvm: Kvm
    metrics: asyncio.Server | None = None

    @property
    def metrics_port(self) -> int | None:
        return self.metrics.sockets[0].getsockname()[1] if self.metrics else None

    async def stop(self, grace: float | None = DEFAULT_GRACE) -> None:
        await self.server.stop(grace)
        await self.kvm.shutdown()
        if self.metrics is not None:
            self.metrics.close()
            await self.metrics.wait_closed()


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


async def start_server(address: str = "127.0.0.1:0", limits: Limits = DEFAULT_LIMITS, *,
                       tls: ServerTls | None = None, tokens: Tokens | None = None,
                       insecure: bool = False, keepalive_s: float = DEFAULT_KEEPALIVE_S,
                       metrics: str | None = None) -> Serving:
    """Build and start a server for a new `Kvm` with `limits` on `address` ("host:0" picks
    a free port), over TLS if `tls` is given, with an identity per token if `tokens` are;
    a client that answers no ping for `keepalive_s` seconds loses its connection and its
    streams; Prometheus metrics are served over HTTP on `metrics` ("host:port") if it is
    given (over HTTPS with `tls`, to a known token only with `tokens`).

    Raises InsecureListener (a ValueError) for a non-loopback `address` or `metrics`
    without `tls` unless `insecure`, OSError if an address cannot be bound (in use, or not
    local).
    """
    check_listener(address, tls, insecure)
    if metrics is not None:
        check_listener(metrics, tls, insecure)
    if not keepalive_s > 0:
        raise ValueError(f"keepalive of {keepalive_s} s: it must be positive")
    ping_ms = max(1, round(keepalive_s * 1000 / 2))
    kvm = Kvm(limits)
    # A response may carry `response_bytes` of data and its framing.
    max_send = max(MAX_MESSAGE_BYTES, limits.response_bytes + (1 << 20))
    # The identity (the token check) comes first: the handlers it lets through run as the
    # caller. The error guard is innermost: it decodes the request of a call the token
    # check let through, so that undecodable bytes are INVALID_ARGUMENT like any error of
    # the call.
    interceptors: list[grpc.aio.ServerInterceptor] = [identity_interceptor(tokens),
                                                      ErrorInterceptor()]
    recorder = Metrics(kvm) if metrics is not None else None
    if recorder is not None:
        interceptors.insert(0, recorder)        # first: it sees refusals by the others
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.max_send_message_length", max_send),
                 # Each server has its own Kvm: two sharing a port would split a client's
                 # calls between two sets of VMs.
                 ("grpc.so_reuseport", 0),
                 # gRPC core 1.85 waits `ping_timeout` for the ack, not `keepalive_timeout`.
                 ("grpc.keepalive_time_ms", ping_ms),
                 ("grpc.keepalive_timeout_ms", ping_ms),
                 ("grpc.http2.ping_timeout_ms", ping_ms),
                 # An open hold stream carries no data: keep pinging it all the same.
                 ("grpc.http2.max_pings_without_data", 0)])
    services = add_servicers(kvm, server)

    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in ("", *services):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)

    _enable_reflection([*services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name],
                       server)

    try:
        port = (server.add_secure_port(address, tls.credentials()) if tls is not None
                else server.add_insecure_port(address))
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address}: {exc}") from None
    await server.start()
    endpoint = None
    if recorder is not None:
        try:
            endpoint = await serve_metrics(metrics, recorder, tls, tokens)
        except OSError:
            await server.stop(None)
            raise
    return Serving(server, port, kvm, endpoint)
