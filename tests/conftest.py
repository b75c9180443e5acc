"""Shared fixtures: a real vmmu gRPC server on 127.0.0.1 and the two clients.

`server` runs `start_server()` in a thread with its own event loop, so that the blocking
`Client` can talk to it from a test without stalling the server. `client` is
parametrized over both clients; the blocking one is seen through `AsAsync`, which gives
it the coroutine methods of its async twin, so one test body serves both.

The tests run on asyncio's default loop; with VMMU_EVENT_LOOP=uvloop in the environment
(`vmmu.event_loop`), the servers, the asyncio tests and the `vmmu` commands the tests
start all run on uvloop instead.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from vmmu import event_loop
from vmmu.client import (AsyncClient, AsyncInvalidationHold, AsyncRunStream, AsyncTraceStream,
                         AsyncVcpu, AsyncVm, Backing, Client, InvalidationHold, RunStream,
                         TraceStream, Vcpu, Vm)
from vmmu.server.rpc.app import Serving, start_server

T = TypeVar("T")

# Every VM a test creates runs with the sanitizers on (VmConfig's default follows this).
os.environ.setdefault("VMMU_SANITIZERS", "1")
os.environ.setdefault(event_loop.ENV, "asyncio")


class ServerThread:
    """A started server on 127.0.0.1:<free port>, served by a loop in its own thread;
    `options` are `start_server`'s."""

    def __init__(self, **options: Any) -> None:
        self._loop = (event_loop.loop_factory() or asyncio.new_event_loop)()     # the ENV's
        self._thread = threading.Thread(target=self._loop.run_forever, name="vmmu-server",
                                        daemon=True)
        self._thread.start()
        self.serving: Serving = self.call(start_server("127.0.0.1:0", **options))
        self.address = f"127.0.0.1:{self.serving.port}"

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    def stop(self) -> None:
        self.call(self.serving.stop(grace=1.0))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


if event_loop.loop_name() == "uvloop":
    def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict:
        """pytest-asyncio's loops are uvloop's under VMMU_EVENT_LOOP=uvloop."""
        return {"uvloop": event_loop.loop_factory()}


@pytest.fixture
def server() -> Iterator[ServerThread]:
    running = ServerThread()
    yield running
    running.stop()


@pytest.fixture
def serve() -> Iterator[Callable[..., ServerThread]]:
    """Starts servers with `start_server`'s options; each stops at the end of the test."""
    started: list[ServerThread] = []

    def start(**options: Any) -> ServerThread:
        started.append(ServerThread(**options))
        return started[-1]

    yield start
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


@pytest.fixture(params=["sync", "async"])
async def connect(request: pytest.FixtureRequest) -> AsyncIterator[Callable[..., Any]]:
    """Opens clients, blocking (through AsAsync) or asyncio, with `Client`'s arguments;
    closes them at the end of the test."""
    opened: list[Client | AsyncClient] = []

    def open_client(address: str, **options: Any) -> Any:
        if request.param == "sync":
            opened.append(Client(address, **options))
            return AsAsync(opened[-1])
        opened.append(AsyncClient(address, **options))
        return opened[-1]

    yield open_client
    for opened_client in opened:
        if isinstance(opened_client, AsyncClient):
            await opened_client.close()
        else:
            opened_client.close()


@pytest.fixture
async def guest(client):
    """A VM with 4 MiB of THP-backed memory at gpa 0 and one vCPU: (vm, region, vcpu)."""
    vm = await client.create_vm(max_vcpus=1)
    region = await vm.mmap(4 << 20, Backing.THP)
    await vm.set_user_memory_region(slot=0, flags=0, guest_phys_addr=0, memory_size=4 << 20,
                                    userspace_addr=region.hva)
    return vm, region, await vm.create_vcpu(0)
