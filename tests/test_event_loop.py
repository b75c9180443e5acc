"""The event loop a command runs on (vmmu.event_loop): uvloop, the optional extra, serves
the RPC API and keeps virtual time deterministic; asking for it without it installed is
refused with the reason.

The whole suite also runs on uvloop with VMMU_EVENT_LOOP=uvloop (tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import pytest

from vmmu import event_loop
from vmmu.cli import main as cli_main
from vmmu.client import AsyncClient, Backing, BatchBuilder
from vmmu.scale import demand_faults
from vmmu.server.rpc.app import start_server

try:
    import uvloop
except ImportError:
    uvloop = None
needs_uvloop = pytest.mark.skipif(uvloop is None, reason="uvloop is not installed "
                                  "(pip install 'vmmu[fast]'): this check runs on it")


async def _round_trip() -> tuple[type, bytes, int]:
    """A server and a client on the running loop: fault a page in with a write, read it
    back through the hva; the loop's type, the bytes read and the vCPU's faults."""
    serving = await start_server("127.0.0.1:0")
    try:
        async with AsyncClient(f"127.0.0.1:{serving.port}") as client:
            vm = await client.create_vm(max_vcpus=1)
            region = await vm.mmap(1 << 20, Backing.PAGE_4K)
            await vm.set_user_memory_region(slot=0, flags=0, guest_phys_addr=0,
                                            memory_size=1 << 20, userspace_addr=region.hva)
            vcpu = await vm.create_vcpu(0)
            result = await vcpu.run(BatchBuilder().write(0x3000, data=b"uvloop!!").build())
            data = await vm.read_hva(region.hva + 0x3000, 8)
            faults = (await vcpu.stats())["pf_taken"]
            await vm.destroy()
    finally:
        await serving.stop(grace=1.0)
    assert result.exit.reason.name == "DONE"
    return type(asyncio.get_running_loop()), data, faults


@needs_uvloop
def test_rpc_round_trip_on_uvloop():
    loop_type, data, faults = event_loop.run(_round_trip(), "uvloop")
    assert loop_type is uvloop.Loop
    assert data == b"uvloop!!"
    assert faults == 1


@needs_uvloop
def test_virtual_time_is_the_same_on_both_loops():
    on = {name: json.dumps(event_loop.run(demand_faults(8, 32, "read+rcu", seed=3), name),
                           sort_keys=True)
          for name in ("asyncio", "uvloop")}
    assert json.loads(on["uvloop"])["virtual_ns"] > 0
    assert on["uvloop"] == on["asyncio"]


@needs_uvloop
def test_auto_takes_uvloop_and_asyncio_keeps_the_default():
    async def loop_type() -> type:
        return type(asyncio.get_running_loop())
    assert event_loop.run(loop_type(), "auto") is uvloop.Loop
    assert event_loop.run(loop_type(), "asyncio") is not uvloop.Loop


def test_asking_for_uvloop_without_it_is_refused(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvloop", None)        # as if it were not installed
    monkeypatch.delenv(event_loop.ENV, raising=False)
    assert event_loop.loop_name("auto") == "asyncio"
    assert cli_main(["demo", "--accesses", "1", "--event-loop", "uvloop"]) == 2
    assert "pip install 'vmmu[fast]'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="one of auto, uvloop, asyncio"):
        event_loop.loop_factory("trio")


async def test_the_suite_runs_on_the_loop_it_asked_for():
    asked = event_loop.loop_name(os.environ[event_loop.ENV])     # conftest: asyncio unless set
    running = type(asyncio.get_running_loop()).__module__.split(".")[0]
    assert running == asked


def test_scale_defaults_to_auto_and_the_server_to_asyncio(monkeypatch, capsys):
    monkeypatch.delenv(event_loop.ENV)
    assert cli_main(["scale", "no-such-sweep"]) == 2        # refused after the choice
    assert os.environ[event_loop.ENV] == "auto"
    monkeypatch.delenv(event_loop.ENV)
    assert cli_main(["serve", "--tls-cert", "cert.pem"]) == 2
    assert os.environ[event_loop.ENV] == "asyncio"
    monkeypatch.setenv(event_loop.ENV, "uvloop")             # the variable beats the default
    monkeypatch.setitem(sys.modules, "uvloop", None)
    assert cli_main(["scale", "no-such-sweep"]) == 2
    assert "pip install 'vmmu[fast]'" in capsys.readouterr().err
