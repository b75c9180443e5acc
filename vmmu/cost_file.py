"""The cost file of virtual time: the one definition of its format, for the model and the
client alike (neither may import the other; this module imports nothing of vmmu's).

A cost file is a JSON object of cost names to ns, or an object holding one under "costs"
beside what was measured (what `vmmu calibrate` writes). Which names and values a VM takes
is the model's to check (`vmmu.server.kvm.costs.check_costs`), not the file's.
"""

from __future__ import annotations

import json

__all__ = ["read_cost_file"]


def read_cost_file(path: str) -> dict[str, int]:
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
