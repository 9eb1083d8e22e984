"""Importing robomimic low-dim HDF5 files (written here, in robomimic's layout, with h5py) and
the `dp-import` command line: one-line errors, exit code 2, nothing left behind."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

from common.errors import UserError
from envs.errors import SourceError, StoreError
from envs.importers import import_robomimic
from envs.store import open_store
from envs.tasks import OBS_KEYS, TASKS, get_task

from commands import dp

STATE_DIM = 32


def write_robomimic(path: Path, demos=(0, 1, 2, 10, 11), env_name="Lift", reward_shaping=False,
                    dones=True, masks=True) -> dict[str, dict]:
    """A robomimic low-dim HDF5 at `path`; returns each demo's arrays by demo name.

    Demos are written in a scrambled order, so neither creation order nor name order is the
    numeric order. Each demo ends in success (reward 1 at its last step), and `dones` marks the
    last step and, as robomimic's done_mode 2 does, every success step.
    """
    spec = {s.env_name: s for s in TASKS.values()}.get(env_name, TASKS["lift"])  # unknown env: lift-sized obs
    layout = spec.obs_layout
    rng = np.random.default_rng(7)
    written = {}
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        env_args = {"env_name": env_name, "type": 1,
                    "env_kwargs": {"has_renderer": False, "reward_shaping": reward_shaping,
                                   "control_freq": 20, "controller_configs": {"type": "OSC_POSE"}}}
        data.attrs["env_args"] = json.dumps(env_args)
        data.attrs["total"] = 0
        for i in sorted(demos, key=lambda i: (i * 7919) % 13):
            n = 4 + i
            demo = {"obs": {k: rng.normal(size=(n, b - a)) for k, (a, b) in layout.items()},
                    "actions": rng.uniform(-1, 1, size=(n, 7)),
                    "states": rng.normal(size=(n, STATE_DIM)),
                    "rewards": (np.arange(n) >= n - 2).astype(np.float64) * (0.7 if reward_shaping else 1.0),
                    "dones": (np.arange(n) >= n - 2).astype(np.int64)}
            if reward_shaping:
                demo["rewards"][: n - 2] = 0.3  # dense: positive before success
            g = data.create_group(f"demo_{i}")
            g.attrs["num_samples"] = n
            for key, value in demo["obs"].items():
                g.create_dataset(f"obs/{key}", data=value)
                g.create_dataset(f"next_obs/{key}", data=value)
            for key in ("actions", "states", "rewards") + (("dones",) if dones else ()):
                g.create_dataset(key, data=demo[key])
            written[f"demo_{i}"] = demo
        if masks:
            names = [f"demo_{i}" for i in demos]
            f.create_dataset("mask/train", data=np.array(names[1:], dtype="S"))
            f.create_dataset("mask/valid", data=np.array(names[:1], dtype="S"))
    return written


def test_import_roundtrip_in_numeric_demo_order(tmp_path):
    src = tmp_path / "low_dim.hdf5"
    demos = write_robomimic(src)
    out = import_robomimic(src, tmp_path / "lift.zarr")
    assert out == tmp_path / "lift.zarr"
    order = ["demo_0", "demo_1", "demo_2", "demo_10", "demo_11"]
    with open_store(out, task="lift") as store:
        assert store.n_episodes == 5
        np.testing.assert_array_equal(store.episode_ends, np.cumsum([4, 5, 6, 14, 15]))
        assert store.attrs["source_demos"] == order
        for i, name in enumerate(order):
            ep, demo = store.episode(i), demos[name]
            expected_obs = np.concatenate([demo["obs"][k] for k in OBS_KEYS], axis=1).astype(np.float32)
            np.testing.assert_array_equal(ep["obs"], expected_obs)
            np.testing.assert_array_equal(ep["action"], demo["actions"].astype(np.float32))
            np.testing.assert_array_equal(ep["state"], demo["states"])
            np.testing.assert_array_equal(ep["reward"], demo["rewards"].astype(np.float32))
            np.testing.assert_array_equal(ep["success"], demo["rewards"] > 0)
        assert store["obs"].dtype == np.float32 and store["state"].dtype == np.float64
        assert store["obs"].shape[1] == get_task("lift").obs_dim
        attrs = store.attrs
        assert attrs["task"] == "lift"
        assert attrs["source"] == "robomimic"
        assert attrs["source_file"] == str(src.resolve())
        assert attrs["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
        assert attrs["robomimic_env_args"]["env_name"] == "Lift"
        assert attrs["obs_keys"] == list(OBS_KEYS)
        assert attrs["obs_layout"] == {k: list(v) for k, v in get_task("lift").obs_layout.items()}
        assert attrs["success_source"] == "rewards"
        assert attrs["source_masks"] == {"train": ["demo_1", "demo_2", "demo_10", "demo_11"],
                                         "valid": ["demo_0"]}
        assert attrs["env"] == get_task("lift").env_settings()


def test_import_twice_gives_the_same_bytes(tmp_path):
    src = tmp_path / "low_dim.hdf5"
    write_robomimic(src, demos=(0, 3))
    a, b = import_robomimic(src, tmp_path / "a.zarr"), import_robomimic(src, tmp_path / "b.zarr")
    files = lambda p: {q.relative_to(p): q.read_bytes()  # noqa: E731
                       for q in sorted(p.rglob("*")) if q.is_file()}
    assert files(a) == files(b)


@pytest.mark.parametrize("env_name, task",
                         [("Lift", "lift"), ("PickPlaceCan", "can"), ("NutAssemblySquare", "square")])
def test_task_from_env_name(tmp_path, env_name, task):
    src = tmp_path / "d.hdf5"
    write_robomimic(src, demos=(0, 1), env_name=env_name)
    with open_store(import_robomimic(src, tmp_path / "s.zarr")) as store:
        assert store.task == task
        assert store["obs"].shape[1] == get_task(task).obs_dim
    with pytest.raises(StoreError, match="expected 'other'"):
        open_store(tmp_path / "s.zarr", task="other")


def test_success_with_shaped_rewards(tmp_path):
    src = tmp_path / "d.hdf5"
    demos = write_robomimic(src, demos=(0, 2), reward_shaping=True)
    with open_store(import_robomimic(src, tmp_path / "dones.zarr")) as store:
        assert store.attrs["success_source"] == "dones"
        np.testing.assert_array_equal(store.episode(1)["success"], demos["demo_2"]["dones"].astype(bool))
    write_robomimic(src, demos=(0, 2), reward_shaping=True, dones=False)
    with open_store(import_robomimic(src, tmp_path / "final.zarr")) as store:
        assert store.attrs["success_source"] == "final_step"
        np.testing.assert_array_equal(store.episode(1)["success"], np.arange(6) == 5)


def _drop(path: Path, name: str) -> None:
    with h5py.File(path, "a") as f:
        del f[name]


def _drop_attr(path: Path, name: str, attr: str) -> None:
    with h5py.File(path, "a") as f:
        del f[name].attrs[attr]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: _drop(p, "data"), "missing group 'data'"),
        (lambda p: _drop(p, "data/demo_10/actions"), "data/demo_10: missing 'actions'"),
        (lambda p: _drop(p, "data/demo_2/states"), "data/demo_2: missing 'states'"),
        (lambda p: _drop(p, "data/demo_1/obs/robot0_eef_quat"), "data/demo_1/obs: missing 'robot0_eef_quat'"),
        (lambda p: _drop(p, "data/demo_0/obs"), "data/demo_0: missing 'obs'"),
        (lambda p: _drop_attr(p, "data", "env_args"), "data: missing attribute 'env_args'"),
    ],
)
def test_missing_keys_are_named(tmp_path, damage, message):
    src = tmp_path / "d.hdf5"
    write_robomimic(src, demos=(0, 1, 2, 10))
    damage(src)
    with pytest.raises(SourceError) as err:
        import_robomimic(src, tmp_path / "out.zarr")
    assert str(err.value).startswith(f"{src}: ") and message in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.hdf5"]


def test_unknown_env_is_named(tmp_path):
    src = tmp_path / "d.hdf5"
    write_robomimic(src, demos=(0,), env_name="Stack")
    with pytest.raises(SourceError, match="env_args.env_name 'Stack' is not a known task"):
        import_robomimic(src, tmp_path / "out.zarr")


def test_obs_width_must_match_the_task(tmp_path):
    src = tmp_path / "d.hdf5"
    write_robomimic(src, demos=(0, 1), env_name="Lift")
    with h5py.File(src, "a") as f:
        del f["data/demo_1/obs/object"]
        f["data/demo_1/obs/object"] = np.zeros((5, 14))  # a can-sized object vector in a Lift file
    with pytest.raises(SourceError, match=r"data/demo_1/obs/object: shape \(5, 14\), "
                                          r"task 'lift' expects \[T, 10\]"):
        import_robomimic(src, tmp_path / "out.zarr")


def test_missing_and_non_hdf5_inputs(tmp_path):
    with pytest.raises(SourceError, match="no such file"):
        import_robomimic(tmp_path / "nope.hdf5", tmp_path / "out.zarr")
    (tmp_path / "text.hdf5").write_text("not hdf5")
    with pytest.raises(SourceError, match="text.hdf5: not a readable HDF5 file"):
        import_robomimic(tmp_path / "text.hdf5", tmp_path / "out.zarr")
    assert issubclass(SourceError, UserError)


def test_existing_output_is_refused_before_reading(tmp_path):
    (tmp_path / "out.zarr").mkdir()
    with pytest.raises(StoreError, match="already exists"):
        import_robomimic(tmp_path / "nope.hdf5", tmp_path / "out.zarr")  # the input is not even looked at


# -- the command line -------------------------------------------------------------------------


def dp_import(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return dp("dp-import", *args, cwd=cwd)


def test_cli_imports(tmp_path):
    write_robomimic(tmp_path / "demo.hdf5", demos=(0, 2, 10))
    result = dp_import("in=demo.hdf5", "out=data/lift.zarr", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "wrote data/lift.zarr: task lift, 3 demos" in result.stdout
    # Hydra wrote nothing of its own (no outputs/, .hydra/, log files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "demo.hdf5"]
    with open_store(tmp_path / "data" / "lift.zarr", task="lift") as store:
        assert store.attrs["source_demos"] == ["demo_0", "demo_2", "demo_10"]
    # overwrite=true replaces it
    result = dp_import("in=demo.hdf5", "out=data/lift.zarr", "overwrite=true", cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def _no_data(p: Path) -> None:
    with h5py.File(p, "w") as f:
        f.create_group("meta")


def _no_actions(p: Path) -> None:
    write_robomimic(p, demos=(0, 1))
    _drop(p, "data/demo_1/actions")


CLI_FAILURES = {
    "missing input": (["in=nope.hdf5", "out=out.zarr"], None, "nope.hdf5: no such file"),
    "not hdf5": (["in=demo.hdf5", "out=out.zarr"], lambda p: p.write_text("hi"), "not a readable HDF5 file"),
    "no data group": (["in=demo.hdf5", "out=out.zarr"], _no_data, "missing group 'data'"),
    "no actions": (["in=demo.hdf5", "out=out.zarr"], _no_actions, "data/demo_1: missing 'actions'"),
    "unknown key": (["in=demo.hdf5", "out=out.zarr", "bogus=1"], write_robomimic, "unknown key 'bogus'"),
    "appended key": (["in=demo.hdf5", "out=out.zarr", "+bogus=1"], write_robomimic, "unknown key 'bogus'"),
    "wrong type": (["in=demo.hdf5", "out=out.zarr", "overwrite=maybe"], write_robomimic, "overwrite: "),
    "missing in": (["out=out.zarr"], write_robomimic, "in: required"),
}


@pytest.mark.parametrize("case", list(CLI_FAILURES))
def test_cli_failures_are_one_line(tmp_path, case):
    args, make_input, message = CLI_FAILURES[case]
    if make_input is not None:
        make_input(tmp_path / "demo.hdf5")
    before = sorted(p.name for p in tmp_path.iterdir())
    result = dp_import(*args, cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dp-import: ") and message in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no store, no temp files, no logs


def test_cli_refuses_existing_output(tmp_path):
    write_robomimic(tmp_path / "demo.hdf5", demos=(0,))
    assert dp_import("in=demo.hdf5", "out=out.zarr", cwd=tmp_path).returncode == 0
    before = {p: p.read_bytes() for p in (tmp_path / "out.zarr").rglob("*") if p.is_file()}
    write_robomimic(tmp_path / "demo.hdf5", demos=(0, 1))
    result = dp_import("in=demo.hdf5", "out=out.zarr", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == "dp-import: out.zarr: already exists; pass overwrite=true to replace it\n"
    assert {p: p.read_bytes() for p in (tmp_path / "out.zarr").rglob("*") if p.is_file()} == before
