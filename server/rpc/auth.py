"""Who may call and who is calling: TLS on the listener, bearer tokens, and the VMs a
caller owns.

    transport   plaintext on a loopback address; anywhere else TLS (`ServerTls`, with an
                optional client CA for mutual TLS) unless the operator says `insecure`
    identity    with a token file, every call but the health service's carries
                `authorization: Bearer <token>`; a missing or unknown token is
                UNAUTHENTICATED, a known one names the caller (`caller()`)
    ownership   a VM belongs to the identity that created it; to every other identity it
                does not exist (NOT_FOUND, absent from ListVms, from a trace of every VM)
    accounting  what a call creates is charged to `charged()` for the `identity_*` limits:
                the token's identity, or without tokens the peer's host (`PeerInterceptor`)

Without a token file there is one anonymous caller (`None`) who sees every VM. The
servicers see the model through `CallerKvm`, which makes every lookup as `caller()`.
"""

from __future__ import annotations

import contextvars
import hashlib
import ipaddress
import os
import ssl
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc import StatusCode

from vmmu.server.kvm import Kvm, Vm, VmConfig
from vmmu.server.kvm.trace import DEFAULT_CAPACITY, Subscription
from vmmu.server.rpc.errors import refuse
from vmmu.server.rpc.handlers import (Behavior, BehaviorInterceptor, Continuation, prefixed,
                                      rewrap)

__all__ = ["ServerTls", "Tokens", "TokenInterceptor", "PeerInterceptor", "CallerKvm",
           "caller", "charged", "identity_interceptor", "is_loopback", "check_listener",
           "InsecureListener"]

# The identity a call is made as; set by `TokenInterceptor` in the call's own task before
# the handler runs, so it is the caller's for the whole call and for no other.
_CALLER: contextvars.ContextVar[str | None] = contextvars.ContextVar("caller", default=None)
# Without tokens, the peer's host; set by `PeerInterceptor` in the call's own task.
_PEER: contextvars.ContextVar[str | None] = contextvars.ContextVar("peer", default=None)

UNAUTHENTICATED_PREFIXES = ("/grpc.health.v1.",)   # load balancers probe without a token
BEARER = "bearer "


def caller() -> str | None:
    """The identity of the call being served (`None` on a server without tokens)."""
    return _CALLER.get()


def charged() -> str | None:
    """The identity the call's VMs and subscriptions are charged to: the caller's, or on a
    server without tokens its peer's host (a client opening more connections is the same
    identity; every client on the loopback is one)."""
    return _CALLER.get() or _PEER.get()


def peer_host(peer: str) -> str:
    """"ipv4:10.0.0.7:51234" -> "ipv4:10.0.0.7"; a peer without a port as it is."""
    scheme = peer.split(":", 1)[0]
    return peer.rsplit(":", 1)[0] if scheme in ("ipv4", "ipv6") else peer


@dataclass(frozen=True)
class ServerTls:
    """PEM bytes: the server's certificate chain and key, and the CA that client
    certificates must chain to (mutual TLS) or `None` (clients need no certificate)."""

    certificate_chain: bytes
    private_key: bytes
    client_ca: bytes | None = None

    @classmethod
    def from_files(cls, cert: str, key: str, client_ca: str | None = None) -> ServerTls:
        return cls(Path(cert).read_bytes(), Path(key).read_bytes(),
                   Path(client_ca).read_bytes() if client_ca else None)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.private_key, self.certificate_chain)],
                                           root_certificates=self.client_ca,
                                           require_client_auth=self.client_ca is not None)

    def ssl_context(self) -> ssl.SSLContext:
        """The same for other listeners of the server (its metrics over HTTPS)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        # `load_cert_chain` reads files only: the key lives in one readable by us alone
        # (mkstemp's mode is 0600) for as long as it takes to load it.
        fd, path = tempfile.mkstemp(suffix=".pem")
        try:
            with os.fdopen(fd, "wb") as pem:
                pem.write(self.certificate_chain + b"\n" + self.private_key)
            context.load_cert_chain(path)
        finally:
            os.unlink(path)
        if self.client_ca is not None:
            context.load_verify_locations(cadata=self.client_ca.decode())
            context.verify_mode = ssl.CERT_REQUIRED
        return context


class InsecureListener(ValueError):
    """A listener on a non-loopback address without TLS, not allowed by `insecure`."""


def is_loopback(address: str) -> bool:
    """Whether `address` ("host:port", "[v6]:port") listens on the loopback only."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:          # a host name other than localhost: it may be anywhere
        return False


def check_listener(address: str, tls: ServerTls | None, insecure: bool) -> None:
    """Refuse a plaintext listener that other machines can reach, unless `insecure`."""
    if tls is None and not insecure and not is_loopback(address):
        raise InsecureListener(
            f"refusing to listen on {address} without TLS: it is not a loopback address "
            "(give a certificate and key, or say insecure to serve plaintext anyway)")


class Tokens:
    """Bearer tokens and the identity each one names.

    A token file has one token a line, optionally followed by whitespace and the identity's
    name (default: "token-" and the first 12 hex digits of the token's SHA-256); blank
    lines and lines starting with "#" are ignored. Tokens are kept only as digests.
    """

    def __init__(self, identities: Mapping[str, str]) -> None:
        if not identities:
            raise ValueError("no tokens")
        self._by_digest = {_digest(token): name for token, name in identities.items()}

    @classmethod
    def parse(cls, text: str) -> Tokens:
        identities: dict[str, str] = {}
        for number, line in enumerate(text.splitlines(), 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) > 2:
                raise ValueError(f"line {number}: expected 'TOKEN [NAME]'")
            token = fields[0]
            if token in identities:
                raise ValueError(f"line {number}: a token given twice")
            identities[token] = fields[1] if len(fields) == 2 else f"token-{_digest(token)[:12]}"
        return cls(identities)

    @classmethod
    def from_file(cls, path: str) -> Tokens:
        return cls.parse(Path(path).read_text())

    def identity(self, metadata: Iterable[tuple[str, Any]] | None) -> str | None:
        """The identity named by the call's `authorization` metadata, or `None`."""
        for key, value in metadata or ():
            if key == "authorization" and isinstance(value, str) \
                    and value[:len(BEARER)].lower() == BEARER:
                return self._by_digest.get(_digest(value[len(BEARER):].strip()))
        return None


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _refusal(method: str, handler: grpc.RpcMethodHandler, details: str
             ) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind that answers every call UNAUTHENTICATED, with errno
    EACCES (as opening /dev/kvm without the permission to) in its ErrorInfo."""
    async def refused(request: Any, context: grpc.aio.ServicerContext) -> None:
        await refuse(context, method, StatusCode.UNAUTHENTICATED, "EACCES",
                     f"EACCES: {details}")

    return rewrap(handler, lambda behavior: refused)


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through as the identity its bearer token names, or refuses it
    UNAUTHENTICATED (the health service excepted). Must come before any interceptor that
    runs the handler's code, so that `caller()` is set when it does."""

    def __init__(self, tokens: Tokens) -> None:
        self._tokens = tokens

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(UNAUTHENTICATED_PREFIXES):
            return handler
        identity = self._tokens.identity(handler_call_details.invocation_metadata)
        if identity is None:
            return _refusal(handler_call_details.method, handler,
                            "a known token is required: send metadata "
                            "'authorization: Bearer <token>'")
        _CALLER.set(identity)
        return handler


class PeerInterceptor(BehaviorInterceptor):
    """On a server without tokens: makes each vmmu.v1 call charged to its peer's host."""

    def wrap(self, method: str, behavior: Behavior) -> Behavior:
        return prefixed(behavior, _as_peer)


def _as_peer(context: grpc.aio.ServicerContext) -> None:
    _PEER.set(peer_host(context.peer()))


def identity_interceptor(tokens: Tokens | None) -> grpc.aio.ServerInterceptor:
    """What tells the callers apart: their tokens, or without tokens their peers."""
    return TokenInterceptor(tokens) if tokens is not None else PeerInterceptor()


class CallerKvm:
    """The `Kvm` as the identity of the call being served sees it: the servicers' model.

    Every method is `Kvm`'s, made as `caller()`: VMs are created owned by the caller, and
    looking up a VM of another identity is NoSuchObject (NOT_FOUND), as for one that never
    existed. What a call creates is charged to `charged()`.
    """

    def __init__(self, kvm: Kvm) -> None:
        self._kvm = kvm

    def create_vm(self, config: VmConfig | None = None) -> Vm:
        return self._kvm.create_vm(config, owner=caller(), identity=charged())

    def get_vm(self, vm_id: int) -> Vm:
        return self._kvm.get_vm(vm_id, owner=caller())

    def vms(self) -> list[Vm]:
        return self._kvm.vms(owner=caller())

    async def destroy_vm(self, vm_id: int) -> None:
        await self._kvm.destroy_vm(vm_id, owner=caller())

    def trace(self, vm_ids: Iterable[int] = (), events: Iterable[str] = (),
              capacity: int = DEFAULT_CAPACITY) -> Subscription:
        return self._kvm.trace(vm_ids, events, capacity, owner=caller(), identity=charged())
