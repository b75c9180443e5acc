"""Exploration chunks as Ray tasks: the one module that imports Ray (an optional extra).

Each chunk is one task of one CPU running `explore_pool.run_chunk`; twice as many tasks as
the cluster has CPUs are kept in flight, so that a CPU finishing a task finds the next one
queued instead of waiting a round trip to the driver. Ray's own task retries are off: a
lost worker is `WorkerDied`, and the `Plan` decides what to run again, as for processes.
Every node of a cluster needs vmmu installed (the tasks import it).
"""

from __future__ import annotations

import asyncio

from vmmu.server.explore_pool import (RAY_INSTALL, Chunk, RayMissing, WorkerDied, Workers,
                                      run_chunk)
from vmmu.server.kvm.explore import ExploreResult

try:
    import ray
    from ray.exceptions import NodeDiedError, WorkerCrashedError
except ImportError as missing:
    raise RayMissing(f"Ray is not installed: {RAY_INSTALL}") from missing

__all__ = ["RayWorkers", "TASKS_PER_CPU", "CHUNKS_PER_LANE", "MAX_BATCH"]

TASKS_PER_CPU = 2
CHUNKS_PER_LANE = 4      # the driver handles every task (about 1 ms of its CPU each), so
MAX_BATCH = 256          # fewer, longer tasks than for local processes: docs/scale-out.md


class RayWorkers(Workers):
    """Chunks as tasks on the Ray cluster at `address` ("": a local cluster of `cpus`);
    a Ray already initialized in this process is used as it is, and left running."""

    chunks_per_lane = CHUNKS_PER_LANE
    max_batch = MAX_BATCH

    def __init__(self, address: str, cpus: int) -> None:
        self._started = not ray.is_initialized()
        if self._started:
            if address:
                ray.init(address=address, logging_level="ERROR", log_to_driver=False)
            else:
                ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR",
                         log_to_driver=False)
        self.lanes = TASKS_PER_CPU * max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._task = ray.remote(num_cpus=1, max_retries=0)(run_chunk)

    async def run(self, lane: int, scenario: str, knobs: frozenset[str],
                  chunk: Chunk) -> ExploreResult:
        ref = self._task.remote(scenario, knobs, chunk)
        try:
            return await ref
        except (WorkerCrashedError, NodeDiedError) as lost:
            raise WorkerDied(f"Ray lost the task's worker: {type(lost).__name__}") from None
        except asyncio.CancelledError:       # its seeds are no longer wanted
            ray.cancel(ref, force=True)
            raise

    async def close(self) -> None:
        if self._started:
            ray.shutdown()
