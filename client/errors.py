"""The one exception family of the vmmu clients, translated once from gRPC statuses.

    VmmuError                  any failed call: .code, .errno, .errno_name, .reason,
                               .metadata
     +-- InvalidArgument       INVALID_ARGUMENT    (EINVAL, EFAULT)
     +-- NotFound              NOT_FOUND           (ENOENT: no such VM, vCPU, slot, region)
     +-- AlreadyExists         ALREADY_EXISTS      (EEXIST)
     +-- FailedPrecondition    FAILED_PRECONDITION (EBUSY, ENXIO, EAGAIN: refresh the GPC,
                                                    ENOTSUP: virtual time of a wall VM)
     +-- ResourceExhausted     RESOURCE_EXHAUSTED  (ENOMEM, ENOSPC, E2BIG)
     +-- PermissionDenied      PERMISSION_DENIED   (EPERM)
     +-- Aborted               ABORTED             (EINTR)
     +-- Internal              INTERNAL            (a broken invariant: the VM is dead)
     +-- Unavailable           UNAVAILABLE         (no server, or it is shutting down)
     +-- Unauthenticated       UNAUTHENTICATED     (EACCES: no token, or one the server does not know)

The server sends a `google.rpc.Status` with every error, whose `ErrorInfo` (domain
"vmmu.dev") gives the errno name as its `reason` and names the field or object at fault in
its `metadata` (a limit's name under "limit"). `errno` is the errno's number and
`errno_name` its name, or None when the status did not come from vmmu (no server, a
deadline); `metadata` is the ErrorInfo's metadata ({} without one).
"""

from __future__ import annotations

import errno as _errno
import re
from collections.abc import Iterable

import grpc
from google.rpc import error_details_pb2, status_pb2

from vmmu.v1 import vcpu_pb2

__all__ = [
    "VmmuError", "InvalidArgument", "NotFound", "AlreadyExists", "FailedPrecondition",
    "ResourceExhausted", "PermissionDenied", "Aborted", "Internal", "Unavailable",
    "Unauthenticated", "error_from_status", "error_from_rpc", "error_info", "step_error",
]

_ERRNO_PREFIX = re.compile(r"(E[A-Z0-9]+): ")
DOMAIN = "vmmu.dev"
DETAILS_KEY = "grpc-status-details-bin"


class VmmuError(Exception):
    """A call the server refused or could not complete."""

    def __init__(self, code: grpc.StatusCode, details: str,
                 info: error_details_pb2.ErrorInfo | None = None) -> None:
        super().__init__(details)
        self.code = code
        match = _ERRNO_PREFIX.match(details)
        self.reason = details[match.end():] if match else details
        self.errno_name: str | None = info.reason if info is not None else None
        self.errno: int | None = getattr(_errno, self.errno_name, None) \
            if self.errno_name else None
        self.metadata: dict[str, str] = dict(info.metadata) if info is not None else {}


class InvalidArgument(VmmuError):
    pass


class NotFound(VmmuError):
    pass


class AlreadyExists(VmmuError):
    pass


class FailedPrecondition(VmmuError):
    pass


class ResourceExhausted(VmmuError):
    pass


class PermissionDenied(VmmuError):
    pass


class Aborted(VmmuError):
    pass


class Internal(VmmuError):
    pass


class Unavailable(VmmuError):
    pass


class Unauthenticated(VmmuError):
    pass


_CODE_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}

_ERROR_BY_CODE: dict[grpc.StatusCode, type[VmmuError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.INTERNAL: Internal,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}


def error_info(trailing_metadata: Iterable[tuple[str, str | bytes]] | None
               ) -> error_details_pb2.ErrorInfo | None:
    """vmmu's ErrorInfo in the `google.rpc.Status` of a call's trailers, if there is one."""
    for key, value in trailing_metadata or ():
        if key != DETAILS_KEY:
            continue
        for detail in status_pb2.Status.FromString(value).details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info) and info.domain == DOMAIN:
                return info
    return None


def error_from_status(code: grpc.StatusCode, details: str | None,
                      trailing_metadata: Iterable[tuple[str, str | bytes]] | None = None
                      ) -> VmmuError:
    """The VmmuError that reports a call that ended with `code`."""
    return _ERROR_BY_CODE.get(code, VmmuError)(code, details or code.name,
                                                error_info(trailing_metadata))


def step_error(m: vcpu_pb2.StepError) -> VmmuError:
    """The VmmuError of a step the Run stream refused (the stream goes on)."""
    code = _CODE_BY_NUMBER.get(m.code, grpc.StatusCode.UNKNOWN)
    info = error_details_pb2.ErrorInfo(reason=m.reason, domain=DOMAIN, metadata=m.metadata)
    return _ERROR_BY_CODE.get(code, VmmuError)(code, m.message, info)


def error_from_rpc(exc: grpc.RpcError) -> VmmuError:
    """The VmmuError that reports a failed call (`exc` is a grpc.Call as well)."""
    return error_from_status(exc.code(), exc.details(),  # type: ignore[attr-defined]
                             exc.trailing_metadata())  # type: ignore[attr-defined]
