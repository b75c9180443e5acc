"""The event loop a `vmmu` command runs on: uvloop when it is installed (the optional extra
`vmmu[fast]`), else asyncio's default loop.

The choice is `auto` (uvloop if importable, else asyncio), `uvloop` (refused with the
reason if it is not installed) or `asyncio`; it comes from the command's `--event-loop`,
else the environment variable VMMU_EVENT_LOOP, else the command's default (vmmu/cli.py:
`auto` for `vmmu scale`, `asyncio` for the others), and the command sets the variable so
that its worker processes run on the same loop. The model and the virtual clock use the
public asyncio API, so a virtual-time run gives the same results on either loop.

Measured (docs/benchmarks.md, "Event loop and grpc.aio settings"): uvloop makes the simulator faster and the
gRPC Run stream slower, and a gRPC server on uvloop that starts worker processes
(Explore with workers) sometimes loses one to SIGSEGV (libuv starts it with fork() while
gRPC's threads run; not seen on asyncio's loop), hence the defaults.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["CHOICES", "ENV", "FAST_INSTALL", "UvloopMissing", "choose", "loop_factory",
           "loop_name", "run"]

T = TypeVar("T")

ENV = "VMMU_EVENT_LOOP"
CHOICES = ("auto", "uvloop", "asyncio")
FAST_INSTALL = "pip install 'vmmu[fast]'"


class UvloopMissing(RuntimeError):
    """`uvloop` was asked for and is not installed."""

    def __init__(self) -> None:
        super().__init__(f"the uvloop event loop is not installed: {FAST_INSTALL}")


def choose(choice: str) -> None:
    """Make `choice` this process's and its children's loop (checked first)."""
    loop_factory(choice)
    os.environ[ENV] = choice


def loop_factory(choice: str | None = None) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """What `asyncio.Runner` makes its loop with for `choice` (default: VMMU_EVENT_LOOP,
    else `auto`); None is asyncio's default loop."""
    choice = choice or os.environ.get(ENV) or "auto"
    if choice not in CHOICES:
        raise ValueError(f"event loop {choice!r}: it must be one of {', '.join(CHOICES)}")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise UvloopMissing() from None
        return None
    return uvloop.new_event_loop


def loop_name(choice: str | None = None) -> str:
    """`uvloop` or `asyncio`: the loop `run` would use for `choice`."""
    return "asyncio" if loop_factory(choice) is None else "uvloop"


def run(main: Coroutine[Any, Any, T], choice: str | None = None) -> T:
    """`asyncio.run(main)` on the loop `choice` names."""
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(main)
