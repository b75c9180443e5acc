"""Virtual time: a discrete-event simulation of a VM's CPUs, run on the model's own code.

Every vCPU, and every host-side caller of the model (an invalidator, the ager, a harvester,
a GPC refresher, a client-held invalidation), is an *actor*: a simulated CPU with its own
virtual time in ns. One actor at a time holds the *turn* and runs model code; what it does
charges costs (costs.py) to its time. Where it awaits, at a preemption point or to wait for
something, it gives the turn back, and the clock gives it to the runnable actor with the
smallest virtual time, ties broken by a seeded draw: the order in which the model's tasks
run is the order of virtual time, at the grain of the code between two awaits (a segment,
atomic as every synchronous stretch of the model is).

Waiting is where time is lost. An actor that waits (for mmu_lock, a grace period, the end of
an invalidation) is *parked*: not runnable. The task that ends the wait wakes it (`wake`),
which makes it runnable at once at the waker's time, so no later event overtakes the wake;
it resumes no earlier than the event it waited for. A task cancelled after it was given
the turn keeps it while it unwinds, so that its cleanup (a lock released, a read-side
section left) runs in its own virtual time, and gives it up where it leaves the
simulation (`running`).

Invariants: `now`, the time of the latest dispatch, never goes back; an actor entering the
simulation starts no earlier than `now`; at most one actor holds the turn. Driving: the
clock runs whatever is runnable (free-running) until a simulator calls `advance(until)`;
from then on nothing runs past the latest `until` (the horizon).

Stepping: an actor is usually a task, and a switch between two tasks is a round trip of the
event loop. `clock.gather(*coros)` runs coroutines that are actors (vCPU runs, say) in the
calling task instead, stepping each itself (`coro.send`) as a task would: the switch from
one of them to another is then a call, and the turn such a coroutine waits for at a point
a `_Turn`, not a future. Who runs is `me()`: the coroutine being stepped, or
the current task. The order of the simulation is the clock's either way, so the results
are the same to the byte (tests/model/test_stepping.py).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import heapq
import itertools
import random
from asyncio import current_task
from contextlib import asynccontextmanager, contextmanager

from .costs import Costs
from .errors import einval

__all__ = ["VirtualClock", "Actor", "WaitQueue", "Mutex", "DONE", "simulated",
           "simulated_sync", "park", "wake", "VIRTUAL_TIME_LIMIT"]


class _NoLoop:
    """Enough of a loop for a future that is done at birth and never calls back."""

    def get_debug(self) -> bool:
        return False


def _finished_future() -> asyncio.Future:
    """A future that is already done: awaiting it returns at once in C, in any loop, and
    no loop is ever consulted (it has no callbacks to schedule)."""
    fut = asyncio.Future(loop=_NoLoop())
    fut.set_result(None)
    return fut


DONE = _finished_future()      # awaiting it never switches tasks
_NO_LOOP = object()            # a key no event loop matches: the first `me()` finds the loop
VIRTUAL_TIME_LIMIT = 1 << 63   # virtual times stay below it: they travel as uint64


class Actor:
    """A simulated CPU: its virtual time, and how that time was spent."""

    __slots__ = ("name", "time", "task", "busy_ns", "wait_ns", "debt_ns", "events")

    def __init__(self, name: str, time: int = 0) -> None:
        self.name = name
        self.time = time           # ns: where this CPU is in virtual time
        self.task: asyncio.Task | None = None     # the task running as this actor now
        self.busy_ns = 0           # charged work
        self.wait_ns = 0           # time lost waiting (locks, grace periods, flushes)
        self.debt_ns = 0           # work others made it do (an IPI), paid at its next turn
        self.events = 0            # turns it was given

    def __repr__(self) -> str:
        return f"<Actor {self.name} @{self.time}ns>"


class _Stepped:
    """A coroutine the clock steps itself (`VirtualClock.gather`): what a task would be.
    It stands in for the task as the owner of an actor and of locks."""

    __slots__ = ("coro", "waiting", "finished", "result", "error", "cancelling",
                 "outside", "on_done", "clock")

    def __init__(self, clock: "VirtualClock", coro) -> None:
        self.clock = clock
        self.coro = coro
        self.waiting: asyncio.Future | None = None   # what it awaits now
        self.finished = False
        self.result = None
        self.error: BaseException | None = None
        self.cancelling = False
        self.outside = False                     # awaits something outside the simulation
        self.on_done = self._woken               # one bound method for every wait

    def _woken(self, fut: asyncio.Future) -> None:
        """A future it awaits is done (a done callback, from the loop): step it soon."""
        if self.waiting is fut and not self.finished:
            self.clock._make_ready(self)


class _Turn:
    """The turn a coroutine `gather` steps waits for at a point: what a future is to a
    task, at a fraction of a future's cost. Only the clock settles it (given by
    `_dispatch`, called off by `_cancel`) and only `_step_all` waits for it: no event
    loop, no callbacks."""

    given = False                            # class defaults: no __init__ to run
    called_off = False

    def done(self) -> bool:
        return self.given or self.called_off

    def __await__(self):
        yield self                           # `_step` gets it; resumed once given


class VirtualClock:
    """The simulation of one VM. Its plain methods never let time pass for anyone else;
    its awaitables may."""

    CONTENTION_WINDOW_NS = 1000    # acquisitions this close share a contended cache line
    MAX_SHARERS = 64

    def __init__(self, costs: Costs, seed: int = 0) -> None:
        self.costs = costs
        self.now = 0
        self.horizon: int | None = None          # None: free-running
        self.current: Actor | None = None        # the actor holding the turn
        self.dispatches = 0                      # turns given: simulated events
        self._heap: list[tuple[int, float, int, Actor, asyncio.Future]] = []
        self._order = itertools.count()
        self._random = random.Random(seed).random   # the ties' draws, one per queueing
        self._quiet: list[asyncio.Future] = []   # advance() callers
        self._dispatch_soon = False
        self._loop: object = _NO_LOOP            # the event loop it last ran in
        self._stepping: _Stepped | None = None   # the coroutine `gather` steps now
        self._stepper: asyncio.Task | None = None   # the task running `gather`
        self._ready: collections.deque[_Stepped] = collections.deque()
        self._idle: asyncio.Future | None = None    # `gather` waits: nothing to step

    # -- charging -------------------------------------------------------------------

    def charge(self, ns: int) -> None:
        """The actor holding the turn spent `ns` working (none holds it: nobody pays)."""
        actor = self.current
        if actor is not None:
            actor.time += ns
            actor.busy_ns += ns

    def me(self):
        """Who runs now: the coroutine `gather` is stepping, else the current task. An
        actor's `task` and a lock's owner are this."""
        stepping = self._stepping
        if stepping is not None:
            return stepping
        return current_task(self._loop) or self._task_in_running_loop()

    def _task_in_running_loop(self) -> asyncio.Task | None:
        """`current_task()` asked of the loop the clock last ran in: without a loop it
        looks the running loop up, which costs a getpid() on 3.11. Here the first time,
        or in another loop."""
        self._loop = asyncio.get_running_loop()
        return current_task(self._loop)

    def time(self) -> int:
        """Virtual now as the running actor sees it."""
        actor = self.current
        return actor.time if actor is not None else self.now

    def bill(self, actor: Actor, ns: int) -> None:
        """Make `actor` (runnable or parked, not running) pay `ns` at its next turn."""
        actor.debt_ns += ns

    # -- the turn ----------------------------------------------------------------------

    def point(self):
        """The awaitable of a preemption point: the running actor gives the turn to an
        earlier one if there is any (or parks past the horizon); else it goes on.

        A switch is no coroutine: the actor queues itself and the dispatch pops the
        earliest runnable in one heap operation, and what it gets back is completed by
        the dispatch that gives the turn back to it (DONE if it never left): a future
        and an event-loop round trip for a task, a `_Turn` for a coroutine `gather`
        steps."""
        actor = self.current
        heap = self._heap
        t = actor.time
        if (not heap or t < heap[0][0]) and (self.horizon is None or t <= self.horizon):
            return DONE
        if self._stepping is not None:
            waiter = _Turn()
        else:
            waiter = asyncio.get_running_loop().create_future()
        self._dispatch((t, self._random(), next(self._order), actor, waiter))
        return DONE if self.current is actor else waiter

    def sleep_until(self, t: int):
        """The running actor waits (is not working) until virtual time `t`."""
        actor = self.current
        if t > actor.time:
            actor.wait_ns += t - actor.time
            actor.time = t
        return self.point()

    def park(self) -> Actor | None:
        """The running actor stops being runnable until someone `wake`s it: the turn goes
        to the next. Returns it (None outside the simulation)."""
        actor = self.current
        if actor is None or actor.task is not self.me():
            return None                      # the caller is not in the simulation
        self.current = None
        self._dispatch()
        return actor

    def wake(self, actor: Actor | None, fut: asyncio.Future, at: int | None = None) -> None:
        """End the wait of a parked actor: it becomes runnable at the waker's time (or `at`
        if later) and `fut` completes when its turn comes. Outside the simulation (no
        actor), `fut` completes at once."""
        if fut.done():
            return
        if actor is None:
            fut.set_result(None)
            return
        t = self.time()
        if at is not None and at > t:
            t = at
        if t > actor.time:
            actor.wait_ns += t - actor.time
            actor.time = t
        self._push(actor, fut)
        if self.current is None:
            self._dispatch()

    async def outside(self, aw):
        """Await `aw`, something outside the simulation (a client, a wall-clock lease),
        without holding the turn; resume at the VM's now or later."""
        actor = self.park()
        stepped = self._stepping
        if stepped is not None:
            stepped.outside = True           # its wait does not end with a turn
        try:
            return await aw
        except asyncio.CancelledError:
            actor = None                     # nobody resumes: the caller unwinds
            raise
        finally:
            if stepped is not None:
                stepped.outside = False
            if actor is not None:
                if self.now > actor.time:
                    actor.wait_ns += self.now - actor.time
                    actor.time = self.now
                fut = asyncio.get_running_loop().create_future()
                self._push(actor, fut)
                if self.current is None:
                    self._dispatch()
                await fut

    def _push(self, actor: Actor, fut: asyncio.Future) -> None:
        heapq.heappush(self._heap, (actor.time, self._random(), next(self._order),
                                    actor, fut))

    def _dispatch_later(self) -> None:
        if not self._dispatch_soon:
            self._dispatch_soon = True
            asyncio.get_running_loop().call_soon(self._dispatch_if_free)

    def _dispatch_if_free(self) -> None:
        self._dispatch_soon = False
        if self.current is None:
            self._dispatch()

    def _dispatch(self, entry: tuple | None = None) -> None:
        """Give the turn to the earliest runnable actor within the horizon; `entry`, the
        running actor's own (from `point`), is queued first."""
        heap, horizon = self._heap, self.horizon
        while True:
            if entry is not None:            # queue it and pop the earliest: one step
                top = heapq.heappushpop(heap, entry)
                entry = None
            elif heap:
                top = heapq.heappop(heap)
            else:
                break
            t, _, _, actor, fut = top
            turn = fut.__class__ is _Turn    # no future: its attributes, no method call
            if fut.called_off if turn else fut.done():   # cancelled meanwhile
                continue
            if actor.debt_ns:                # work it was made to do while it waited
                actor.time += actor.debt_ns
                actor.busy_ns += actor.debt_ns
                actor.debt_ns = 0
                self._push(actor, fut)
                continue
            if horizon is not None and t > horizon:
                heapq.heappush(heap, top)
                break
            self.current = actor
            if t > self.now:
                self.now = t
            self.dispatches += 1
            actor.events += 1
            if turn:
                fut.given = True
            else:
                fut.set_result(None)
            if self._idle is not None and actor.task.__class__ is _Stepped:
                self._wake_stepper()         # `gather` steps it
            return
        self.current = None
        if self._quiet:
            for waiter in self._quiet:
                if not waiter.done():
                    waiter.set_result(None)
            self._quiet.clear()

    # -- actors -------------------------------------------------------------------------

    @asynccontextmanager
    async def running(self, actor: Actor | None = None, name: str = "host",
                      start_ns: int | None = None):
        """`async with clock.running(...)`: the body runs as `actor` (a new one named
        `name` if None), from `start_ns` or its own time, and never before `now`. Nested
        in a task that already runs as an actor, the body simply goes on as that one."""
        task = self.me()
        holder = self.current
        if holder is not None and holder.task is task:
            yield holder
            return
        if start_ns is not None and start_ns < self.now:
            raise einval(f"start time {start_ns} ns is before the VM's virtual now "
                         f"({self.now} ns)")
        if actor is None:
            actor = Actor(name)
        elif actor.task is not None:
            raise einval(f"{actor.name} is already running")
        start = max(actor.time, self.now, start_ns or 0)
        if start > actor.time:
            actor.time = start
        actor.task = task
        try:
            fut = asyncio.get_running_loop().create_future()
            self._push(actor, fut)
            if self.current is None:
                # Not at once: the tasks ready now enter first, so that actors started
                # together start together.
                self._dispatch_later()
            await fut
            yield actor
        finally:
            actor.task = None
            if self.current is actor:
                self.current = None
                self._dispatch()

    @contextmanager
    def running_sync(self, name: str = "host"):
        """A synchronous call as an actor of its own at `now` (or as the running actor
        when one runs it): nothing else runs meanwhile, so it needs no turn."""
        holder = self.current
        if holder is not None and holder.task is self.me():
            yield holder
            return
        actor = Actor(name, self.now)
        self.current = actor
        try:
            yield actor
        finally:
            self.current = holder

    def holds_turn(self) -> bool:
        actor = self.current
        return actor is not None and actor.task is self.me()

    # -- stepping -----------------------------------------------------------------------

    YIELD_EVERY = 64               # steps between two turns `gather` gives the event loop
                                   # (a step is tens of µs: the loop waits a few ms at most)

    async def gather(self, *coros) -> list:
        """Run `coros` to their ends in this task and return their results in order, as
        `asyncio.gather` would with each as a task; the first error is raised once every
        one has ended (none is left half-run, holding a turn or a lock). Cancelling the
        caller cancels them all. Only one `gather` steps a clock at a time: a second one
        meanwhile runs its coroutines as tasks."""
        if self._stepper is not None:
            return list(await asyncio.gather(*coros))
        self._stepper = current_task()
        stepped = [_Stepped(self, coro) for coro in coros]
        try:
            await self._step_all(stepped)
        finally:
            self._stepper = None
            self._ready.clear()
        for s in stepped:
            if s.error is not None:
                raise s.error
        return [s.result for s in stepped]

    async def _step_all(self, stepped: list[_Stepped]) -> None:
        """Step whichever of `stepped` can go on: the one holding the turn first, then
        those whose wait outside the simulation ended; when none can, wait for the loop
        to make one ready (the turn given to one of them, or a wait ended)."""
        loop = asyncio.get_running_loop()
        ready = self._ready
        left, steps, cancelled = len(stepped), 0, None
        # Their first steps, in order and in one go: tasks just created all take theirs
        # in one turn of the loop, before what they schedule (`_dispatch_later`) runs.
        for s in stepped:
            if self._step(s, loop):
                left -= 1
        while left:
            actor = self.current
            s = actor.task if actor is not None else None
            if s.__class__ is _Stepped and (s.waiting.__class__ is _Turn or
                                            s.waiting is not None and s.waiting.done()):
                pass                         # the turn went to one of ours: step it (its
                                             # actor holds it: its `_Turn` was given)
            elif ready:
                s = ready.popleft()
                if s.finished or (s.waiting is not None and not s.waiting.done()):
                    continue                 # already stepped past that wake-up
            else:
                try:
                    self._idle = loop.create_future()
                    await self._idle
                except asyncio.CancelledError as exc:
                    cancelled = exc
                    self._cancel(stepped)
                finally:
                    self._idle = None
                continue
            if self._step(s, loop):
                left -= 1
            steps += 1
            if steps % self.YIELD_EVERY == 0 and self.current is not None:
                # Only with the turn held: a dispatch the loop has pending is then a
                # no-op, so giving the loop a turn leaves the simulation's order alone.
                try:
                    await asyncio.sleep(0)   # the loop's other tasks (and callbacks) run
                except asyncio.CancelledError as exc:
                    cancelled = exc
                    self._cancel(stepped)
        if cancelled is not None:
            raise cancelled

    def _step(self, s: _Stepped, loop: asyncio.AbstractEventLoop) -> bool:
        """One step of `s`, as a task's: until it awaits a future that is not done (it
        then resumes when that future is; awaiting one sends `result()` or its error
        in), or ends. True when it ended."""
        waited, s.waiting = s.waiting, None
        self._stepping = s
        try:
            if s.cancelling:                 # one CancelledError, as a task gets
                s.cancelling = False
                if waited is None or waited.__class__ is _Turn or not waited.cancelled():
                    yielded = s.coro.throw(asyncio.CancelledError())
                else:                        # awaiting it raises CancelledError
                    yielded = s.coro.send(None)
            else:
                yielded = s.coro.send(None)
        except StopIteration as stop:
            s.finished, s.result = True, stop.value
            return True
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:         # noqa: BLE001 - the caller of gather gets it
            s.finished, s.error = True, exc
            return True
        finally:
            self._stepping = None
        if yielded is None:                  # a bare yield (sleep(0)): again after a turn
            yielded = loop.create_future()
            loop.call_soon(yielded.set_result, None)
        s.waiting = yielded
        actor = self.current
        if s.outside or (actor is not None and actor.task is s):
            # Not a wait for the turn (which `_dispatch` ends, and `_step_all` sees):
            # something else ends it.
            yielded.add_done_callback(s.on_done)
        return False

    def _make_ready(self, s: _Stepped) -> None:
        self._ready.append(s)
        self._wake_stepper()

    def _wake_stepper(self) -> None:
        idle = self._idle
        if idle is not None and not idle.done():
            idle.set_result(None)

    def _cancel(self, stepped: list[_Stepped]) -> None:
        """The caller of `gather` was cancelled: cancel each coroutine as a task is, at the
        future it awaits (or at its next step)."""
        for s in stepped:
            if s.finished:
                continue
            s.cancelling = True
            waiting = s.waiting
            if waiting is not None and not waiting.done():
                if waiting.__class__ is _Turn:
                    waiting.called_off = True
                else:
                    waiting.cancel()
            self._ready.append(s)

    # -- driving ------------------------------------------------------------------------

    async def advance(self, until_ns: int) -> int:
        """Run the simulation up to virtual time `until_ns` and no further, from now on;
        returns the new now (`until_ns`)."""
        if until_ns < self.now:
            raise einval(f"cannot advance to {until_ns} ns: the VM's virtual now is "
                         f"{self.now} ns")
        self.horizon = until_ns
        if self.current is None:
            self._dispatch()
        while not self._is_quiet() or self._dispatch_soon:
            fut = asyncio.get_running_loop().create_future()
            self._quiet.append(fut)
            await fut
        self.now = max(self.now, until_ns)
        return self.now

    def run_free(self) -> None:
        """No horizon any more: whatever is runnable runs (a VM being destroyed)."""
        self.horizon = None
        if self.current is None:
            self._dispatch()

    def _is_quiet(self) -> bool:
        heap = self._heap
        while heap and heap[0][4].done():
            heapq.heappop(heap)
        return self.current is None and (not heap or self.horizon is None or
                                         heap[0][0] > self.horizon)


def simulated(name: str):
    """Decorate an async method of an object with a `clock` (None in wall time): in virtual
    time the call runs as an actor named `name` (see `VirtualClock.running`), or as the
    caller's actor when the caller is one."""
    def decorate(method):
        @functools.wraps(method)
        async def run(self, *args, **kwargs):
            clock = self.clock
            if clock is None:
                return await method(self, *args, **kwargs)
            async with clock.running(name=name):
                return await method(self, *args, **kwargs)
        return run
    return decorate


def simulated_sync(name: str):
    """The same for a synchronous method: it runs as an actor of its own at `now`."""
    def decorate(method):
        @functools.wraps(method)
        def run(self, *args, **kwargs):
            clock = self.clock
            if clock is None:
                return method(self, *args, **kwargs)
            with clock.running_sync(name):
                return method(self, *args, **kwargs)
        return run
    return decorate


# A waiter, in wall or virtual time (clock None: wall): `actor = park(clock)` before it
# queues `fut`, `await fut`; the waker calls `wake(clock, actor, fut)`, and in virtual time
# `fut` completes when the woken actor's turn comes.

def park(clock: VirtualClock | None) -> Actor | None:
    return clock.park() if clock is not None else None


def wake(clock: VirtualClock | None, actor: Actor | None, fut: asyncio.Future,
         at: int | None = None) -> None:
    if clock is not None:
        clock.wake(actor, fut, at)
    elif not fut.done():
        fut.set_result(None)


class WaitQueue:
    """Tasks waiting for something another task makes true, woken in FIFO order. In wall
    time, futures; in virtual time the waiters are parked actors, woken at the waker's
    virtual time (or later, `at`). A cancelled waiter leaves the queue; one woken and
    cancelled before it ran owes nothing here (`_woken_then_cancelled`)."""

    __slots__ = ("clock", "_waiters")

    def __init__(self, clock: VirtualClock | None) -> None:
        self.clock = clock
        self._waiters: collections.deque[tuple[asyncio.Future, Actor | None]] = \
            collections.deque()

    def __len__(self) -> int:
        return len(self._waiters)

    async def wait(self) -> None:
        fut = asyncio.get_running_loop().create_future()
        entry = (fut, park(self.clock))
        self._waiters.append(entry)
        try:
            await fut
        except asyncio.CancelledError:
            if entry in self._waiters:
                self._waiters.remove(entry)
            else:                            # a wake popped it first: it was woken
                self._woken_then_cancelled()
            raise

    def _woken_then_cancelled(self) -> None:
        """A waiter was woken, then cancelled before it could act on the wake."""

    def wake_one(self, at: int | None = None) -> bool:
        while self._waiters:
            fut, actor = self._waiters.popleft()
            if not fut.done():
                wake(self.clock, actor, fut, at)
                return True
        return False

    def wake_all(self, at: int | None = None) -> None:
        waiters, self._waiters = self._waiters, collections.deque()
        for fut, actor in waiters:
            wake(self.clock, actor, fut, at)


class Mutex(WaitQueue):
    """A FIFO sleeping lock (a kernel mutex) whose waiters wait in virtual time when the
    VM has a virtual clock; `async with mutex:`. Ownership passes at release, with the
    wake of the first waiter, so a task arriving then cannot take it before the waiter it
    was handed to; a waiter cancelled after the hand-over passes it on."""

    __slots__ = ("_locked",)

    def __init__(self, clock: VirtualClock | None) -> None:
        super().__init__(clock)
        self._locked = False

    def locked(self) -> bool:
        return self._locked

    async def __aenter__(self) -> None:
        if not self._locked:
            self._locked = True
            return
        await self.wait()                    # woken: handed the mutex

    async def __aexit__(self, *exc) -> None:
        self._release()

    def _release(self) -> None:
        if not self.wake_one():
            self._locked = False

    _woken_then_cancelled = _release         # the hand-over goes on to the next
