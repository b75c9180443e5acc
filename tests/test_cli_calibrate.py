"""`vmmu calibrate`: a cost file measured on the host's /dev/kvm that a VM in virtual time
can be created with, and a clear refusal where there is no KVM to measure."""

from __future__ import annotations

import json

import pytest

from vmmu import cli
from vmmu.calibrate import costs_of, model_ns_per_page
from vmmu.client import Client, load_cost_file
from vmmu.kvmhost import KvmUnavailable, RealVm
from vmmu.kvmhost import vm as kvmhost_vm
from vmmu.server.kvm.costs import DEFAULT_COSTS
from vmmu.server.kvm.costs import load_cost_file as model_load_cost_file


def _kvm_unusable() -> str | None:
    try:
        RealVm().close()
    except (KvmUnavailable, OSError) as exc:
        return str(exc)
    return None


def test_calibrate_writes_a_cost_file_a_virtual_vm_reports(server, tmp_path, capsys):
    unusable = _kvm_unusable()
    if unusable:
        pytest.skip(f"real KVM not usable here: {unusable}")
    out = tmp_path / "host-costs.json"

    assert cli.main(["calibrate", "--out", str(out), "--size-mib", "4", "--runs", "1"]) == 0
    assert f"wrote {out}" in capsys.readouterr().err

    written = json.loads(out.read_text())
    measured = written["measured"]
    assert measured["exit_round_trip"] > 0 and measured["demand_fault"] > 0
    assert measured["wp_fault_taken"] >= 1024          # 4 MiB: one write fault per page
    assert measured["host"]["kernel"]
    costs = load_cost_file(str(out))
    assert costs == written["costs"] == costs_of(measured)
    assert costs == model_load_cost_file(str(out))      # the model reads it alike
    assert costs["vmexit_entry"] == round(measured["exit_round_trip"])

    with Client(server.address) as client:
        vm = client.create_vm(clock="virtual", costs=costs)
        assert vm.costs() == {**DEFAULT_COSTS, **costs}
        assert dict(vm.info().config.costs) == costs


def test_calibrate_without_kvm_says_so_and_fails(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(kvmhost_vm, "KVM_PATH", str(tmp_path / "no-kvm"))
    out = tmp_path / "host-costs.json"

    assert cli.main(["calibrate", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "vmmu calibrate: no KVM to measure: cannot open" in err and "no-kvm" in err
    assert not out.exists()


def test_costs_follow_the_documented_rules():
    measured = {"exit_round_trip": 1000.0, "demand_fault": 3000.0, "host_fault": 4900.0,
                "wp_fault": 3000.4, "get_dirty_log": 0.5, "wp_fault_fast": 90,
                "wp_fault_taken": 100}
    costs = costs_of(measured)
    assert costs["vmexit_entry"] == 1000
    # With them the model's own fault path takes, per page, what KVM's took: whatever
    # else it charges on a fault (lookups, mmu_lock, the walk, the dirty bit) is counted.
    first, second = model_ns_per_page(costs)
    assert abs(first - measured["demand_fault"]) <= 0.5
    assert abs(second - measured["wp_fault"]) <= 0.5
    # 1900 ns of host fault shared as gup_slow 1500 : page_alloc_4k 250 : page_zero_4k 150
    assert (costs["gup_slow"], costs["page_alloc_4k"], costs["page_zero_4k"]) == \
        (1500, 250, 150)
    assert costs["dirty_bitmap_word"] == 32

    slow = costs_of({**measured, "wp_fault_fast": 10})     # KVM took the slow path
    assert "fast_pf" not in slow
    cheap = costs_of({**measured, "demand_fault": 900.0, "host_fault": 800.0})
    assert cheap["fault_base"] == 0 and cheap["gup_slow"] == 0     # never below zero
