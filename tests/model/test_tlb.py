"""TLB flushes after zaps (reference §3.5, §4.3), and data between guest and host."""

from __future__ import annotations

import errno
import random

import pytest

from vmmu.server.kvm import AccessBatch, AccessKind, Backing, ExitReason

MIB, GIB = 1 << 20, 1 << 30
R, W = AccessKind.READ, AccessKind.WRITE


def run(vcpu, *accesses):
    return vcpu.run(AccessBatch.build(accesses))


@pytest.mark.parametrize("with_data", [True, False])
async def test_munmap_zaps_flushes_and_the_next_access_faults(kvm_guest, with_data):
    vm, vcpu = kvm_guest.vm, kvm_guest.vcpu
    data = b"" if with_data else None
    assert (await run(vcpu, (0x1000, R, 8, data))).exit.reason is ExitReason.DONE
    hits = vcpu.stats()
    assert (await run(vcpu, (0x1000, R, 8, data))).exit.reason is ExitReason.DONE
    assert vcpu.stats()["ept_violations"] == hits["ept_violations"]   # a TLB hit
    vm_before = vm.stats()

    await vm.munmap(kvm_guest.region.hva, kvm_guest.region.size)

    assert vm.walk(0x1000)[-1].kind == "non-present"
    assert vm.stats()["pages_2m"] == vm_before["pages_2m"] - 1
    assert vm.stats()["remote_tlb_flush"] == vm_before["remote_tlb_flush"] + 1
    assert vm.stats()["mmu_invalidate_seq"] == vm_before["mmu_invalidate_seq"] + 1
    result = await run(vcpu, (0x1000, R, 8, data))
    assert result.exit.reason is ExitReason.MEMORY_FAULT and result.exit.errno == errno.EFAULT
    after = vcpu.stats()
    assert after["tlb_flush"] == hits["tlb_flush"] + 1
    assert after["ept_violations"] == hits["ept_violations"] + 1


async def test_munmap_of_unrelated_memory_flushes_nothing(kvm_guest):
    vm, vcpu = kvm_guest.vm, kvm_guest.vcpu
    await run(vcpu, (0x1000, R, 8, None))
    other = vm.mmap(2 * MIB, Backing.PAGE_4K)
    before = vm.stats()
    await vm.munmap(other.hva, other.size)
    assert vm.stats() == before
    assert (await run(vcpu, (0x1000, R, 8, None))).exit.reason is ExitReason.DONE
    assert vcpu.stats()["tlb_flush"] == 1                  # only the first root load


async def test_every_vcpu_drops_its_translation(kvm_guest):
    vm = kvm_guest.vm
    vcpus = [kvm_guest.vcpu, vm.create_vcpu(1)]
    for vcpu in vcpus:
        await run(vcpu, (0x1000, W, 4, b"once"))
    await vm.munmap(kvm_guest.region.hva, kvm_guest.region.size)
    for vcpu in vcpus:
        result = await run(vcpu, (0x1000, R, 4, b""))
        assert result.exit.reason is ExitReason.MEMORY_FAULT


async def test_remapped_hva_is_seen_fresh_after_munmap(kvm_guest):
    """The same hva mapped again holds new (zeroed) pages; the guest must not see the old."""
    vm, vcpu, region = kvm_guest.vm, kvm_guest.vcpu, kvm_guest.region
    await run(vcpu, (0x1000, W, 4, b"old!"))
    await vm.munmap(region.hva, region.size)
    vm.mmap(region.size, Backing.THP, hva=region.hva)
    result = await run(vcpu, (0x1000, R, 4, b""))
    assert result.exit.reason is ExitReason.DONE and result.read_data == bytes(4)


@pytest.mark.parametrize("backing, size, gpa", [
    (Backing.PAGE_4K, 2 * MIB, 0), (Backing.THP, 4 * MIB, 0),
    (Backing.HUGETLB_1G, GIB, GIB),
])
async def test_guest_writes_reach_the_host_and_host_writes_reach_the_guest(make_guest,
                                                                           backing, size, gpa):
    g = await make_guest(backing, size, gpa=gpa)
    spots = [gpa, gpa + 0x1FF8, gpa + size // 2 + 0x123, gpa + size - 8]
    for n, spot in enumerate(spots):
        await run(g.vcpu, (spot, W, 8, b"guest-%02d" % n))
    for n, spot in enumerate(spots):
        assert await g.vm.read_hva(g.hva(spot), 8) == b"guest-%02d" % n
        await g.vm.write_hva(g.hva(spot), b"host--%02d" % n)
    result = await run(g.vcpu, *[(spot, R, 8, b"") for spot in spots])
    assert result.read_data == b"".join(b"host--%02d" % n for n in range(len(spots)))


async def test_pure_translations_move_no_data(kvm_guest):
    vm, vcpu = kvm_guest.vm, kvm_guest.vcpu
    await vm.write_hva(kvm_guest.region.hva + 0x40, b"keep")
    result = await run(vcpu, (0x40, W, 4, None), (0x40, R, 4, None))
    assert result.exit.reason is ExitReason.DONE and result.read_data == b""
    assert await vm.read_hva(kvm_guest.region.hva + 0x40, 4) == b"keep"


async def test_host_write_to_an_unmapped_page_is_read_by_the_guest(kvm_guest):
    """The host touches the page first: the guest must map the page the host populated."""
    vm, vcpu = kvm_guest.vm, kvm_guest.vcpu
    await vm.write_hva(kvm_guest.region.hva + 0x300000, b"first")
    result = await run(vcpu, (0x300000, R, 4, b""), (0x300004, R, 1, b""))
    assert result.read_data == b"first"


@pytest.mark.parametrize("with_data", [True, False])
async def test_a_full_tlb_drops_its_entries_and_the_walker_refills_it(make_guest, with_data):
    """More pages than the TLB holds: it never grows past its capacity, it drops its
    oldest entries first (the newest pages stay), and the pages it dropped are walked
    again (no fault: the SPTEs are still there), with their data."""
    from vmmu.server.kvm.vcpu import TLB_CAPACITY, TLB_EVICT

    pages = TLB_CAPACITY // 3 + 1024           # every page fills R, W and X once written
    g = await make_guest(Backing.PAGE_4K, pages * 4096)
    vcpu = g.vcpu
    writes = [(gfn << 12, W, 8, gfn.to_bytes(8, "little") if with_data else None)
              for gfn in range(pages)]
    assert (await run(vcpu, *writes)).exit.reason is ExitReason.DONE
    assert len(vcpu.tlb) <= TLB_CAPACITY
    newest = (TLB_CAPACITY - TLB_EVICT) // 3   # the pages a drop always leaves
    assert all(gfn << 4 | int(kind) in vcpu.tlb
               for gfn in range(pages - newest, pages) for kind in (R, W))
    faults = vcpu.stats()["pf_taken"]
    assert faults == pages

    reads = [(gfn << 12, R, 8, b"" if with_data else None) for gfn in range(pages)]
    result = await run(vcpu, *reads)
    assert result.exit.reason is ExitReason.DONE and len(vcpu.tlb) <= TLB_CAPACITY
    assert vcpu.stats()["pf_taken"] == faults           # walked again, never faulted
    assert (0 << 4 | int(R)) not in vcpu.tlb             # the first pages were dropped
    if with_data:
        assert result.read_data == b"".join(gfn.to_bytes(8, "little") for gfn in range(pages))


async def test_translations_meet_the_tlb_in_order_as_reads_with_data_do(make_guest):
    """A batch without data finds its hits in C, a batch with data looks each access up
    in turn: over random pages of a working set larger than the TLB (fills drop entries
    that later accesses would have hit, and pages come back after their fill) both see
    the same hits and walks in the same order: the same TLB afterwards and the same
    virtual time."""
    from vmmu.server.kvm.vcpu import TLB_CAPACITY

    pages = TLB_CAPACITY // 2 * 5 // 4         # a read fills R and X: more than it holds
    rng = random.Random(7)
    gfns = [rng.randrange(pages) for _ in range(4 * pages)]
    seen = []
    for with_data in (False, True):
        g = await make_guest(Backing.PAGE_4K, pages * 4096, clock="virtual",
                             sanitizers=False)   # (which check each access in Python)
        await run(g.vcpu, *[(gfn << 12, R, 8, None) for gfn in range(pages)])
        g.vcpu.flush_tlb()
        result = await run(g.vcpu, *[(gfn << 12, R, 8, b"" if with_data else None)
                                     for gfn in gfns])
        assert result.completed == len(gfns)
        seen.append((list(g.vcpu.tlb), result.end_ns - result.start_ns))
    assert seen[0] == seen[1]
