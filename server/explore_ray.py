"""A pool's calls as Ray tasks: the one module that imports Ray (an optional extra).

Each call is one task of one CPU running `pool.run_call`; twice as many tasks as the
cluster has CPUs are kept in flight, so that a CPU finishing a task finds the next one
queued instead of waiting a round trip to the driver. Ray's own task retries are off: a
lost worker is `WorkerDied`, and the plan decides what to run again, as for processes.
Every node of a cluster needs vmmu installed (the tasks import it).

Ray is one per process: the first pool connects (or starts a local cluster), later ones
share that connection while it is open, and the last one to close shuts it down; a pool
asking for another address meanwhile is refused (EBUSY). A Ray initialized in this
process by someone else is used as it is, and left running.

Connecting to an address waits at most `connect_timeout()` seconds (VMMU_RAY_CONNECT_TIMEOUT,
default CONNECT_TIMEOUT_S): Ray itself retries an address where no cluster answers for
minutes. Starting a local cluster takes what it takes (15 s and more on a loaded machine).
Past that the pool is refused (ETIMEDOUT) and `ray.init` is abandoned: it goes on in its
thread, and whenever it returns, what it connected is shut down; until then this process
refuses other connections (EBUSY). A pool whose caller goes away while it connects
disconnects as soon as the connection is made.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from typing import Any

from vmmu.server.kvm.errors import KvmError
from vmmu.server.pool import Call, Pool, RayMissing, WorkerDied, run_call

try:
    import ray
    from ray.exceptions import NodeDiedError, WorkerCrashedError
except ImportError as missing:
    raise RayMissing() from missing

__all__ = ["RayPool", "TASKS_PER_CPU", "CHUNKS_PER_LANE", "MAX_BATCH", "CONNECT_TIMEOUT_ENV",
           "CONNECT_TIMEOUT_S", "connect_timeout"]

TASKS_PER_CPU = 2
CHUNKS_PER_LANE = 4      # the driver handles every task (about 1 ms of its CPU each), so
MAX_BATCH = 256          # fewer, longer tasks than for local processes: docs/scale-out.md
CONNECT_TIMEOUT_S = 15.0
CONNECT_TIMEOUT_ENV = "VMMU_RAY_CONNECT_TIMEOUT"
MAX_CONNECT_TIMEOUT_S = 3600.0


def connect_timeout() -> float:
    """The seconds a pool waits for Ray to connect: VMMU_RAY_CONNECT_TIMEOUT, else
    CONNECT_TIMEOUT_S; EINVAL for a value that is not a number of seconds in range."""
    text = os.environ.get(CONNECT_TIMEOUT_ENV)
    if text is None:
        return CONNECT_TIMEOUT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds <= MAX_CONNECT_TIMEOUT_S:
        raise KvmError(errno.EINVAL, f"{CONNECT_TIMEOUT_ENV}={text!r} is not a number of "
                       f"seconds in (0, {MAX_CONNECT_TIMEOUT_S:g}]")
    return seconds


class _Connection:
    """This process's Ray: who opened it, for which address, how many pools use it, and
    a `ray.init` given up on that has not returned yet. Changed under `lock`, in threads
    (ray.init may take minutes: never in the loop)."""

    lock = threading.Lock()
    address: str | None = None
    users = 0
    ours = False
    abandoned: _Init | None = None


def _where(address: str | None) -> str:
    return address or "a local cluster"


def _ray_init(address: str, cpus: int) -> None:
    if address:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    else:
        ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False)


class _Init(threading.Thread):
    """`ray.init` for `address`, waited for by one pool; if that pool gives up first, the
    connection made when it returns is shut down (under _Connection.lock)."""

    def __init__(self, address: str, cpus: int) -> None:
        super().__init__(name=f"ray.init {_where(address)}", daemon=True)
        self.address, self.cpus = address, cpus
        self.lock = threading.Lock()          # finished/given_up: whichever comes second
        self.finished = self.given_up = False
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            _ray_init(self.address, self.cpus)
        except Exception as failed:            # reported to the waiting pool, if any
            self.error = failed
        with self.lock:
            self.finished = True
            if not self.given_up:
                return
        with _Connection.lock:
            assert _Connection.abandoned is self and _Connection.users == 0
            if self.error is None:
                ray.shutdown()
            _Connection.abandoned = None

    def give_up(self) -> bool:
        """True if ray.init is still running (it cleans up after itself); False if it
        has just returned and the waiting pool is to take its answer."""
        with self.lock:
            self.given_up = not self.finished
            return self.given_up


def _connect(address: str, cpus: int, timeout: float) -> None:
    if not _Connection.lock.acquire(timeout=timeout):
        raise KvmError(errno.ETIMEDOUT, f"Ray did not become free in this process within "
                       f"{timeout:g} s (another pool is connecting)")
    try:
        if _Connection.abandoned is not None:
            raise KvmError(errno.EBUSY, f"this process is still trying to reach "
                           f"{_where(_Connection.abandoned.address)}, given up on after a "
                           f"timeout; try again later")
        if _Connection.users and address != _Connection.address:
            raise KvmError(errno.EBUSY, f"Ray is connected to {_where(_Connection.address)} "
                           f"in this process; {_where(address)} must wait until it is "
                           f"closed")
        if ray.is_initialized() and not _Connection.ours:
            here = ray.get_runtime_context().gcs_address
            if address not in ("", "auto", here):
                raise KvmError(errno.EBUSY, f"Ray is connected to {here} in this process, "
                               f"not to {address}")
        elif not _Connection.users:
            _initialize(address, cpus, timeout)
            _Connection.ours = True
        _Connection.address = address
        _Connection.users += 1
    finally:
        _Connection.lock.release()


def _initialize(address: str, cpus: int, timeout: float) -> None:
    """ray.init, at an address within `timeout` seconds, else ETIMEDOUT with it abandoned.
    A local cluster is started however long that takes, in this thread: its processes
    die with the thread that started them (PR_SET_PDEATHSIG), which must outlive them
    (the loop's executor threads do). Holds _Connection.lock (which the abandoned init
    takes when it returns)."""
    assert _Connection.lock.locked()
    if not address:
        _ray_init(address, cpus)
        return
    init = _Init(address, cpus)
    init.start()
    init.join(timeout)
    if init.is_alive() and init.give_up():
        _Connection.abandoned = init
        raise KvmError(errno.ETIMEDOUT, f"no Ray cluster answered at {_where(address)} "
                       f"within {timeout:g} s ({CONNECT_TIMEOUT_ENV} sets the wait)")
    init.join()                               # returned, or returning now
    if isinstance(init.error, ConnectionError):
        raise KvmError(errno.ECONNREFUSED, f"no Ray cluster at {address}: "
                       f"{init.error}") from None
    if init.error is not None:
        raise init.error


def _disconnect() -> None:
    with _Connection.lock:
        _Connection.users -= 1
        if _Connection.users == 0:
            if _Connection.ours:
                ray.shutdown()
            _Connection.address, _Connection.ours = None, False


class RayPool(Pool):
    """Calls as tasks on the Ray cluster at `address` ("": a local cluster of `cpus`)."""

    chunks_per_lane = CHUNKS_PER_LANE
    max_batch = MAX_BATCH

    def __init__(self) -> None:
        """Use `open`: a pool is made once this process is connected."""
        self.lanes = TASKS_PER_CPU * max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._task = ray.remote(num_cpus=1, max_retries=0)(run_call)

    @classmethod
    async def open(cls, address: str, cpus: int) -> RayPool:
        """Connected within `connect_timeout()` seconds, or ETIMEDOUT; if the caller goes
        away meanwhile, the connection is closed when it is made."""
        connecting = asyncio.ensure_future(
            asyncio.to_thread(_connect, address, cpus, connect_timeout()))
        try:
            await asyncio.shield(connecting)
        except asyncio.CancelledError:
            connecting.add_done_callback(_close_unwanted)
            raise
        return cls()

    async def run(self, lane: int, call: Call) -> Any:
        ref = self._task.remote(call)
        try:
            return await ref
        except (WorkerCrashedError, NodeDiedError) as lost:
            raise WorkerDied(f"Ray lost the task's worker: {type(lost).__name__}") from None
        except asyncio.CancelledError:       # its answer is no longer wanted
            ray.cancel(ref, force=True)
            raise

    async def close(self) -> None:
        await asyncio.to_thread(_disconnect)


def _close_unwanted(connecting: asyncio.Future) -> None:
    """A connection made for a pool whose caller went away: closed (in a thread)."""
    if not connecting.cancelled() and connecting.exception() is None:
        threading.Thread(target=_disconnect, name="ray disconnect", daemon=True).start()
