"""VMs, host memory, memslots and vCPUs through both clients, against a real server."""

from __future__ import annotations

import pytest

from vmmu.client import (KVM_MEM_READONLY, AlreadyExists, Backing, InvalidArgument, NotFound,
                         VmConfig)
from vmmu.server.kvm import VmConfig as ModelVmConfig

MiB = 1 << 20


async def test_vm_lifecycle(client):
    vm = await client.create_vm(max_vcpus=2, tdp_levels=5, ad_bits=False, name="guest")

    info = await vm.info()
    assert info.id == vm.id
    assert info.name == "guest"
    assert info.config == VmConfig(max_vcpus=2, tdp_levels=5, ad_bits=False, name="guest",
                                   schedule_seed=None, sanitizers=ModelVmConfig().sanitizers,
                                   debug=frozenset())
    assert (info.nr_vcpus, info.nr_memslots, info.nr_host_regions, info.dead) == (0, 0, 0, False)
    assert [v.id for v in await client.list_vms()] == [vm.id]

    await vm.destroy()
    assert await client.list_vms() == []
    with pytest.raises(NotFound) as excinfo:
        await vm.info()
    assert excinfo.value.errno_name == "ENOENT"


async def test_unknown_vm_is_not_found_everywhere(client):
    ghost = client.vm(4242)
    calls = [ghost.info, ghost.stats, ghost.memslots, ghost.host_regions, ghost.destroy,
             lambda: ghost.create_vcpu(0), lambda: ghost.vcpu(0).info()]
    for call in calls:
        with pytest.raises(NotFound, match="ENOENT"):
            await call()


async def test_schedule_seed_sanitizers_and_debug_knobs_travel_both_ways(client):
    vm = await client.create_vm(schedule_seed=2**64 - 1, sanitizers=False,
                                debug=["skip_zap_tlb_flush", "skip_invalidate_retry"])
    config = (await vm.info()).config
    assert (config.schedule_seed, config.sanitizers, config.debug) == \
        (2**64 - 1, False, frozenset({"skip_zap_tlb_flush", "skip_invalidate_retry"}))
    other = (await (await client.create_vm(schedule_seed=0, sanitizers=True)).info()).config
    assert (other.schedule_seed, other.sanitizers, other.debug) == (0, True, frozenset())


@pytest.mark.parametrize("env, default", [("0", False), ("1", True)])
async def test_sanitizers_left_out_follow_the_server_default(client, monkeypatch, env, default):
    monkeypatch.setenv("VMMU_SANITIZERS", env)      # the server runs in this process
    assert (await (await client.create_vm()).info()).config.sanitizers is default


async def test_unknown_debug_knob_creates_nothing(client):
    with pytest.raises(InvalidArgument) as excinfo:
        await client.create_vm(debug=["skip_invalidate_retry", "make_it_fast"])
    assert excinfo.value.errno_name == "EINVAL" and "make_it_fast" in excinfo.value.reason
    assert await client.list_vms() == []


async def test_invalid_config_creates_nothing(client):
    with pytest.raises(InvalidArgument) as excinfo:
        await client.create_vm(tdp_levels=3)
    assert excinfo.value.errno_name == "EINVAL"
    assert "tdp_levels" in excinfo.value.reason
    assert await client.list_vms() == []


async def test_host_memory_round_trip(client):
    vm = await client.create_vm()
    region = await vm.mmap(4 * MiB, Backing.THP)
    assert (region.size, region.backing, region.writable) == (4 * MiB, Backing.THP, True)

    await vm.write_hva(region.hva + 0x10, b"vmmu")
    assert await vm.read_hva(region.hva + 0x10, 4) == b"vmmu"
    assert (await vm.host_regions())[0].populated_4k_pages > 0

    await vm.munmap(region.hva, region.size)
    assert await vm.host_regions() == []
    with pytest.raises(NotFound):
        await vm.munmap(region.hva, region.size)


async def test_read_only_region_refuses_host_writes(client):
    vm = await client.create_vm()
    region = await vm.mmap(64 * 1024, Backing.PAGE_4K, writable=False)
    assert not region.writable

    with pytest.raises(InvalidArgument, match="EFAULT"):
        await vm.write_hva(region.hva, b"x")
    assert await vm.read_hva(region.hva, 1) == b"\0"


async def test_region_at_a_fixed_hva_and_overlap(client):
    vm = await client.create_vm()
    region = await vm.mmap(2 * MiB, Backing.PAGE_4K, hva=0x7f00_0000_0000)
    assert region.hva == 0x7f00_0000_0000

    with pytest.raises(AlreadyExists, match="EEXIST"):
        await vm.mmap(MiB, Backing.PAGE_4K, hva=0x7f00_0010_0000)
    assert len(await vm.host_regions()) == 1


async def test_memslot_create_list_delete(client):
    vm = await client.create_vm()
    region = await vm.mmap(2 * MiB, Backing.PAGE_4K)

    await vm.set_user_memory_region(slot=1 << 16 | 3, flags=KVM_MEM_READONLY,
                                    guest_phys_addr=0x100000, memory_size=2 * MiB,
                                    userspace_addr=region.hva)
    [slot] = await vm.memslots()
    assert (slot.as_id, slot.id, slot.slot) == (1, 3, 1 << 16 | 3)
    assert (slot.flags, slot.guest_phys_addr, slot.memory_size, slot.userspace_addr) == \
        (KVM_MEM_READONLY, 0x100000, 2 * MiB, region.hva)

    await vm.set_user_memory_region(slot=1 << 16 | 3, flags=KVM_MEM_READONLY,
                                    guest_phys_addr=0x100000, memory_size=0,
                                    userspace_addr=region.hva)
    assert await vm.memslots() == []


async def test_misaligned_gpa_is_invalid_argument_and_changes_nothing(client):
    vm = await client.create_vm()
    region = await vm.mmap(2 * MiB, Backing.PAGE_4K)

    with pytest.raises(InvalidArgument) as excinfo:
        await vm.set_user_memory_region(slot=0, flags=0, guest_phys_addr=0x1001,
                                        memory_size=2 * MiB, userspace_addr=region.hva)
    assert str(excinfo.value) == "EINVAL: guest_phys_addr 0x1001 is not page aligned"
    assert excinfo.value.errno_name == "EINVAL"
    assert await vm.memslots() == []


async def test_overlapping_memslot_is_already_exists(client):
    vm = await client.create_vm()
    region = await vm.mmap(4 * MiB, Backing.PAGE_4K)
    await vm.set_user_memory_region(slot=0, flags=0, guest_phys_addr=0, memory_size=2 * MiB,
                                    userspace_addr=region.hva)
    before = await vm.memslots()

    with pytest.raises(AlreadyExists) as excinfo:
        await vm.set_user_memory_region(slot=1, flags=0, guest_phys_addr=MiB,
                                        memory_size=2 * MiB,
                                        userspace_addr=region.hva + 2 * MiB)
    assert excinfo.value.errno_name == "EEXIST"
    assert await vm.memslots() == before


async def test_vcpus(client):
    vm = await client.create_vm(max_vcpus=2)
    vcpu = await vm.create_vcpu(1)
    assert (vcpu.vm_id, vcpu.id) == (vm.id, 1)
    info = await vcpu.info()
    assert (info.id, info.running, info.mmio_pending) == (1, False, False)
    assert (await vm.info()).nr_vcpus == 1

    with pytest.raises(AlreadyExists, match="EEXIST"):
        await vm.create_vcpu(1)
    with pytest.raises(InvalidArgument, match="EINVAL"):
        await vm.create_vcpu(2)
    with pytest.raises(NotFound, match="ENOENT"):
        await vm.vcpu(0).info()
    assert (await vm.info()).nr_vcpus == 1


async def test_a_legacy_mmu_vm_runs_logs_and_ages_through_the_client(client):
    """`mmu="legacy"`: the same guest-visible results, its own structures in the stats."""
    from vmmu.client import BatchBuilder, KVM_MEM_LOG_DIRTY_PAGES

    vm = await client.create_vm(max_vcpus=1, mmu="legacy", ad_bits=False)
    assert (await vm.info()).config.mmu == "legacy"
    region = await vm.mmap(4 * MiB, Backing.THP)
    await vm.set_user_memory_region(slot=0, flags=0, guest_phys_addr=0, memory_size=4 * MiB,
                                    userspace_addr=region.hva)
    vcpu = await vm.create_vcpu(0)
    run = await vcpu.run(BatchBuilder().write(0x3000, data=b"legacy!!")
                         .read(0x3000, 8, with_data=True).build())
    assert run.read_data == b"legacy!!"
    stats = await vm.stats()
    assert stats["mmu_shadow_pages"] == 3 and stats["tdp_mmu_pages"] == 0     # root, 1G, 2M
    assert stats["pages_2m"] == 1 and stats["max_mmu_rmap_size"] == 1
    assert [s.level for s in await vm.walk(0x3000)] == [4, 3, 2]
    # A/D bits off: fast_only aging reports young and leaves the SPTE; the locked walk ages.
    assert await vm.clear_young(region.hva, region.hva + 4 * MiB, fast_only=True)
    assert await vm.test_young(region.hva + 0x3000)
    assert await vm.clear_young(region.hva, region.hva + 4 * MiB)
    assert not await vm.test_young(region.hva + 0x3000)
    await vm.set_user_memory_region(slot=0, flags=KVM_MEM_LOG_DIRTY_PAGES, guest_phys_addr=0,
                                    memory_size=4 * MiB, userspace_addr=region.hva)
    await vcpu.run(BatchBuilder().write(0x5000, data=b"x").build())
    log = await vm.get_dirty_log(0)
    assert log[0] == 1 << 5 and not any(log[1:])


async def test_an_unknown_mmu_creates_nothing(client):
    with pytest.raises(InvalidArgument) as excinfo:
        await client.create_vm(mmu="shadow")
    assert excinfo.value.errno_name == "EINVAL" and "mmu" in excinfo.value.reason
    assert await client.list_vms() == []
