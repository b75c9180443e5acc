"""The one exception family of the vmmu clients, translated once from gRPC statuses.

    VmmuError                  any failed call: .code, .errno_name, .reason
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
     +-- Unauthenticated       UNAUTHENTICATED     (no token, or one the server does not know)

The server starts every error message with the errno name ("EINVAL: ..."); `errno_name`
is that name, or None when the status did not come from the model.
"""

from __future__ import annotations

import re

import grpc

__all__ = [
    "VmmuError", "InvalidArgument", "NotFound", "AlreadyExists", "FailedPrecondition",
    "ResourceExhausted", "PermissionDenied", "Aborted", "Internal", "Unavailable",
    "Unauthenticated", "error_from_status", "error_from_rpc",
]

_ERRNO_PREFIX = re.compile(r"(E[A-Z0-9]+): ")


class VmmuError(Exception):
    """A call the server refused or could not complete."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        match = _ERRNO_PREFIX.match(details)
        self.errno_name: str | None = match.group(1) if match else None
        self.reason = details[match.end():] if match else details


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


def error_from_status(code: grpc.StatusCode, details: str | None) -> VmmuError:
    """The VmmuError that reports a call that ended with `code`."""
    return _ERROR_BY_CODE.get(code, VmmuError)(code, details or code.name)


def error_from_rpc(exc: grpc.RpcError) -> VmmuError:
    """The VmmuError that reports a failed call (`exc` is a grpc.Call as well)."""
    return error_from_status(exc.code(), exc.details())  # type: ignore[attr-defined]
