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
"""

from __future__ import annotations

import asyncio
import errno
import threading
from typing import Any

from vmmu.server.kvm.errors import KvmError
from vmmu.server.pool import Call, Pool, RayMissing, WorkerDied, run_call

try:
    import ray
    from ray.exceptions import NodeDiedError, WorkerCrashedError
except ImportError as missing:
    raise RayMissing() from missing

__all__ = ["RayPool", "TASKS_PER_CPU", "CHUNKS_PER_LANE", "MAX_BATCH"]

TASKS_PER_CPU = 2
CHUNKS_PER_LANE = 4      # the driver handles every task (about 1 ms of its CPU each), so
MAX_BATCH = 256          # fewer, longer tasks than for local processes: docs/scale-out.md


class _Connection:
    """This process's Ray: who opened it, for which address, how many pools use it.
    Changed under `lock`, in threads (ray.init may take seconds: not in the loop)."""

    lock = threading.Lock()
    address: str | None = None
    users = 0
    ours = False


def _connect(address: str, cpus: int) -> None:
    with _Connection.lock:
        if _Connection.users and address != _Connection.address:
            raise KvmError(errno.EBUSY, f"Ray is connected to "
                           f"{_Connection.address or 'a local cluster'} in this process; "
                           f"{address or 'a local cluster'} must wait until it is closed")
        if ray.is_initialized() and not _Connection.ours:
            here = ray.get_runtime_context().gcs_address
            if address not in ("", "auto", here):
                raise KvmError(errno.EBUSY, f"Ray is connected to {here} in this process, "
                               f"not to {address}")
        elif not _Connection.users:
            try:
                if address:
                    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
                else:
                    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR",
                             log_to_driver=False)
            except ConnectionError as unreachable:
                raise KvmError(errno.ECONNREFUSED, f"no Ray cluster at {address}: "
                               f"{unreachable}") from None
            _Connection.ours = True
        _Connection.address = address
        _Connection.users += 1


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
        await asyncio.to_thread(_connect, address, cpus)
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
