"""One table from model errors to gRPC statuses, applied once, around every vmmu RPC.

    KvmError(errno, reason)  ->  STATUS_BY_ERRNO[errno] (UNKNOWN if absent),
                                 details "<ERRNO NAME>: <reason>"
    VmBugged                 ->  INTERNAL, details "VmBugged: <what broke>"

A VM that a `VmBugged` killed answers EIO from then on, which is INTERNAL as well.

The code is the one a KVM user would expect from the ioctl's errno. The errno name always
leads the details, so a client recovers it without a side channel. `ErrorInterceptor`
wraps the handlers of the `vmmu.v1` services: servicers never catch, they let model
errors rise.
"""

from __future__ import annotations

import errno
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc import StatusCode

from vmmu.server.kvm.errors import KvmError, VmBugged
from vmmu.server.rpc.handlers import Behavior, rewrap

__all__ = ["STATUS_BY_ERRNO", "status_of", "ErrorInterceptor"]

STATUS_BY_ERRNO: dict[int, StatusCode] = {
    errno.EINVAL: StatusCode.INVALID_ARGUMENT,
    errno.EFAULT: StatusCode.INVALID_ARGUMENT,
    errno.EEXIST: StatusCode.ALREADY_EXISTS,
    errno.ENOENT: StatusCode.NOT_FOUND,
    errno.ENOMEM: StatusCode.RESOURCE_EXHAUSTED,
    errno.ENOSPC: StatusCode.RESOURCE_EXHAUSTED,
    errno.E2BIG: StatusCode.RESOURCE_EXHAUSTED,
    errno.EBUSY: StatusCode.FAILED_PRECONDITION,
    errno.ENXIO: StatusCode.FAILED_PRECONDITION,
    errno.EAGAIN: StatusCode.FAILED_PRECONDITION,   # a GPC used while invalid: refresh first
    errno.EOPNOTSUPP: StatusCode.FAILED_PRECONDITION,   # virtual time asked of a wall VM
    errno.EPERM: StatusCode.PERMISSION_DENIED,
    errno.EINTR: StatusCode.ABORTED,
    errno.EIO: StatusCode.INTERNAL,     # the VM is dead: an earlier call broke an invariant
}

SERVICE_PREFIX = "/vmmu.v1."


def status_of(exc: KvmError | VmBugged) -> tuple[StatusCode, str]:
    """The status code and details that report `exc` to the client."""
    if isinstance(exc, VmBugged):
        return StatusCode.INTERNAL, f"VmBugged: {exc}"
    return (STATUS_BY_ERRNO.get(exc.errno, StatusCode.UNKNOWN),
            f"{exc.errno_name}: {exc.reason}")



def _guarded(behavior: Behavior) -> Behavior:
    """`behavior` with model errors turned into an aborted RPC."""
    if inspect.isasyncgenfunction(behavior):
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                async for response in behavior(request, context):
                    yield response
            except (KvmError, VmBugged) as exc:
                await context.abort(*status_of(exc))
        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(request, context)
        except (KvmError, VmBugged) as exc:
            await context.abort(*status_of(exc))
    return unary


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Reports `KvmError` and `VmBugged` from any vmmu.v1 method with `status_of`."""

    def __init__(self) -> None:
        self._guarded: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if method in self._guarded:
            return self._guarded[method]
        handler = await continuation(handler_call_details)
        if handler is None or not method.startswith(SERVICE_PREFIX):
            return handler
        self._guarded[method] = rewrap(handler, _guarded)
        return self._guarded[method]
