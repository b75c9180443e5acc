"""Shared fixtures: a real vmmu gRPC server on 127.0.0.1 and the two clients.

`server` runs `start_server()` in a thread with its own event loop, so that the blocking
`Client` can talk to it from a test without stalling the server. `client` is
parametrized over both clients; the blocking one is seen through `AsAsync`, which gives
it the coroutine methods of its async twin, so one test body serves both.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from vmmu.client import (AsyncClient, AsyncInvalidationHold, AsyncRunStream, AsyncTraceStream,
                         AsyncVcpu, AsyncVm, Backing, Client, InvalidationHold, RunStream,
                         TraceStream, Vcpu, Vm)
from vmmu.server.kvm.limits import DEFAULT_LIMITS, Limits
from vmmu.server.rpc.app import Serving, start_server

T = TypeVar("T")

# Every VM a test creates runs with the sanitizers on (VmConfig's default follows this).
os.environ.setdefault("VMMU_SANITIZERS", "1")


class ServerThread:
    """A started server on 127.0.0.1:<free port>, served by a loop in its own thread."""

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vmmu-server",
                                        daemon=True)
        self._thread.start()
        self.serving: Serving = self.call(start_server("127.0.0.1:0", limits))
        self.address = f"127.0.0.1:{self.serving.port}"

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    def stop(self) -> None:
        self.call(self.serving.stop(grace=1.0))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


@pytest.fixture
def server() -> Iterator[ServerThread]:
    running = ServerThread()
    yield running
    running.stop()


@pytest.fixture
def make_server() -> Iterator[Callable[[Limits], ServerThread]]:
    """`make_server(limits)`: a started ServerThread with those limits."""
    started: list[ServerThread] = []

    def make(limits: Limits) -> ServerThread:
        started.append(ServerThread(limits))
        return started[-1]

    yield make
    for running in started:
        running.stop()


_TWINS: dict[type, type] = {Client: AsyncClient, Vm: AsyncVm, Vcpu: AsyncVcpu,
                            RunStream: AsyncRunStream, InvalidationHold: AsyncInvalidationHold,
                            TraceStream: AsyncTraceStream}


class AsAsync:
    """A blocking client object with the coroutine methods of its async twin.

    A method that is a coroutine in the twin becomes one here (it still blocks: the server
    runs in another thread); a method that is plain there stays plain. Handles that come
    back are wrapped too, so `await (await client.create_vm()).create_vcpu(0)` works.
    """

    def __init__(self, target: Any) -> None:
        self._target = target
        self._twin = _TWINS[type(target)]

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not callable(attr):
            return attr
        if inspect.iscoroutinefunction(getattr(self._twin, name)):
            async def coroutine(*args: Any, **kwargs: Any) -> Any:
                return _wrap(attr(*args, **kwargs))
            return coroutine
        return lambda *args, **kwargs: _wrap(attr(*args, **kwargs))

    async def __aenter__(self) -> AsAsync:
        self._target.__enter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self._target.__exit__(*exc_info)

    def __aiter__(self) -> AsAsync:
        return self

    async def __anext__(self) -> Any:
        try:
            return next(self._target)
        except StopIteration:
            raise StopAsyncIteration from None


def _wrap(value: Any) -> Any:
    return AsAsync(value) if type(value) in _TWINS else value


@pytest.fixture(params=["sync", "async"])
async def client(request: pytest.FixtureRequest, server: ServerThread) -> AsyncIterator[Any]:
    """A client of `server`, blocking (through AsAsync) or asyncio."""
    if request.param == "sync":
        blocking = Client(server.address)
        yield AsAsync(blocking)
        blocking.close()
    else:
        async with AsyncClient(server.address) as async_client:
            yield async_client


@pytest.fixture
async def guest(client):
    """A VM with 4 MiB of THP-backed memory at gpa 0 and one vCPU: (vm, region, vcpu)."""
    vm = await client.create_vm(max_vcpus=1)
    region = await vm.mmap(4 << 20, Backing.THP)
    await vm.set_user_memory_region(slot=0, flags=0, guest_phys_addr=0, memory_size=4 << 20,
                                    userspace_addr=region.hva)
    return vm, region, await vm.create_vcpu(0)
