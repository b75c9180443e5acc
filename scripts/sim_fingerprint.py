"""What the model computes for a fixed set of workloads, as JSON lines: the check that a
change meant to make the simulator cheaper left every simulated result as it was.

For each workload: every vCPU's and the VM's stats (virtual time, switches and lock waits
included in virtual time), and a digest of every charge to the virtual clock in order
(actor, ns). The workloads:

- `vmmu scale --quick`'s sweeps at seeds 0 and 5;
- 32 vCPUs x 128 demand faults (`vmmu.scale.demand_faults`' workload) under each fault
  design at seeds 0 and 3;
- in wall time, on each MMU, with the sanitizers on and off: one vCPU writing a byte to
  every page of a dirty-logged slot, twice (the demand faults, then the fixes of the
  write-protected pages after a GET_DIRTY_LOG), with the dirty bitmaps; and the same
  first pass with every tracepoint subscribed, its events without their wall times.

Run it on two checkouts and compare the files:

    python scripts/sim_fingerprint.py --out before.jsonl          # on the old code
    python scripts/sim_fingerprint.py --against before.jsonl      # on the new: exit 1 if
                                                                  # anything differs
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vmmu import scale  # noqa: E402
from vmmu.server.kvm import (AccessBatch, AccessKind, Backing, Kvm,  # noqa: E402
                             KVM_MEM_LOG_DIRTY_PAGES, VmConfig)
from vmmu.server.kvm.clock import VirtualClock  # noqa: E402
from vmmu.server.kvm.trace import EVENTS, Subscription  # noqa: E402

PAGE = 4096


class _Charges:
    """Every `VirtualClock.charge` in order, as a running digest."""

    def __init__(self) -> None:
        self.digest, self.count = hashlib.sha256(), 0
        original = VirtualClock.charge

        def charge(clock, ns: int) -> None:
            actor = clock.current
            self.digest.update(f"{actor.name if actor else '-'}:{ns};".encode())
            self.count += 1
            original(clock, ns)

        VirtualClock.charge = charge

    def take(self) -> dict:
        out = dict(charges=self.count, charges_sha256=self.digest.hexdigest())
        self.digest, self.count = hashlib.sha256(), 0
        return out


async def _demand_faults(vcpus: int, pages: int, design: str, seed: int) -> dict:
    """`scale.demand_faults` with every vCPU's stats and the VM's."""
    g = await scale._guest(vcpus * pages * PAGE, vcpus=vcpus, schedule_seed=seed,
                           fast_page_fault=False, aging_lock="read",
                           **scale.FAULT_DESIGNS[design])
    results = await asyncio.gather(*[
        g.vm.vcpu(i).run(scale._touch(i * pages * PAGE, pages)) for i in range(vcpus)])
    out = dict(results=[(r.completed, r.exit.reason.value, r.start_ns, r.end_ns)
                        for r in results],
               vcpus=[g.vm.vcpu(i).stats() for i in range(vcpus)], vm=g.vm.stats(),
               points=g.vm.sched.points_passed)
    await g.kvm.shutdown()
    return out


def _events(sub: Subscription) -> list:
    events = []
    while sub._buffer:
        e = sub._buffer.popleft()
        events.append((e.seq, e.event, sorted(e.fields.items()), e.virtual_ns))
    return events


async def _logged_passes(mmu: str, sanitizers: bool, pages: int, traced: bool) -> dict:
    """One vCPU writes a byte to every page of a logged slot; harvest; again."""
    kvm = Kvm()
    vm = kvm.create_vm(VmConfig(mmu=mmu, sanitizers=sanitizers))
    size = pages * PAGE
    region = vm.mmap(size, Backing.PAGE_4K)
    await vm.madvise_populate_write(region.hva, size // 2)     # half populated, half not
    await vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, size, region.hva)
    vcpu = vm.create_vcpu(0)
    batch = AccessBatch.build([(i * PAGE + i % 7, AccessKind.WRITE, 1, bytes([i & 255]))
                               for i in range(pages)])
    out: dict = {}
    sub = None
    if traced:
        sub = Subscription(EVENTS, capacity=1 << 16)
        vm.tracer.attach(sub)
    for name in ("first", "second"):
        result = await vcpu.run(batch)
        out[name] = dict(completed=result.completed, exit=result.exit.reason.value,
                         vcpu=vcpu.stats(), vm=vm.stats(),
                         dirty=hashlib.sha256(await vm.get_dirty_log(0)).hexdigest())
        if sub is not None:
            out[name]["trace"] = hashlib.sha256(
                json.dumps(_events(sub)).encode()).hexdigest()
    if sub is not None:
        sub.close()
    await kvm.shutdown()
    return out


def fingerprint(out) -> None:
    charges = _Charges()

    def line(name: str, value) -> None:
        print(json.dumps(dict(name=name, value=value, **charges.take()), sort_keys=True),
              file=out, flush=True)

    for seed in (0, 5):
        text = io.StringIO()
        scale.main(list(scale.SWEEPS), quick=True, seed=seed, out=text)
        line(f"scale.quick.seed{seed}", text.getvalue().splitlines())
    for design in scale.FAULT_DESIGNS:
        for seed in (0, 3):
            line(f"demand_faults.32x128.{design}.seed{seed}",
                 asyncio.run(_demand_faults(32, 128, design, seed)))
    for mmu in ("tdp", "legacy"):
        for sanitizers in (False, True):
            line(f"logged_passes.{mmu}.sanitizers={sanitizers}",
                 asyncio.run(_logged_passes(mmu, sanitizers, 1024, traced=False)))
        line(f"logged_passes.{mmu}.traced",
             asyncio.run(_logged_passes(mmu, False, 256, traced=True)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the lines here (default: stdout)")
    parser.add_argument("--against", help="compare with the lines of an earlier run")
    args = parser.parse_args()
    text = io.StringIO()
    fingerprint(text)
    lines = text.getvalue().splitlines()
    if args.out:
        Path(args.out).write_text(text.getvalue())
    elif not args.against:
        sys.stdout.write(text.getvalue())
    if not args.against:
        return 0
    before = {json.loads(x)["name"]: x for x in Path(args.against).read_text().splitlines()}
    differ = [json.loads(x)["name"] for x in lines if before.get(json.loads(x)["name"]) != x]
    missing = set(before) - {json.loads(x)["name"] for x in lines}
    for name in differ:
        print(f"differs: {name}", file=sys.stderr)
    for name in sorted(missing):
        print(f"missing: {name}", file=sys.stderr)
    if not differ and not missing:
        print(f"identical: {len(lines)} workloads", file=sys.stderr)
    return 1 if differ or missing else 0


if __name__ == "__main__":
    sys.exit(main())
