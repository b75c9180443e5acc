"""Method handlers with code put around their behavior: the one way the interceptors
(`auth`, `errors`, `metrics`) wrap a vmmu.v1 method, whatever its kind."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

__all__ = ["Behavior", "Continuation", "SERVICE_PREFIX", "rewrap", "prefixed",
           "BehaviorInterceptor"]

SERVICE_PREFIX = "/vmmu.v1."

Behavior = Callable[..., Any]
# What `ServerInterceptor.intercept_service` calls for the handler of the interceptors after it.
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]]

_FACTORIES = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


_SAME: Any = object()


def rewrap(handler: grpc.RpcMethodHandler, wrap: Callable[[Behavior], Behavior], *,
           request_deserializer: Callable[[bytes], Any] | None = _SAME
           ) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind and (de)serializers whose behavior is
    `wrap(handler's behavior)`; with `request_deserializer`, that one decodes the requests
    (None: the behavior gets their bytes)."""
    if request_deserializer is _SAME:
        request_deserializer = handler.request_deserializer
    for kind, factory in _FACTORIES.items():
        behavior = getattr(handler, kind)
        if behavior is not None:
            return factory(wrap(behavior), request_deserializer=request_deserializer,
                           response_serializer=handler.response_serializer)
    raise AssertionError(f"a method handler of no kind: {handler}")


def prefixed(behavior: Behavior, prologue: Callable[[grpc.aio.ServicerContext], None]
             ) -> Behavior:
    """`behavior`, of the same kind, calling `prologue(context)` first in the call's task."""
    if inspect.isasyncgenfunction(behavior):
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            prologue(context)
            async for response in behavior(request, context):
                yield response
        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        prologue(context)
        return await behavior(request, context)
    return unary


class BehaviorInterceptor(grpc.aio.ServerInterceptor):
    """Puts `wrap(method, behavior)` around the behavior of every vmmu.v1 method, once per
    method handler (the wrapped handler is kept)."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def wrap(self, method: str, behavior: Behavior) -> Behavior:
        raise NotImplementedError

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or not method.startswith(SERVICE_PREFIX):
            return handler
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, rewrap(handler, lambda behavior: self.wrap(method, behavior)))
            self._wrapped[method] = cached
        return cached[1]
