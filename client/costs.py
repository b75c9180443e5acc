"""Cost files for VMs in virtual time, as `vmmu calibrate` writes them.

    vm = client.create_vm(clock="virtual", costs=load_cost_file("host-costs.json"))

A cost file is a JSON object of cost names to ns, or an object holding one under "costs"
(beside what was measured). The names and values are the server's to check: a VM created
with an unknown name or a value out of range is InvalidArgument, with the names it knows.
"""

from __future__ import annotations

import json

__all__ = ["load_cost_file"]


def load_cost_file(path: str) -> dict[str, int]:
    """The cost overrides in the file at `path`. ValueError if it holds no object of
    names to whole numbers (OSError if it cannot be read)."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if isinstance(data, dict) and isinstance(data.get("costs"), dict):
        data = data["costs"]
    if not isinstance(data, dict) or not all(
            isinstance(ns, int) and not isinstance(ns, bool) for ns in data.values()):
        raise ValueError(f"{path}: a cost file holds a JSON object of cost names to ns")
    return dict(data)
