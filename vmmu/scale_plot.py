"""PNG charts of `vmmu scale` results (matplotlib: the optional extra `vmmu[plot]`)."""

from __future__ import annotations

import os
from collections import defaultdict

__all__ = ["plot_results"]


def plot_results(results: dict[str, list[dict]], folder: str) -> list[str]:
    """One chart per sweep present in `results`; returns the files written."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("vmmu scale --plot needs matplotlib: pip install 'vmmu[plot]'")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    written = []
    for name, rows in results.items():
        chart = _CHARTS.get(name)
        if chart is None or not rows:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        chart(ax, rows)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(folder, f"{name}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _by(rows: list[dict], key: str) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[str(row[key])].append(row)
    return groups


def _seed002(ax, rows):
    for (workload, design), group in _groups(rows, "workload", "design").items():
        ax.plot([r["vcpus"] for r in group], [r["faults_per_s"] for r in group], marker="o",
                label=f"{design}, {workload}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("vCPUs")
    ax.set_ylabel("demand faults per virtual second")
    ax.set_title("seed 002: faults under mmu_lock, by design")


def _seed003(ax, rows):
    for policy, group in _by(rows, "policy").items():
        ax.plot([r["invalidators"] for r in group], [r["max_us"] for r in group],
                marker="o", label=f"{policy} (max)")
        ax.plot([r["invalidators"] for r in group], [r["mean_us"] for r in group],
                marker="x", linestyle="--", label=f"{policy} (mean)")
    ax.set_yscale("log")
    ax.set_xlabel("invalidators storming other ranges")
    ax.set_ylabel("GPC refresh latency, virtual µs")
    ax.set_title("seed 003: GPC refresh, global against range retry")


def _seed000(ax, rows):
    locks = [r["aging_lock"] for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["p50_us"] for r in rows], width=0.4, label="p50")
    ax.bar([i + 0.2 for i in x], [r["p99_us"] for r in rows], width=0.4, label="p99")
    ax.set_xticks(list(x), locks)
    ax.set_ylabel("demand-fault latency, virtual µs")
    ax.set_title("seed 000: faults while aging sweeps, by aging_lock")


def _seed001(ax, rows):
    for (backing, leafs), group in _pairs(rows).items():
        ax.plot([r["range_bytes"] for r in group], [r["pages_zapped"] for r in group],
                marker="o", label=f"{backing}, {'leafs only' if leafs else 'old zap'}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("invalidated range, bytes")
    ax.set_ylabel("4K pages zapped")
    ax.set_title("seed 001: what an invalidation zaps")


def _pairs(rows):
    return _groups(rows, "backing", "leafs_only")


def _groups(rows, *keys):
    groups = defaultdict(list)
    for row in rows:
        groups[tuple(row[key] for key in keys)].append(row)
    return groups


def _seed004(ax, rows):
    row = rows[0]
    ax.bar(["fast page fault on", "off"], [row["on_ns_per_page"], row["off_ns_per_page"]],
           label=f"ratio {row['ratio']} (the seed: {row['seed_ratio']})")
    ax.set_ylabel("virtual ns per page, second pass")
    ax.set_title("seed 004: the dirty-logging workload")


_CHARTS = {"seed002": _seed002, "seed003": _seed003, "seed000": _seed000,
           "seed001": _seed001, "seed004": _seed004}
