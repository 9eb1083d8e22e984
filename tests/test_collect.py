"""dp-collect: the real expert in the real simulator, in worker processes, into a real store."""

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import envs
from envs.collect import collect, store_attrs
from envs.store import open_store, write_store

from commands import dp

KEYS = ("obs", "action", "state", "reward", "success")


def _cli(*args, cwd=None):
    return dp("dp-collect", *args, cwd=cwd)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def lift_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("collect") / "lift.zarr"
    r = _cli("task=lift", "n_demos=3", "seed=0", "workers=2", f"out={out}")
    assert r.returncode == 0, r.stderr
    assert "3 demos" in r.stdout and "expert failures" in r.stdout
    return out


def test_collected_store_opens_with_its_episodes_and_provenance(lift_store):
    with open_store(lift_store, task="lift") as store:
        assert store.n_episodes == 3
        assert set(KEYS) <= set(store.keys)
        spec = envs.get_task("lift")
        assert store["obs"].shape == (store.n_steps, spec.obs_dim)
        assert store["action"].shape == (store.n_steps, 7)
        attrs = store.attrs
        assert attrs["task"] == "lift" and attrs["env"]["control_freq"] == 20
        assert attrs["obs_layout"] == {k: list(v) for k, v in spec.obs_layout.items()}
        assert len(attrs["episode_seeds"]) == 3
        assert set(attrs["episode_seeds"]) <= set(attrs["seeds_used"])
        for i in range(3):
            assert store.episode(i)["success"][-1]  # every kept demo ends in success


def test_replaying_a_stored_episode_reproduces_it(lift_store):
    from envs.replay import replay_episode

    with open_store(lift_store) as store:
        checks = [replay_episode(store, i) for i in range(store.n_episodes)]
    assert all(c.max_obs_diff == 0.0 and c.success for c in checks), checks


def test_same_arguments_same_bytes_whatever_the_worker_count(tmp_path, lift_store):
    episodes, failed = collect("lift", n_demos=3, seed=0, workers=1, progress=False)
    attrs = store_attrs("lift", episodes, failed, seed=0)
    out = write_store(tmp_path / "again.zarr", [{k: e[k] for k in KEYS} for e in episodes], attrs)
    assert _digest(out) == _digest(lift_store)


def test_existing_output_is_refused_in_one_line(lift_store):
    r = _cli("task=lift", "n_demos=1", f"out={lift_store}")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "already exists" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["task=stack"], "unknown task 'stack'; known: can, external, lift, square"),
        (["n_demos=0"], "n_demos: 0 must be at least 1"),
        (["n_demoz=3"], "unknown key 'n_demoz'"),
    ],
)
def test_bad_arguments_fail_in_one_line_and_write_nothing(tmp_path, args, message):
    out = tmp_path / "x.zarr"
    r = _cli(*args, f"out={out}", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and r.stderr.strip().count("\n") == 0
    assert list(tmp_path.iterdir()) == []


def test_interrupted_collection_leaves_nothing_that_looks_like_a_store(tmp_path):
    out = tmp_path / "lift.zarr"
    exe = Path(sys.executable).with_name("dp-collect")
    proc = subprocess.Popen([str(exe), "task=lift", "n_demos=500", f"out={out}"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,
                            # a shell's background job inherits SIGINT ignored; Ctrl-C is what we test
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(8)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group, workers too
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
