"""gfn-to-pfn caches over the wire, with both clients: create, use, invalidation and
refresh, the per-VM policy, and bad input refused with a clear status and no change."""

from __future__ import annotations

import pytest

from vmmu.client import (Backing, FailedPrecondition, Gpc, GpcState, InvalidArgument,
                         NotFound)

PAGE = 4096
SIZE = 16 * PAGE
GPA = 0x2008


async def make_guest(client, policy: str = "global"):
    vm = await client.create_vm(max_vcpus=1, gpc_policy=policy)
    region = await vm.mmap(SIZE, Backing.PAGE_4K)
    await vm.set_user_memory_region(slot=0, flags=0, guest_phys_addr=0, memory_size=SIZE,
                                    userspace_addr=region.hva)
    return vm, region


async def test_a_cache_is_used_invalidated_refreshed_and_deactivated(client):
    vm, region = await make_guest(client)
    gpc = await vm.create_gpc(GPA, 8)
    assert isinstance(gpc, Gpc)
    assert (gpc.id, gpc.gpa, gpc.uhva, gpc.state, gpc.active, gpc.valid) == \
        (1, GPA, region.hva + GPA, GpcState.ACTIVE_VALID, True, True)
    assert gpc.pfn is not None and gpc.refreshes == 1

    await vm.write_gpc(gpc.id, 0, b"through!")
    assert await vm.read_hva(region.hva + GPA, 8) == b"through!"
    assert await vm.check_gpc(gpc.id, 8)

    await vm.migrate_pages(region.hva + (GPA & ~(PAGE - 1)), PAGE)
    assert not await vm.check_gpc(gpc.id, 8)
    with pytest.raises(FailedPrecondition) as excinfo:
        await vm.read_gpc(gpc.id, 0, 8)
    assert excinfo.value.errno_name == "EAGAIN" and "active-invalid" in excinfo.value.reason
    assert [g.state for g in await vm.gpcs()] == [GpcState.ACTIVE_INVALID]

    refreshed = await vm.refresh_gpc(gpc.id, 8)
    assert refreshed.valid and refreshed.pfn != gpc.pfn and refreshed.refreshes == 2
    assert await vm.read_gpc(gpc.id, 0, 8) == b"through!"
    assert (await vm.stats())["gpc_invalidations"] == 1

    gone = await vm.deactivate_gpc(gpc.id)
    assert (gone.state, gone.active, gone.valid, gone.pfn) == \
        (GpcState.INACTIVE, False, False, None)
    assert await vm.gpcs() == []
    with pytest.raises(NotFound):
        await vm.check_gpc(gpc.id, 8)


async def test_the_policy_is_part_of_the_vm_config(client):
    vm, _ = await make_guest(client, "range")
    assert (await vm.info()).config.gpc_policy == "range"
    vm, _ = await make_guest(client)
    assert (await vm.info()).config.gpc_policy == "global"


@pytest.mark.parametrize("policy, waits", [("global", True), ("range", False)])
async def test_an_invalidation_of_another_page_delays_only_a_global_refresh(client, policy,
                                                                            waits):
    vm, region = await make_guest(client, policy)
    gpc = await vm.create_gpc(GPA, 8)
    await vm.madvise_dontneed(region.hva + (GPA & ~(PAGE - 1)), PAGE)
    other = region.hva + 8 * PAGE
    await vm.begin_invalidation(other, other + PAGE, lease_s=0.3)
    refreshed = await vm.refresh_gpc(gpc.id, 8)     # global: until the lease runs out
    assert refreshed.valid and refreshed.retries == 0
    assert (refreshed.wait_ns > 0.2e9) is waits


async def test_bad_input_gets_a_clear_status_and_changes_nothing(client):
    vm, _ = await make_guest(client)
    with pytest.raises(InvalidArgument) as excinfo:
        await vm.create_gpc(0x1FFC, 8)
    assert excinfo.value.errno_name == "EINVAL" and "crosses a page" in excinfo.value.reason
    with pytest.raises(InvalidArgument) as excinfo:
        await vm.create_gpc(SIZE + PAGE, 8)
    assert excinfo.value.errno_name == "EFAULT" and "no memslot" in excinfo.value.reason
    assert await vm.gpcs() == []
    with pytest.raises(NotFound) as excinfo:
        await vm.refresh_gpc(42, 8)
    assert "gfn-to-pfn cache 42" in excinfo.value.reason
    with pytest.raises(NotFound):
        await vm.deactivate_gpc(42)

    gpc = await vm.create_gpc(GPA, 8)
    with pytest.raises(InvalidArgument):
        await vm.write_gpc(gpc.id, PAGE - 8, b"x")
    assert await vm.gpcs() == [gpc]

    vms = await client.list_vms()
    with pytest.raises(InvalidArgument) as excinfo:
        await client.create_vm(gpc_policy="lazy")
    assert "gpc_policy 'lazy'" in excinfo.value.reason
    assert await client.list_vms() == vms
