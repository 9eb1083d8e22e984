"""dp-eval on Ray (`launcher=ray`, the optional extra `cluster`): a local Ray, one task an
episode; a worker killed mid-episode is retried and every episode is recorded exactly once,
with the results of the process pool on the same seeds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from commands import dp

pytest.importorskip("ray")


def _episode_workers() -> list[int]:
    """Pids of Ray worker processes running an episode task (Ray titles them ray::<task>)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "cmdline").read_bytes().startswith(b"ray::_episode"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def test_ray_run_with_a_worker_killed_records_every_episode_once_as_the_pool_does(checkpoint, tmp_path):
    common = [f"checkpoint={checkpoint}", "samplers=['ddim5:steps=2']", "episodes=4", "threads=1", "progress=false"]
    pool = dp("dp-eval", *common, "workers=1", f"out={tmp_path / 'pool'}")
    assert pool.returncode == 0, pool.stderr
    exe = Path(sys.executable).with_name("dp-eval")
    run = subprocess.Popen([str(exe), *common, "launcher=ray", "workers=2", f"out={tmp_path / 'ray'}"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed, deadline = None, time.monotonic() + 240
    while killed is None and run.poll() is None and time.monotonic() < deadline:
        pids = _episode_workers()
        if pids:
            time.sleep(0.5)  # mid-episode
            try:
                os.kill(pids[0], signal.SIGKILL)
                killed = pids[0]
            except ProcessLookupError:
                continue
        time.sleep(0.1)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err[-2000:]
    assert killed is not None, "no episode task was seen running"
    records = [json.loads(line) for line in (tmp_path / "ray" / "episodes.jsonl").read_text().splitlines()]
    keys = [(r["sampler"], r["seed"]) for r in records]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 4  # every episode exactly once
    want = {r["seed"]: r for r in map(json.loads, (tmp_path / "pool" / "episodes.jsonl").read_text().splitlines())}
    for r in records:  # deterministic episodes: the pool's outcome, seed by seed
        p = want[r["seed"]]
        assert (r["success"], r["length"], r["return_"], r["error"]) == (p["success"], p["length"], p["return_"], p["error"])
        assert [q["step"] for q in r["plans"]] == [q["step"] for q in p["plans"]]


def test_ray_launcher_refuses_unknown_launchers_in_one_line(checkpoint, tmp_path):
    r = dp("dp-eval", f"checkpoint={checkpoint}", "launcher=slurm", "episodes=1", f"out={tmp_path / 'x'}")
    assert r.returncode == 2 and "launcher: 'slurm' is not one of pool, ray" in r.stderr
