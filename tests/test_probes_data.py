"""The third round of a hostile user's probes (issue 30), the part about making data: dp-collect's
cameras and workers (1), Ctrl-C while dp-collect starts its workers (12), dp-import of image files
whose demos disagree (11), image stores whose `cameras` contradict their frames, and the modes of
finished stores and checkpoints (15). Item numbers are the issue's."""

import contextlib
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from common.files import building
from envs.collect import collect
from envs.errors import StoreError
from envs.store import write_store
from envs.tasks import TASKS, ObsConfig

from commands import dp, one_line_error
from test_importers import write_robomimic

BIN = Path(sys.executable).parent


class Hung(BaseException):
    """A command that did not finish in the time it was given (a BaseException: no handler of the
    command mistakes it for its own error)."""


@contextlib.contextmanager
def within(seconds: float):
    """Fail, instead of hanging the test run, if the block takes longer than `seconds`."""
    def expire(*_):
        raise Hung(f"still running after {seconds} s")

    before = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)


# --- 1: dp-collect with a camera the task does not have -------------------------------------------

@pytest.mark.parametrize("camera", ["bogus", "../../etc"])
def test_an_unknown_camera_is_one_line_before_any_worker_starts(camera, tmp_path):
    with within(60):
        r = dp("dp-collect", "obs=image", f"obs.cameras=[{camera}]", "n_demos=1", "workers=1",
               f"out={tmp_path / 'x.zarr'}")
    one_line_error(r, "dp-collect", "obs.cameras", repr(camera), "agentview", "robot0_eye_in_hand")
    assert list(tmp_path.iterdir()) == []


def test_the_cameras_of_each_task_are_those_of_its_simulator():
    from envs.robosuite_env import make_env

    for name, spec in TASKS.items():
        env = make_env(name)
        try:
            assert set(spec.cameras) == set(env._env.sim.model.camera_names), name
        finally:
            env.close()


def test_a_camera_listed_twice_is_refused():
    from common.errors import UserError

    with pytest.raises(UserError, match="obs.cameras: 'agentview' is listed twice"):
        ObsConfig("image", ["agentview", "agentview"])


def test_a_worker_that_cannot_build_its_env_fails_the_run_instead_of_restarting_forever(monkeypatch):
    from common.errors import UserError

    # every worker's simulator fails to start the same way (spawned workers inherit the environment)
    monkeypatch.setenv("MUJOCO_GL", "no-such-backend")
    obs = ObsConfig("image", ["agentview"], 16)
    with within(120), pytest.raises(UserError) as err:
        collect("lift", n_demos=1, workers=2, progress=False, obs=obs)
    message = str(err.value)
    assert "\n" not in message and "could not build" in message and "MUJOCO_GL" in message, message


# --- 12: Ctrl-C while dp-collect starts its workers ------------------------------------------------

def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.fixture
def python_ctrl_c():
    """SIGINT answered by Python's KeyboardInterrupt and unblocked, as in a command started from a
    terminal, whatever this test process inherited or an earlier test left (a background job
    starts with SIGINT ignored); put back afterwards."""
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    yield
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    signal.signal(signal.SIGINT, handler)


def test_a_ctrl_c_while_the_workers_start_is_answered_after_not_lost(python_ctrl_c):
    from common.cli import workers_ignore_ctrl_c

    done = False
    with pytest.raises(KeyboardInterrupt), workers_ignore_ctrl_c():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
        done = True  # the block (starting the pool) is not cut short
    assert done
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # the next one is answered too


def test_a_ctrl_c_answered_as_the_block_ends_leaves_the_next_one_unblocked(python_ctrl_c, monkeypatch):
    """A Ctrl-C another thread took during the block may have its handler run the moment the old
    handler is back (Python runs signal handlers in the main thread, at its next chance); its
    KeyboardInterrupt must not leave SIGINT blocked, or every later Ctrl-C is lost."""
    import common.cli as cli

    real = signal.signal

    def restoring(signum, handler):
        old = real(signum, handler)
        if handler is signal.default_int_handler:  # the old handler is back: the pending one runs now
            raise KeyboardInterrupt
        return old

    monkeypatch.setattr(cli.signal, "signal", restoring)
    with pytest.raises(KeyboardInterrupt), cli.workers_ignore_ctrl_c():
        pass
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])


@pytest.mark.parametrize("when", ["imports", "pool+0s", "pool+1s", "pool+3s"])
def test_ctrl_c_while_dp_collect_starts_is_one_line_and_leaves_nothing(when, tmp_path):
    env = {**os.environ, "MUJOCO_GL": "egl"}
    p = subprocess.Popen([str(BIN / "dp-collect"), "task=lift", "n_demos=500", "workers=2",
                          f"out={tmp_path / 'x.zarr'}"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                         start_new_session=True,  # a process group of its own, as a terminal's job is
                         # a shell's background job inherits SIGINT ignored; Ctrl-C is what we test
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        if when == "imports":
            time.sleep(1.0)
        else:  # the pool is being started once the command has processes of its own
            deadline = time.monotonic() + 90
            while not _children(p.pid) and p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert _children(p.pid), "dp-collect started no workers"
            time.sleep(float(when.split("+")[1].rstrip("s")))
        os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C does: the whole group, workers too
        _, err = p.communicate(timeout=90)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "SpawnPoolWorker" not in err, err[-3000:]
    lines = [x for x in err.splitlines() if x.startswith("dp-collect: ")]
    assert len(lines) == 1 and lines[0].startswith("dp-collect: interrupted"), err[-3000:]
    assert list(tmp_path.iterdir()) == []


# --- 11: dp-import of image HDF5 files whose demos disagree ----------------------------------------

def _image_hdf5(path: Path, sizes=(24, 24), cameras=(("agentview", "robot0_eye_in_hand"),) * 2) -> None:
    demos = write_robomimic(path, demos=(0, 1))
    rng = np.random.default_rng(0)
    with h5py.File(path, "a") as f:
        for i, name in enumerate(sorted(demos)):
            n = len(demos[name]["actions"])
            for cam in cameras[i]:
                f[f"data/{name}"].create_dataset(f"obs/{cam}_image",
                                                 data=rng.integers(0, 256, (n, sizes[i], sizes[i], 3),
                                                                   dtype=np.uint8))


@pytest.mark.parametrize("case, fragments", [
    ("size", ["data/demo_1/obs/agentview_image", "(32, 32, 3)", "demo_0", "(24, 24, 3)"]),
    ("cameras", ["data/demo_1/obs", "robot0_eye_in_hand_image", "demo_0"]),
    ("group", ["data/demo_1/obs/agentview_image", "a group"]),
])
def test_image_demos_that_disagree_are_one_line(case, fragments, tmp_path):
    src = tmp_path / "image.hdf5"
    if case == "size":
        _image_hdf5(src, sizes=(24, 32))
    elif case == "cameras":
        _image_hdf5(src, cameras=(("agentview", "robot0_eye_in_hand"), ("agentview",)))
    else:
        _image_hdf5(src)
        with h5py.File(src, "a") as f:
            del f["data/demo_1/obs/agentview_image"]
            f["data/demo_1/obs"].create_group("agentview_image").create_dataset("x", data=np.zeros(3))
    r = dp("dp-import", f"in={src}", f"out={tmp_path / 'out.zarr'}")
    one_line_error(r, "dp-import", *fragments)
    assert not (tmp_path / "out.zarr").exists()


def test_a_low_dim_field_that_is_a_group_is_one_line(tmp_path):
    src = tmp_path / "low_dim.hdf5"
    write_robomimic(src, demos=(0, 1))
    with h5py.File(src, "a") as f:
        del f["data/demo_1/actions"]
        f["data/demo_1"].create_group("actions")
    r = dp("dp-import", f"in={src}", f"out={tmp_path / 'out.zarr'}")
    one_line_error(r, "dp-import", "data/demo_1/actions", "a group")


# --- 15: image stores that contradict their cameras; modes of finished folders -----------------------

def _image_episodes(n=2, size=16, cameras=("agentview", "robot0_eye_in_hand")):
    rng = np.random.default_rng(0)
    return [{"obs": np.zeros((5, 9), np.float32), "action": np.zeros((5, 7), np.float32),
             "state": np.zeros((5, 4)), "reward": np.zeros(5, np.float32), "success": np.zeros(5, bool),
             **{f"{c}_image": rng.integers(0, 256, (5, size, size, 3), dtype=np.uint8) for c in cameras}}
            for _ in range(n)]


@pytest.mark.parametrize("episodes, fragments", [
    (_image_episodes(cameras=("agentview",)), ["robot0_eye_in_hand", "data/robot0_eye_in_hand_image"]),
    (_image_episodes(size=24), ["data/agentview_image", "(24, 24, 3)", "(16, 16, 3)"]),
])
def test_a_store_whose_cameras_contradict_its_frames_is_not_written(episodes, fragments, tmp_path):
    attrs = {"task": "lift", "cameras": ObsConfig("image", ["agentview", "robot0_eye_in_hand"], 16).to_dict()}
    with pytest.raises(StoreError) as err:
        write_store(tmp_path / "x.zarr", episodes, attrs)
    assert "\n" not in str(err.value) and "cameras" in str(err.value)
    for f in fragments:
        assert f in str(err.value), str(err.value)
    assert list(tmp_path.iterdir()) == []
    # the same frames under the cameras they are: written
    assert write_store(tmp_path / "y.zarr", _image_episodes(), attrs).is_dir()


@contextlib.contextmanager
def umask(mask: int):
    before = os.umask(mask)
    try:
        yield
    finally:
        os.umask(before)


def test_finished_checkpoints_and_stores_respect_the_umask(checkpoint, tmp_path):
    with umask(0o022):
        with building(tmp_path / "ckpt") as tmp:
            (tmp / "weights").write_bytes(b"x")
        write_store(tmp_path / "store.zarr", _image_episodes(), {"task": "lift"})
        r = dp("dp-export", f"checkpoint={checkpoint}", f"out={tmp_path / 'zoo'}")
        assert r.returncode == 0, r.stderr[-2000:]
    for folder in (tmp_path / "ckpt", tmp_path / "store.zarr", tmp_path / "zoo"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder
    with umask(0o077), building(tmp_path / "private"):
        pass
    assert stat.S_IMODE((tmp_path / "private").stat().st_mode) == 0o700
