"""One table from model errors to gRPC statuses, applied once, around every vmmu RPC.

    KvmError(errno, reason)  ->  STATUS_BY_ERRNO[errno], details "<ERRNO NAME>: <reason>"
    VmBugged                 ->  INTERNAL (EIO), details "VmBugged: <what broke>"
    undecodable request      ->  INVALID_ARGUMENT, details "EINVAL: undecodable request: ..."
    anything else (our bug)  ->  INTERNAL, details "EIO: internal error <ref>" (the traceback
                                 is logged on the server under <ref>, never sent)

A VM that a `VmBugged` killed answers EIO from then on, which is INTERNAL as well.

The code is the one a KVM user would expect from the ioctl's errno. The errno name leads
the details, and every error status carries a `google.rpc.Status` in the trailer
`grpc-status-details-bin` with one `google.rpc.ErrorInfo`: `reason` the errno name,
`domain` "vmmu.dev", `metadata` the method, the ids the request named (`vm_id`, `slot`...)
and what the model added (a limit's name and value). Every error is logged as one line of
the `vmmu.rpc` logger: method, code, errno, peer, reason.

`ErrorInterceptor` wraps the handlers of the `vmmu.v1` services: servicers never catch,
they let model errors rise. It also decodes the requests itself, so that bytes protobuf
cannot parse (a corrupt wire format, a string that is not UTF-8) are the client's error.
"""

from __future__ import annotations

import errno
import inspect
import itertools
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from grpc import StatusCode

from vmmu.server.kvm.errors import KvmError, VmBugged
from vmmu.server.rpc.handlers import SERVICE_PREFIX, Behavior, rewrap
from vmmu.v1 import vcpu_pb2

T = TypeVar("T")

__all__ = ["STATUS_BY_ERRNO", "DOMAIN", "DETAILS_KEY", "status_of", "rich_status",
           "refuse", "refusable", "ErrorInterceptor"]

STATUS_BY_ERRNO: dict[int, StatusCode] = {
    errno.EINVAL: StatusCode.INVALID_ARGUMENT,
    errno.EFAULT: StatusCode.INVALID_ARGUMENT,
    errno.EBADF: StatusCode.INVALID_ARGUMENT,       # no such guest_memfd
    errno.EEXIST: StatusCode.ALREADY_EXISTS,
    errno.ENOENT: StatusCode.NOT_FOUND,
    errno.ENOMEM: StatusCode.RESOURCE_EXHAUSTED,
    errno.ENOSPC: StatusCode.RESOURCE_EXHAUSTED,
    errno.E2BIG: StatusCode.RESOURCE_EXHAUSTED,
    errno.EMFILE: StatusCode.RESOURCE_EXHAUSTED,    # a VM's guest_memfds
    errno.EBUSY: StatusCode.FAILED_PRECONDITION,
    errno.ENXIO: StatusCode.FAILED_PRECONDITION,
    errno.EAGAIN: StatusCode.FAILED_PRECONDITION,   # a GPC used while invalid: refresh first
    errno.EOPNOTSUPP: StatusCode.FAILED_PRECONDITION,   # virtual time asked of a wall VM
    errno.EPERM: StatusCode.PERMISSION_DENIED,
    errno.EINTR: StatusCode.ABORTED,
    errno.ECONNREFUSED: StatusCode.UNAVAILABLE,     # a Ray cluster that cannot be reached
    errno.ETIMEDOUT: StatusCode.UNAVAILABLE,        # ... or does not answer in time
    errno.EIO: StatusCode.INTERNAL,     # the VM is dead: an earlier call broke an invariant
}

DOMAIN = "vmmu.dev"
DETAILS_KEY = "grpc-status-details-bin"

log = logging.getLogger("vmmu.rpc")
_incidents = itertools.count(1)


def status_of(exc: KvmError | VmBugged) -> tuple[StatusCode, str]:
    """The status code and details that report `exc` to the client."""
    if isinstance(exc, VmBugged):
        return StatusCode.INTERNAL, f"VmBugged: {exc}"
    return (STATUS_BY_ERRNO.get(exc.errno, StatusCode.UNKNOWN),
            f"{exc.errno_name}: {exc.reason}")


def rich_status(code: StatusCode, details: str, reason: str,
                metadata: Mapping[str, str]) -> status_pb2.Status:
    """The `google.rpc.Status` of an error: its code, details and one ErrorInfo."""
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata))
    return status_pb2.Status(code=code.value[0], message=details, details=[info])


def _objects(request: Any) -> dict[str, str]:
    """The ids a request names (`vm_id`, `vcpu_id`, `slot`...), for the ErrorInfo."""
    if not isinstance(request, Message):
        return {}
    return {field.name: str(value) for field, value in request.ListFields()
            if field.name.endswith("_id") or field.name == "slot"}


def _decoder(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """`deserializer` with bytes it cannot parse reported as EINVAL (protobuf's message
    names the type and what is wrong: a corrupt wire format, a string not UTF-8)."""
    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except (DecodeError, UnicodeDecodeError) as exc:
            raise KvmError(errno.EINVAL, f"undecodable request: {exc}",
                           field="request") from None
    return decode


async def _abort(context: grpc.aio.ServicerContext, method: str, request: Any,
                 exc: BaseException) -> None:
    """End the call with the status that reports `exc`, and log it."""
    if isinstance(exc, (KvmError, VmBugged)):
        code, details = status_of(exc)
        # A VM that broke an invariant answers EIO from then on (KVM_BUG_ON): so now.
        reason = exc.errno_name if isinstance(exc, KvmError) else "EIO"
        await refuse(context, method, code, reason, details,
                     {**_objects(request), **getattr(exc, "metadata", {})})
    else:
        incident = next(_incidents)
        code, reason = StatusCode.INTERNAL, "EIO"
        details = f"EIO: internal error #{incident}, logged on the server"
        log.error("rpc error method=%s code=%s errno=%s peer=%s incident=%d", method,
                  code.name, reason, context.peer(), incident, exc_info=exc)
        await _end(context, method, code, reason, details, {"incident": str(incident)})


async def refuse(context: grpc.aio.ServicerContext, method: str, code: StatusCode,
                 reason: str, details: str, metadata: Mapping[str, str] | None = None
                 ) -> None:
    """End the call refused with `code` and `details` (the errno name `reason` first),
    an ErrorInfo with `reason` and `metadata`, and log it: the one way a call is refused,
    by the guard or by an interceptor before it."""
    log.info("rpc error method=%s code=%s errno=%s peer=%s reason=%r", method,
             code.name, reason, context.peer(), details)
    await _end(context, method, code, reason, details, metadata or {})


async def _end(context: grpc.aio.ServicerContext, method: str, code: StatusCode,
               reason: str, details: str, metadata: Mapping[str, str]) -> None:
    status = rich_status(code, details, reason, {**metadata, "method": method})
    await context.abort(code, details, ((DETAILS_KEY, status.SerializeToString()),))


async def refusable(step: Awaitable[T], method: str, context: grpc.aio.ServicerContext
                    ) -> T | vcpu_pb2.StepError:
    """The result of `step`, or the StepError that reports its KvmError (logged as any
    error is): how a stream refuses one request and goes on."""
    try:
        return await step
    except KvmError as exc:
        code, details = status_of(exc)
        log.info("rpc step error method=%s code=%s errno=%s peer=%s reason=%r", method,
                 code.name, exc.errno_name, context.peer(), details)
        return vcpu_pb2.StepError(code=code.value[0], reason=exc.errno_name, message=details,
                                  metadata={**exc.metadata, "method": method})



def _guarded(method: str, behavior: Behavior, decode: Callable[[bytes], Any] | None
             ) -> Behavior:
    """`behavior` with every exception turned into an aborted RPC; with `decode`, the
    request arrives as bytes and is decoded here."""
    if inspect.isasyncgenfunction(behavior):
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                if decode is not None:
                    request = decode(request)
                async for response in behavior(request, context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _abort(context, method, request, exc)
        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if decode is not None:
                request = decode(request)
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, method, request, exc)
    return unary


def _guard_handler(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    decode = _decoder(handler.request_deserializer)
    if handler.request_streaming:
        # Requests are read inside the behavior, where the guard sees a decode error.
        return rewrap(handler, lambda behavior: _guarded(method, behavior, None),
                      request_deserializer=decode)
    # One request, decoded before the behavior would run: decode it inside the guard.
    return rewrap(handler, lambda behavior: _guarded(method, behavior, decode),
                  request_deserializer=None)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Reports every exception of a vmmu.v1 method with `status_of` (or as an internal
    error with no text of ours), with rich details, and logs it."""

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
        self._guarded[method] = _guard_handler(method, handler)
        return self._guarded[method]
