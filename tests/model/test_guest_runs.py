"""Contiguous runs of accesses (`AccessBatch.runs`): one TLB lookup and one copy per run
leave what one per access leaves: the same data read, the same memory written, the same
exits at the same accesses, the same stats."""

from __future__ import annotations

import random

import pytest

from vmmu.server.kvm import AccessBatch, AccessKind, Backing, ExitReason, Kvm, VmConfig

R, W = AccessKind.READ, AccessKind.WRITE
SLOT_SIZE = 64 * 1024                  # gpas beyond it are MMIO


def story(rng: random.Random) -> list[tuple]:
    """Runs of 8-, 4- and 1-byte accesses, with and without data, some into MMIO, some
    crossing into the next page (a new run there), and a few strays between them."""
    accesses = []
    for _ in range(40):
        size = rng.choice((1, 4, 8))
        kind = rng.choice((R, W))
        data = rng.random() < 0.8
        start = rng.randrange(0, SLOT_SIZE + 8192, size)
        for k in range(rng.randrange(1, 700)):
            gpa = start + k * size
            payload = bytes(rng.getrandbits(8) for _ in range(size)) if data and kind is W \
                else (b"" if data else None)
            accesses.append((gpa, kind, size, payload))
        if rng.random() < 0.3:
            accesses.append((rng.randrange(0, SLOT_SIZE, 8), R, 8, b""))
    return accesses


async def execute(accesses, per_access: bool, monkeypatch) -> tuple:
    vm = Kvm().create_vm(VmConfig(name="runs", sanitizers=False))
    region = vm.mmap(SLOT_SIZE, Backing.PAGE_4K)
    await vm.set_user_memory_region(0, 0, 0, SLOT_SIZE, region.hva)
    vcpu = vm.create_vcpu(0)
    batch = AccessBatch.build(accesses)
    with monkeypatch.context() as patch:
        if per_access:
            patch.setattr(AccessBatch, "RUN_MIN", len(accesses) + 1)
        assert (batch.runs() is None) == per_access
        log = []
        result = await vcpu.run(batch)
        while True:
            log.append((result.completed, result.exit, result.read_data))
            if result.exit.reason is not ExitReason.MMIO:
                break
            reply = b"" if result.exit.is_write else bytes(range(result.exit.length))
            result = await vcpu.run(mmio_data=reply)
    memory = await vm.read_hva(region.hva, SLOT_SIZE)
    return log, memory, vcpu.stats(), vm.stats()


@pytest.mark.parametrize("seed", range(4))
async def test_runs_leave_what_single_accesses_leave(seed, monkeypatch):
    accesses = story(random.Random(seed))
    runs = await execute(accesses, False, monkeypatch)
    single = await execute(accesses, True, monkeypatch)
    assert len(runs[0]) > 1                       # there were MMIO exits
    assert any(data for _, _, data in runs[0]) and any(runs[1])
    assert runs == single


def test_runs_are_cut_where_contiguity_ends(monkeypatch):
    accesses = ([(0x1000 + 8 * k, R, 8, b"") for k in range(6)]       # one run
                + [(0x1FF8, R, 8, b""), (0x2000, R, 8, b"")]         # a page boundary cuts
                + [(0x3000, R, 4, b""), (0x3004, W, 4, b"abcd")]     # another op cuts
                + [(0x4000, R, 8, b""), (0x4010, R, 8, b"")])        # a gap cuts
    assert AccessBatch.build(accesses).runs() is None                # 7 runs: too short
    monkeypatch.setattr(AccessBatch, "RUN_MIN", 1)
    assert AccessBatch.build(accesses).runs() == [0, 6, 7, 8, 9, 10, 11, 12]
