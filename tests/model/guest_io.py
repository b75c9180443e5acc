"""Guest accesses for the model tests (run a batch, write and read bytes, find a leaf) and
a gate on the host's notifier list."""

import asyncio

from vmmu.server.kvm import AccessBatch, AccessKind, ExitReason

R, W = AccessKind.READ, AccessKind.WRITE


async def run(vcpu, *accesses):
    return await vcpu.run(AccessBatch.build(accesses))


async def write(g, gpa, data: bytes):
    result = await run(g.vcpu, *[(gpa + i, W, 8, data[i:i + 8]) for i in range(0, len(data), 8)])
    assert result.exit.reason is ExitReason.DONE


async def populate(g, gpa):
    """A write that moves no data: the page is present, writable, without contents (a
    read of memory never touched would map the zero page instead)."""
    result = await run(g.vcpu, (gpa, W, 8, None))
    assert result.exit.reason is ExitReason.DONE


async def read(g, gpa, size=8) -> bytes:
    result = await run(g.vcpu, (gpa, R, size, b""))
    assert result.exit.reason is ExitReason.DONE
    return result.read_data


def leaf(g, gpa):
    path = g.vm.walk(gpa)
    assert path and path[-1].kind == "leaf", path
    return path[-1]


class Gate:
    """Another secondary MMU on the host's notifier list: it holds the invalidation of
    one range at its start until the test opens the gate."""

    def __init__(self, start: int, end: int) -> None:
        self.range = (start, end)
        self.reached, self.open = asyncio.Event(), asyncio.Event()

    async def invalidate_range_start(self, start: int, end: int) -> None:
        if (start, end) == self.range and not self.open.is_set():
            self.reached.set()
            await self.open.wait()

    async def invalidate_range_end(self, start: int, end: int) -> None:
        pass
