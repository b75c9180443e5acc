"""What every benchmark prints: one JSON line per result, with its ratio to a baseline
measured in the same run (docs/benchmarks.md), or a plain row for what is not such a
result; and the change of counters over a phase.

`delta` is the /dev/kvm harness's (`vmmu.kvmhost.stats`), used here for vmmu's counters
too.
"""

from __future__ import annotations

import json
from vmmu.kvmhost.stats import delta

__all__ = ["emit", "row", "delta"]


def emit(name: str, value: float | None, unit: str, baseline: str | None,
         baseline_value: float | None, *, ratio: float | None = None,
         target: str | None = None, limit: float | None = None,
         floor: float | None = None, digits: int = 3, ratio_digits: int = 3,
         **extra) -> None:
    """Print one result line. `ratio` is `value / baseline_value` unless given (a
    throughput passes the ratio of its times); it is null when either is missing (a
    livelock, no baseline on this machine) or the baseline is zero. With `limit` the
    result is held to `ratio <= limit` (with `floor`, to `ratio >= floor`): `target` says
    so unless given, and `met` whether it held. `value` and `baseline_value` are rounded
    to `digits` (0: whole numbers), `ratio` to `ratio_digits`."""
    if ratio is None and value is not None and baseline_value:
        ratio = value / baseline_value
    if limit is not None and target is None:
        target = f"ratio <= {limit}"
    if floor is not None and target is None:
        target = f"ratio >= {floor}"
    met = None
    if ratio is not None and (limit is not None or floor is not None):
        met = (limit is None or ratio <= limit) and (floor is None or ratio >= floor)
    line = {"benchmark": name, "value": _round(value, digits), "unit": unit,
            "baseline": baseline, "baseline_value": _round(baseline_value, digits),
            "ratio": _round(ratio, ratio_digits), "target": target,
            "met": met, **extra}
    print(json.dumps(line), flush=True)


def row(**fields) -> None:
    """Print one line that is not a result against a baseline: a sweep's row, a skipped
    benchmark, facts about the host."""
    print(json.dumps(fields), flush=True)


def _round(x: float | None, digits: int) -> float | int | None:
    if x is None:
        return None
    return round(x, digits) if digits else round(x)
