"""`vmmu scale` on worker processes gives the rows of one process, line for line.

A sweep's configurations are independent deterministic runs in virtual time: fanned out
over processes they finish in any order, and the rows (seed002's efficiencies against
its first configuration, seed004's one row from two runs) come out the same. A worker
that dies has its configuration run again; one whose worker always dies is reported,
never printed as a row.
"""

import asyncio
import json
import os
import subprocess
import sys

import pytest

from vmmu.scale import SWEEPS, run_sweep, sweeps
from vmmu.server.pool import ATTEMPTS, CRASH_HOOK, Jobs, WorkerDied

TINY = {                      # every sweep, small enough to run in seconds
    "seed002": dict(max_vcpus=2, pages=16, hugepages=1),
    "seed003": dict(max_invalidators=1, refreshes=4),
    "seed000": dict(vcpus=2, faults=4, sweep=4 << 20),
    "seed001": dict(working_set=4 << 20),
    "seed004": dict(size=1 << 20),
}
NAMES = list(SWEEPS)


def options(seed: int = 3) -> dict[str, dict]:
    return {name: dict(seed=seed, costs=None, **TINY[name]) for name in NAMES}


async def fanned_out(workers: int, ray: str | None = None) -> tuple[list[str], int]:
    shown, lost = [], 0
    async for name, rows, lost in sweeps(NAMES, options(), workers, ray):
        shown += [json.dumps(r, sort_keys=True) for r in rows]
    return shown, lost


def one_process() -> list[str]:
    return [json.dumps(r, sort_keys=True)
            for name in NAMES for r in run_sweep(name, **options()[name])]


async def test_two_workers_give_the_rows_of_one_process():
    alone = await asyncio.to_thread(one_process)        # run_sweep: a loop of its own
    assert len(alone) > len(NAMES) and {json.loads(r)["sweep"] for r in alone} == set(NAMES)
    assert await fanned_out(2) == (alone, 0)
    assert await fanned_out(1) == (alone, 0)


def test_jobs_run_each_once_and_a_job_whose_worker_keeps_dying_fails():
    jobs = Jobs(3)
    taken = [jobs.take() for _ in range(3)]
    assert taken == [0, 1, 2] and jobs.take() is None
    jobs.finish(2, "c")
    assert jobs.done_prefix() == 0 and not jobs.over()
    jobs.died(1, "exit 70")
    assert jobs.take() == 1                            # ran again
    jobs.finish(0, "a")
    assert jobs.done_prefix() == 1
    for _ in range(ATTEMPTS - 1):
        jobs.died(1, "exit 70")
        assert not jobs.over() or jobs.take() is None
        if not jobs.over():
            assert jobs.take() == 1
    assert jobs.over() and jobs.done_prefix() == 1 and jobs.workers_lost == ATTEMPTS
    with pytest.raises(WorkerDied, match="job 1: the worker died 3 times: exit 70"):
        jobs.raise_if_failed(lambda job: f"job {job}")


def vmmu_scale(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmmu.cli", "scale", *args],
                          capture_output=True, text=True, timeout=600, env=env)


def test_the_command_prints_the_same_lines_on_two_workers():
    alone = vmmu_scale("seed004", "seed003", "--quick", "--workers", "1")
    pooled = vmmu_scale("seed004", "seed003", "--quick", "--workers", "2")
    assert alone.returncode == 0 and len(alone.stdout.splitlines()) == 1 + 2 * 3
    assert (pooled.returncode, pooled.stdout) == (0, alone.stdout)


def test_a_dead_worker_runs_its_configuration_again_and_is_reported(tmp_path, monkeypatch):
    alone = vmmu_scale("seed004", "--quick", "--workers", "1")
    env = dict(os.environ, **{CRASH_HOOK: f"1:{tmp_path / 'died'}"})
    pooled = vmmu_scale("seed004", "--quick", "--workers", "2", env=env)
    assert (pooled.returncode, pooled.stdout) == (0, alone.stdout)
    assert "1 worker(s) died; their configurations ran again" in pooled.stderr


def test_a_configuration_whose_worker_always_dies_is_not_a_row():
    env = dict(os.environ, **{CRASH_HOOK: "1"})
    pooled = vmmu_scale("seed003", "seed004", "--quick", "--workers", "2", env=env)
    assert pooled.returncode == 1 and pooled.stdout == ""
    assert f"the worker died {ATTEMPTS} times" in pooled.stderr
    assert "gpc_refresh_latency" in pooled.stderr


@pytest.mark.parametrize("args,reason", [
    (("--ray", "10.0.0.1:6379", "--workers", "2"), "Ray cluster's CPUs"),
    (("--ray", "no port"), "is not HOST:PORT"),
    (("--workers", "0"), "workers 0 is not in 1..64")])
def test_bad_parallelism_is_refused(args, reason):
    refused = vmmu_scale("seed004", "--quick", *args)
    assert refused.returncode == 2 and reason in refused.stderr and refused.stdout == ""


def test_the_command_prints_the_same_lines_on_a_local_ray_cluster():
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'vmmu[ray]')")
    alone = vmmu_scale("seed004", "--quick", "--workers", "1")
    on_ray = vmmu_scale("seed004", "--quick", "--ray", "--workers", "2")
    assert alone.returncode == 0 and alone.stdout
    assert (on_ray.returncode, on_ray.stdout) == (0, alone.stdout)


def test_ray_without_ray_says_how_to_install_it():
    without_ray = ("import sys; sys.modules['ray'] = None; from vmmu.cli import main; "
                   "sys.exit(main())")
    missing = subprocess.run([sys.executable, "-c", without_ray, "scale", "seed004",
                              "--quick", "--ray"], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "pip install 'vmmu[ray]'" in missing.stderr
