"""A Ray address where no cluster answers: `vmmu explore --ray`, `vmmu scale --ray` and
ExploreService give up after VMMU_RAY_CONNECT_TIMEOUT seconds with the reason, start
nothing, and a client that goes away while Ray connects leaves nothing behind.

Ray retries such an address for minutes, in a thread this process cannot stop; every
case runs in a process of its own so that no abandoned `ray.init` outlives it here.
"""

import os
import socket
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("ray", reason="Ray is not installed (pip install 'vmmu[ray]')")

WAIT_S = 2
BOUND_S = 120          # far below Ray's own minutes of retries, far above WAIT_S + imports


@pytest.fixture
def nobody() -> str:
    """HOST:PORT of a localhost port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def run(*args: str, wait: float = WAIT_S) -> subprocess.CompletedProcess:
    """`args` in a Python of its own waiting `wait` s for Ray; killed (the test fails) if
    it outlives BOUND_S."""
    env = {**os.environ, "VMMU_RAY_CONNECT_TIMEOUT": str(wait)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          timeout=BOUND_S)


@pytest.mark.parametrize("command", [("explore", "tlb_vs_zap", "--seeds", "1"),
                                     ("scale", "--quick")])
def test_the_cli_gives_up_on_an_address_where_nobody_answers(command, nobody):
    done = run("-m", "vmmu.cli", *command, "--ray", nobody)
    assert done.returncode == 2 and done.stdout == ""
    assert (f"vmmu {command[0]}: no Ray cluster answered at {nobody} within {WAIT_S} s"
            in done.stderr), done.stderr


SERVED = textwrap.dedent("""
    import asyncio, sys, threading, time
    import grpc, ray
    from vmmu.server.rpc.app import start_server
    from vmmu.server import explore_ray
    from vmmu.v1 import explore_pb2, explore_pb2_grpc

    async def explore(stub):
        try:
            async for _ in stub.Explore(explore_pb2.ExploreRequest(
                    scenario="tlb_vs_zap", seeds=1, ray=True, ray_address=sys.argv[1])):
                pass
        except grpc.aio.AioRpcError as refused:
            return f"{refused.code().name} {refused.details()}"
        return "answered"

    def connected():
        return (explore_ray._Connection.users, ray.is_initialized())

    def settled():
        return not (explore_ray._Connection.lock.locked() or any(connected()) or any(
            thread.name.startswith(("ray.init", "ray disconnect"))
            for thread in threading.enumerate()))

    async def main():
        serving = await start_server("127.0.0.1:0")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{serving.port}") as channel:
            stub = explore_pb2_grpc.ExploreServiceStub(channel)
            if sys.argv[2] == "refused":
                print(await explore(stub))
                print(connected())
                print(await explore(stub))        # the abandoned ray.init still runs
            else:                                 # the client goes away while connecting
                call = asyncio.ensure_future(explore(stub))
                while not explore_ray._Connection.lock.locked():
                    await asyncio.sleep(0.01)
                call.cancel()
                deadline = time.monotonic() + {settle}
                while not settled() and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                print(connected())
        await serving.stop(grace=1.0)
        print(connected())

    asyncio.run(main())
    """).replace("{settle}", str(BOUND_S / 2))


def test_the_rpc_is_unavailable_with_the_reason_and_nothing_is_started(nobody):
    done = run("-c", SERVED, nobody, "refused")
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stderr
    assert lines[0] == (f"UNAVAILABLE ETIMEDOUT: no Ray cluster answered at {nobody} within "
                        f"{WAIT_S} s (VMMU_RAY_CONNECT_TIMEOUT sets the wait)")
    assert lines[1] == "(0, False)"
    assert lines[2].startswith(f"FAILED_PRECONDITION EBUSY: this process is still trying "
                               f"to reach {nobody}")
    assert lines[3] == "(0, False)"


def test_a_client_gone_while_a_local_cluster_starts_leaves_it_shut_down():
    done = run("-c", SERVED, "", "cancelled", wait=BOUND_S / 4)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["(0, False)", "(0, False)"]


def test_a_bad_wait_is_refused():
    from vmmu.server.explore_ray import connect_timeout
    from vmmu.server.kvm.errors import KvmError
    for text in ("soon", "0", "-1", "1e9", "nan"):
        os.environ["VMMU_RAY_CONNECT_TIMEOUT"] = text
        try:
            with pytest.raises(KvmError, match="is not a number of seconds"):
                connect_timeout()
        finally:
            del os.environ["VMMU_RAY_CONNECT_TIMEOUT"]
