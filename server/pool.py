"""Independent deterministic jobs fanned out: worker processes or Ray tasks.

A job is a `Call`: a module-level function named by "module:function", applied to JSON
arguments, returning a JSON value. Its answer does not depend on where it runs (this
process, a worker process, a Ray task), so the work of an exploration's seeds or of a
sweep's configurations can be spread over as many lanes as the machine or the cluster
has, and put back in order by the driver: `drive` hands a plan's jobs to free lanes and
gives each answer back to the plan, which says what to run next and when it is over.

A worker that dies (its process exits, Ray loses it) raises `WorkerDied` for its job: the
plan decides what to run again (`ATTEMPTS`), and reports it; a dead worker's job is never
counted as done.

    async with open_pool(workers=4) as pool:               # or ray="" / ray="ADDR"
        async for _ in drive(pool, plan, call, decode): ...   # after each batch of answers

Worker processes are `python -m vmmu.server.pool`, speaking JSON lines on stdin/stdout
(exec'd, never forked: a gRPC server must not fork). Ray is imported only when asked for
(server/explore_ray.py). One worker is this process: each job in a thread of its own.

Test hook: with `VMMU_POOL_CRASH=N` in its environment, a worker exits abruptly (status
70) when handed a job whose marks hold N (an exploration's seeds, a sweep's configuration
numbers); with `N:MARKER` only while the file MARKER does not exist (it creates it
first), so that it dies once.
"""

from __future__ import annotations

import asyncio
import errno
import heapq
import importlib
import json
import os
import re
import sys
import traceback
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from vmmu.server.kvm.errors import KvmError, einval

__all__ = ["ATTEMPTS", "CRASH_HOOK", "MAX_WORKERS", "RAY_INSTALL", "Call", "Jobs", "Pool",
           "Plan", "RayMissing", "WorkerDied", "check_options", "default_workers", "drive",
           "open_pool", "ray_option", "run_call"]

ATTEMPTS = 3                 # deaths of a job's worker before it is reported
MAX_WORKERS = 64
CRASH_HOOK = "VMMU_POOL_CRASH"
CRASH_STATUS = 70
RAY_INSTALL = "pip install 'vmmu[ray]'"

Job = TypeVar("Job")


class WorkerDied(Exception):
    """The worker running a job went away before answering."""


class RayMissing(KvmError):
    """Ray was asked for and is not installed."""

    def __init__(self) -> None:
        super().__init__(errno.EOPNOTSUPP, f"Ray is not installed: {RAY_INSTALL}")


def default_workers() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)


@dataclass(frozen=True)
class Call:
    """`function(*args)`, function named "module:name"; `marks` (first, count): the
    numbers the job is about, for the crash hook and for messages."""

    function: str
    args: tuple
    marks: tuple[int, int]


def run_call(call: Call) -> Any:
    """A worker's body: the call, in this process."""
    _crash_hook(call.marks)
    module, _, name = call.function.partition(":")
    return getattr(importlib.import_module(module), name)(*call.args)


def _crash_hook(marks: tuple[int, int]) -> None:
    hook = os.environ.get(CRASH_HOOK)
    if not hook:
        return
    mark, _, marker = hook.partition(":")
    first, count = marks
    if not first <= int(mark) < first + count:
        return
    if marker:
        if os.path.exists(marker):
            return
        open(marker, "w").close()
    os._exit(CRASH_STATUS)


class Plan(Protocol[Job]):
    """What `drive` asks of a plan; plain bookkeeping, no await in it."""

    def take(self) -> Job | None: ...          # the next job to run, None: none for now
    def finish(self, job: Job, result: Any) -> None: ...
    def died(self, job: Job, reason: str) -> None: ...
    def over(self) -> bool: ...


class Jobs:
    """Jobs 0 .. count - 1, each to run once, lowest first: a plan for work whose every
    job is wanted (a sweep's configurations). A job whose worker died runs again; after
    ATTEMPTS deaths it has failed, and `raise_if_failed` says so."""

    def __init__(self, count: int) -> None:
        self.results: list[Any] = [None] * count
        self.todo = list(range(count))          # a heap
        self.done = [False] * count
        self.deaths: dict[int, int] = {}
        self.failed: dict[int, str] = {}
        self.resolved = 0
        self.workers_lost = 0
        self._prefix = 0

    def take(self) -> int | None:
        return heapq.heappop(self.todo) if self.todo else None

    def finish(self, job: int, result: Any) -> None:
        self.results[job], self.done[job] = result, True
        self.resolved += 1

    def died(self, job: int, reason: str) -> None:
        self.workers_lost += 1
        deaths = self.deaths[job] = self.deaths.get(job, 0) + 1
        if deaths < ATTEMPTS:
            heapq.heappush(self.todo, job)
            return
        self.failed[job] = f"the worker died {deaths} times: {reason}"
        self.resolved += 1

    def over(self) -> bool:
        return self.resolved == len(self.results)

    def done_prefix(self) -> int:
        """How many jobs from the first have their results."""
        while self._prefix < len(self.done) and self.done[self._prefix]:
            self._prefix += 1
        return self._prefix

    def raise_if_failed(self, describe: Callable[[int], str]) -> None:
        """WorkerDied for the lowest failed job, if any (`describe` names it)."""
        if self.failed:
            job = min(self.failed)
            raise WorkerDied(f"{describe(job)}: {self.failed[job]}")


class Pool:
    """Lanes that each run one call at a time; subclasses say where a call runs.

    `chunks_per_lane` and `max_batch` say how finely work that can be batched (an
    exploration's seeds) is cut for this pool: a task's overhead set against keeping
    every lane busy to the end."""

    lanes: int
    chunks_per_lane = 8
    max_batch = 32               # seeds of an exploration: ~1 s of work

    async def run(self, lane: int, call: Call) -> Any:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


async def drive(pool: Pool, plan: Plan[Job], call: Callable[[Job], Call],
                decode: Callable[[Any], Any] = lambda result: result
                ) -> AsyncIterator[None]:
    """Run the plan's jobs on the pool's lanes until the plan is over; yields after each
    batch of answers given to the plan (while it is not over). Calls still running when
    the plan is over (or the caller stops) are cancelled."""
    free = list(range(pool.lanes))
    running: dict[asyncio.Task, tuple[int, Job]] = {}
    finished: asyncio.Queue[asyncio.Task] = asyncio.Queue()
    try:
        while True:
            while free and (job := plan.take()) is not None:
                lane = free.pop()
                task = asyncio.create_task(pool.run(lane, call(job)))
                task.add_done_callback(finished.put_nowait)
                running[task] = lane, job
            if plan.over():
                return
            done = [await finished.get()]
            while not finished.empty():
                done.append(finished.get_nowait())
            for task in done:
                lane, job = running.pop(task)
                free.append(lane)
                try:
                    plan.finish(job, decode(task.result()))
                except WorkerDied as died:
                    plan.died(job, str(died))
            if not plan.over():
                yield
    finally:
        for task in running:                  # answers no longer wanted
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


class _InProcess(Pool):
    """One lane: this process, each call in a thread (a job runs its own event loop)."""

    lanes = 1

    async def run(self, lane: int, call: Call) -> Any:
        return await asyncio.to_thread(run_call, call)

    async def close(self) -> None:
        pass


class _Processes(Pool):
    """`lanes` worker processes, each started on first use and again after it died."""

    def __init__(self, lanes: int) -> None:
        self.lanes = lanes
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._gone: list[asyncio.subprocess.Process] = []

    async def _proc(self, lane: int) -> asyncio.subprocess.Process:
        proc = self._procs.get(lane)
        if proc is None or proc.returncode is not None:
            proc = self._procs[lane] = await asyncio.create_subprocess_exec(
                sys.executable, "-m", __name__, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, limit=1 << 24)
        return proc

    async def run(self, lane: int, call: Call) -> Any:
        request = {"function": call.function, "args": call.args, "marks": call.marks}
        try:
            proc = await self._proc(lane)
            proc.stdin.write(json.dumps(request).encode() + b"\n")
            await proc.stdin.drain()
            line = await proc.stdout.readline()
        except (BrokenPipeError, ConnectionResetError):
            line = b""
        except asyncio.CancelledError:        # its answer is no longer wanted
            self._stop(lane)
            raise
        if not line:
            status = await proc.wait()
            del self._procs[lane]
            raise WorkerDied(f"worker process {proc.pid} exited with status {status}")
        reply = json.loads(line)
        if "error" in reply:
            first, count = call.marks
            raise RuntimeError(f"{call.function} on {first}..{first + count - 1} failed in "
                               f"a worker:\n{reply['error']}")
        return reply["result"]

    def _stop(self, lane: int) -> None:
        proc = self._procs.pop(lane, None)
        if proc is not None and proc.returncode is None:
            proc.kill()
            self._gone.append(proc)

    async def close(self) -> None:
        for proc in self._procs.values():
            proc.stdin.close()               # end of requests: the worker returns
        self._gone.extend(self._procs.values())
        self._procs.clear()
        await asyncio.gather(*(proc.wait() for proc in self._gone))
        self._gone.clear()


def _serve_calls() -> None:
    """A worker process: one JSON request per line on stdin, one reply per line."""
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)                            # anything else printed goes to stderr
    for line in sys.stdin:
        request = json.loads(line)
        call = Call(request["function"], tuple(request["args"]), tuple(request["marks"]))
        try:
            reply = json.dumps({"result": run_call(call)})
        except Exception:
            reply = json.dumps({"error": traceback.format_exc()})
        replies.write(reply + "\n")
        replies.flush()


RAY_ADDRESS = re.compile(r"(ray://)?(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]{0,252}))"
                         r":([0-9]{1,5})")


def check_options(workers: int, ray: str | None) -> None:
    """EINVAL unless `workers` is in 1..MAX_WORKERS and `ray` is None (no Ray), "" (a
    local cluster of `workers` CPUs), or with one worker "auto" (the cluster this
    machine is part of) or HOST:PORT, with or without ray:// (Ray Client)."""
    if not 1 <= workers <= MAX_WORKERS:
        raise einval(f"workers {workers} is not in 1..{MAX_WORKERS}")
    if ray and workers > 1:
        raise einval("the Ray cluster's CPUs set the parallelism at an address; workers "
                     "are for local processes or a local Ray cluster", field="workers")
    if ray in (None, "", "auto"):
        return
    match = RAY_ADDRESS.fullmatch(ray)
    if match is None or not 1 <= int(match.group(4)) <= 65535:
        raise einval(f"Ray address {ray!r} is not HOST:PORT, ray://HOST:PORT or auto",
                     field="ray_address")


def ray_option(use_ray: bool, address: str) -> str | None:
    """`open_pool`'s `ray` from a request's two fields: None without Ray."""
    if address and not use_ray:
        raise einval(f"a Ray address ({address}) without Ray", field="ray_address")
    return address if use_ray else None


@asynccontextmanager
async def open_pool(workers: int = 1, ray: str | None = None) -> AsyncIterator[Pool]:
    """`workers` local processes (1: this process), or with `ray` Ray tasks on the
    cluster at that address ("" for a local cluster of `workers` CPUs; a Ray already
    initialized in this process is used as it is)."""
    check_options(workers, ray)
    if ray is not None:
        from vmmu.server.explore_ray import RayPool    # imports ray
        pool: Pool = await RayPool.open(ray, workers)
    elif workers == 1:
        pool = _InProcess()
    else:
        pool = _Processes(workers)
    try:
        yield pool
    finally:
        await pool.close()


if __name__ == "__main__":
    _serve_calls()
