"""Schedule exploration fanned out: an exploration's seeds run on worker processes or Ray.

A seed's run is deterministic and independent of every other, so the seeds are the unit of
work: they are handed out in batches of consecutive seeds (a `Chunk`), each batch run by
`explore()` of the model in a worker, in whatever order the workers finish. The result is
the sequential explorer's, whatever the parallelism: the LOWEST violating seed (with the
same trace), or that every seed passed. `Plan` keeps that invariant: no chunk beyond the
lowest violation found so far is handed out, and the exploration ends only once every
chunk below it has come back.

A worker that dies (its process exits, Ray loses it) is not a clean seed. Its chunk is
run again seed by seed; a seed whose worker dies `ATTEMPTS` times is reported as that
seed's outcome, oracle `worker-died`. Every death is counted (`workers_lost`).

    async with open_workers(workers=4) as pool:               # or ray="" / ray="ADDR"
        async for step in pool.explore_steps("tlb_vs_zap", 10_000, knobs): ...

Workers are `python -m vmmu.server.explore_pool` processes speaking JSON lines on
stdin/stdout (exec'd, never forked: a gRPC server must not fork), or Ray tasks; Ray is
imported only when asked for. One worker is the model's own in-process explorer.

Test hook: with `VMMU_EXPLORE_CRASH=SEED` in its environment, a worker exits abruptly
(status 70) when handed a chunk that holds SEED; with `SEED:MARKER` only while the file
MARKER does not exist (it creates it first), so that it dies once.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import os
import sys
import traceback
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field

from vmmu.server.kvm import explore as model
from vmmu.server.kvm.errors import einval
from vmmu.server.kvm.explore import ExploreResult, ExploreStep, Outcome

__all__ = ["ATTEMPTS", "MAX_WORKERS", "Chunk", "Plan", "RayMissing", "WorkerDied",
           "default_workers", "open_workers", "explore_steps", "run_chunk"]

ATTEMPTS = 3                 # deaths of a single seed's worker before it is a finding
MAX_WORKERS = 64
MAX_BATCH = 32               # seeds per chunk: ~1 s of work, a task's overhead amortized
CRASH_HOOK = "VMMU_EXPLORE_CRASH"
CRASH_STATUS = 70
WORKER_DIED = "worker-died"
RAY_INSTALL = "pip install 'vmmu[ray]'"


class WorkerDied(Exception):
    """The worker running a chunk went away before answering."""


class RayMissing(RuntimeError):
    """Ray was asked for and is not installed."""


def default_workers() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)


@dataclass(frozen=True, order=True)
class Chunk:
    """Seeds first .. first + count - 1 of one exploration."""

    first: int
    count: int


def run_chunk(scenario: str, knobs: frozenset[str], chunk: Chunk) -> ExploreResult:
    """A worker's body: the model's explorer over one chunk, in a loop of its own."""
    _crash_hook(chunk)
    return asyncio.run(model.explore(scenario, chunk.count, knobs, chunk.first))


def _crash_hook(chunk: Chunk) -> None:
    hook = os.environ.get(CRASH_HOOK)
    if not hook:
        return
    seed, _, marker = hook.partition(":")
    if not chunk.first <= int(seed) < chunk.first + chunk.count:
        return
    if marker:
        if os.path.exists(marker):
            return
        open(marker, "w").close()
    os._exit(CRASH_STATUS)


@dataclass
class Plan:
    """Which seeds of one exploration are handed out, running, and what came back.

    The bound is the lowest violating seed known (or the end): chunks are handed out
    lowest first and only below the bound, and the exploration is over when nothing
    below the bound is pending or running. Plain bookkeeping; no await in it, and
    O(log n) per chunk but when the bound moves (thousands of chunks run at once on a
    cluster, and the driver must keep up).
    """

    first_seed: int
    seeds: int
    batch: int
    next_seed: int = -1
    retries: list[Chunk] = field(default_factory=list)       # a heap
    running: set[Chunk] = field(default_factory=set)
    running_below: int = 0                                   # running chunks below bound
    first_violation: Outcome | None = None
    seeds_done: int = 0
    workers_lost: int = 0
    deaths: dict[int, int] = field(default_factory=dict)     # single seed -> deaths

    def __post_init__(self) -> None:
        self.next_seed = self.first_seed

    @property
    def bound(self) -> int:
        if self.first_violation is not None:
            return self.first_violation.seed
        return self.first_seed + self.seeds

    def take(self) -> Chunk | None:
        """The lowest chunk to run next, or None if nothing below the bound is left."""
        if self.retries and self.retries[0].first < self.bound:
            chunk = heapq.heappop(self.retries)
        elif self.next_seed < self.bound:
            chunk = Chunk(self.next_seed, min(self.batch, self.bound - self.next_seed))
            self.next_seed += chunk.count
        else:
            return None
        self.running.add(chunk)
        self.running_below += 1
        return chunk

    def _stopped(self, chunk: Chunk) -> None:
        self.running.remove(chunk)
        if chunk.first < self.bound:
            self.running_below -= 1

    def finish(self, chunk: Chunk, result: ExploreResult) -> None:
        self._stopped(chunk)
        self.seeds_done += result.seeds_run
        self._found(result.first_violation)

    def died(self, chunk: Chunk, reason: str) -> None:
        """The chunk's worker went away: run its seeds again, one per chunk; a seed
        whose worker dies ATTEMPTS times is that seed's outcome."""
        self._stopped(chunk)
        self.workers_lost += 1
        if chunk.count > 1:
            for seed in range(chunk.first, chunk.first + chunk.count):
                heapq.heappush(self.retries, Chunk(seed, 1))
            return
        deaths = self.deaths[chunk.first] = self.deaths.get(chunk.first, 0) + 1
        if deaths < ATTEMPTS:
            heapq.heappush(self.retries, chunk)
            return
        self.seeds_done += 1
        self._found(Outcome(chunk.first, f"the worker died {deaths} times running seed "
                                         f"{chunk.first}: {reason}", WORKER_DIED))

    def _found(self, outcome: Outcome | None) -> None:
        if outcome is not None and (self.first_violation is None
                                    or outcome.seed < self.first_violation.seed):
            self.first_violation = outcome
            self.running_below = sum(c.first < outcome.seed for c in self.running)

    def over(self) -> bool:
        return (self.next_seed >= self.bound and self.running_below == 0
                and not (self.retries and self.retries[0].first < self.bound))

    def last_step(self) -> ExploreStep:
        found = self.first_violation
        seeds_run = self.seeds if found is None else found.seed - self.first_seed + 1
        return ExploreStep(seeds_run, True, found, self.workers_lost)


class Workers:
    """Lanes that each run one chunk at a time; subclasses say where a chunk runs."""

    lanes: int
    chunks_per_lane = 8
    max_batch = MAX_BATCH

    def batch(self, seeds: int) -> int:
        """Seeds per chunk: several chunks per lane, to keep every lane busy to the end."""
        return max(1, min(self.max_batch, seeds // (self.lanes * self.chunks_per_lane)))

    async def run(self, lane: int, scenario: str, knobs: frozenset[str],
                  chunk: Chunk) -> ExploreResult:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def explore_steps(self, name: str, seeds: int, knobs: frozenset[str] = frozenset(),
                            first_seed: int = 0, every: int = 0,
                            batch: int = 0) -> AsyncIterator[ExploreStep]:
        """As the model's `explore_steps`: progress every `every` seeds done (in any
        order), then the last step with the lowest violating seed."""
        model.check(name, seeds, knobs)
        plan = Plan(first_seed, seeds, batch or self.batch(seeds))
        free = list(range(self.lanes))
        running: dict[asyncio.Task, tuple[int, Chunk]] = {}
        finished: asyncio.Queue[asyncio.Task] = asyncio.Queue()
        reported = 0
        try:
            while True:
                while free and (chunk := plan.take()) is not None:
                    lane = free.pop()
                    task = asyncio.create_task(self.run(lane, name, knobs, chunk))
                    task.add_done_callback(finished.put_nowait)
                    running[task] = lane, chunk
                if plan.over():
                    break
                done = [await finished.get()]
                while not finished.empty():
                    done.append(finished.get_nowait())
                for task in done:
                    lane, chunk = running.pop(task)
                    free.append(lane)
                    try:
                        plan.finish(chunk, task.result())
                    except WorkerDied as died:
                        plan.died(chunk, str(died))
                if every and plan.seeds_done // every > reported and not plan.over():
                    reported = plan.seeds_done // every
                    yield ExploreStep(plan.seeds_done, False, None, plan.workers_lost)
        finally:
            for task in running:              # chunks beyond the lowest violation
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
        yield plan.last_step()


class _InProcess(Workers):
    """One worker: the model's explorer in this process and this loop."""

    lanes = 1

    async def explore_steps(self, name: str, seeds: int, knobs: frozenset[str] = frozenset(),
                            first_seed: int = 0, every: int = 0,
                            batch: int = 0) -> AsyncIterator[ExploreStep]:
        async for step in model.explore_steps(name, seeds, knobs, first_seed, every):
            yield step

    async def close(self) -> None:
        pass


def _encode(result: ExploreResult) -> str:
    found = result.first_violation
    return json.dumps({"seeds_run": result.seeds_run,
                       "first_violation": None if found is None else asdict(found)})


class _Processes(Workers):
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

    async def run(self, lane: int, scenario: str, knobs: frozenset[str],
                  chunk: Chunk) -> ExploreResult:
        request = {"scenario": scenario, "knobs": sorted(knobs), "first": chunk.first,
                   "count": chunk.count}
        try:
            proc = await self._proc(lane)
            proc.stdin.write(json.dumps(request).encode() + b"\n")
            await proc.stdin.drain()
            line = await proc.stdout.readline()
        except (BrokenPipeError, ConnectionResetError):
            line = b""
        except asyncio.CancelledError:        # its seeds are no longer wanted
            self._stop(lane)
            raise
        if not line:
            status = await proc.wait()
            del self._procs[lane]
            raise WorkerDied(f"worker process {proc.pid} exited with status {status}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"seeds {chunk.first}..{chunk.first + chunk.count - 1} of "
                               f"{scenario} failed in a worker:\n{reply['error']}")
        found = reply["first_violation"]
        return ExploreResult(scenario, knobs, reply["seeds_run"],
                             None if found is None else Outcome(**found))

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


def _serve_chunks() -> None:
    """A worker process: one JSON request per line on stdin, one reply per line."""
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)                            # anything else printed goes to stderr
    for line in sys.stdin:
        request = json.loads(line)
        chunk = Chunk(request["first"], request["count"])
        try:
            reply = _encode(run_chunk(request["scenario"], frozenset(request["knobs"]),
                                      chunk))
        except Exception:
            reply = json.dumps({"error": traceback.format_exc()})
        replies.write(reply + "\n")
        replies.flush()


@asynccontextmanager
async def open_workers(workers: int = 1, ray: str | None = None) -> AsyncIterator[Workers]:
    """Workers for explorations: `workers` local processes (1: this process), or with
    `ray` Ray tasks on the cluster at that address ("" for a local cluster of `workers`
    CPUs; a Ray already initialized in this process is used as it is)."""
    if not 1 <= workers <= MAX_WORKERS:
        raise einval(f"workers {workers} is not in 1..{MAX_WORKERS}")
    if ray is not None:
        from vmmu.server.explore_ray import RayWorkers   # imports ray
        pool: Workers = RayWorkers(ray, workers)
    elif workers == 1:
        pool = _InProcess()
    else:
        pool = _Processes(workers)
    try:
        yield pool
    finally:
        await pool.close()


async def explore_steps(name: str, seeds: int, knobs: frozenset[str] = frozenset(),
                        first_seed: int = 0, every: int = 0, *, workers: int = 1,
                        ray: str | None = None) -> AsyncIterator[ExploreStep]:
    """One exploration on its own workers (see `Workers.explore_steps`)."""
    model.check(name, seeds, knobs)
    async with open_workers(workers, ray) as pool:
        async for step in pool.explore_steps(name, seeds, knobs, first_seed, every):
            yield step


if __name__ == "__main__":
    _serve_chunks()
