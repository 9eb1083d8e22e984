"""The demonstration store: round trips, byte-identical rewrites, atomic writes, reading
diffusion_policy's zarr v2 replay buffers, and refusing stores that are missing, damaged or of
another task."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numcodecs
import numpy as np
import pytest
import zarr

from common.errors import UserError
from envs import store as store_module
from envs.errors import StoreError
from envs.store import FORMAT, FORMAT_VERSION, open_store, write_store

OBS_DIM, STATE_DIM = 23, 32


def make_episodes(lengths=(5, 9, 3), seed=0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {
            "obs": rng.normal(size=(n, OBS_DIM)).astype(np.float32),
            "action": rng.uniform(-1, 1, size=(n, 7)).astype(np.float32),
            "state": rng.normal(size=(n, STATE_DIM)),
            "reward": (np.arange(n) == n - 1).astype(np.float32),
            "success": np.arange(n) == n - 1,
        }
        for n in lengths
    ]


ATTRS = {"task": "lift", "env": {"control_freq": 20, "horizon": 400}, "episode_seeds": [0, 1, 2]}


def files_of(path: Path) -> dict[str, bytes]:
    """Relative name -> bytes of every file of a store (a directory or a single file)."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# -- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["demos.zarr", "demos.zarr.zip"])
def test_roundtrip(tmp_path, name):
    episodes = make_episodes()
    path = write_store(tmp_path / name, episodes, ATTRS)
    assert path == tmp_path / name
    assert path.is_file() == name.endswith(".zip")

    with open_store(path, task="lift") as store:
        assert store.zarr_format == 3
        assert store.n_episodes == 3
        assert store.n_steps == 17
        assert store.episode_ends.dtype == np.int64
        np.testing.assert_array_equal(store.episode_ends, [5, 14, 17])
        assert store.keys == ("action", "obs", "reward", "state", "success")
        assert store.task == "lift"
        assert store.attrs == {"format": FORMAT, "format_version": FORMAT_VERSION, **ATTRS}
        expected_dtypes = {"obs": np.float32, "action": np.float32, "state": np.float64,
                           "reward": np.float32, "success": np.bool_}
        for key, dtype in expected_dtypes.items():
            assert store[key].dtype == dtype, key
            np.testing.assert_array_equal(store[key], np.concatenate([e[key] for e in episodes]))
        for i, episode in enumerate(episodes):
            got = store.episode(i)
            assert set(got) == set(episode)
            for key in episode:
                np.testing.assert_array_equal(got[key], episode[key])
        assert store.episode_slice(1) == slice(5, 14)
        assert store.episode_slice(-1) == slice(14, 17)
        with pytest.raises(IndexError):
            store.episode(3)
        with pytest.raises(StoreError, match="no array data/image"):
            store["image"]
        assert "obs" in store and "image" not in store


def test_converts_to_canonical_dtypes_and_plain_attrs(tmp_path):
    episodes = make_episodes()
    for e in episodes:  # what an env hands over: float64 everywhere, success as 0/1
        e["obs"] = e["obs"].astype(np.float64)
        e["reward"] = e["reward"].astype(np.float64)
        e["success"] = e["success"].astype(np.int64)
    attrs = {"task": "lift", "seeds": np.arange(3), "dt": np.float64(0.05), "pair": (1, 2),
             "path": Path("a/b")}
    with open_store(write_store(tmp_path / "s.zarr", episodes, attrs)) as store:
        assert store["obs"].dtype == np.float32 and store["reward"].dtype == np.float32
        assert store["success"].dtype == np.bool_ and store["success"].sum() == 3
        assert store.attrs["seeds"] == [0, 1, 2] and store.attrs["dt"] == 0.05
        assert store.attrs["pair"] == [1, 2] and store.attrs["path"] == "a/b"


def test_large_keys_are_chunked_in_time(tmp_path):
    episodes = make_episodes(lengths=(3000, 2000))
    episodes[0]["state"] = np.random.default_rng(1).normal(size=(3000, 200))
    episodes[1]["state"] = np.random.default_rng(2).normal(size=(2000, 200))
    path = write_store(tmp_path / "s.zarr", episodes, ATTRS)
    state = zarr.open_array(path / "data" / "state", mode="r")
    assert state.chunks[1:] == (200,) and 1 < state.nchunks  # whole rows, several time chunks
    with open_store(path) as store:
        np.testing.assert_array_equal(store.episode(1)["state"], episodes[1]["state"])


# -- determinism ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["demos.zarr", "demos.zip"])
def test_rewrite_is_byte_identical(tmp_path, name):
    a = write_store(tmp_path / "a" / name, make_episodes(), ATTRS)
    b = write_store(tmp_path / "b" / name, make_episodes(), ATTRS)
    fa, fb = files_of(a), files_of(b)
    assert len(fa) > 5 if not name.endswith(".zip") else len(fa) == 1
    assert fa == fb
    # and the comparison can tell: other data, other bytes
    assert files_of(write_store(tmp_path / "c" / name, make_episodes(seed=1), ATTRS)) != fa


def test_rewrite_in_another_process_is_byte_identical(tmp_path):
    """Nothing depends on the process: hash seeds, thread timing, clocks."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[2]); from tests.test_store import *; "
        "write_store(sys.argv[1], make_episodes(), ATTRS)"
    )
    root = str(Path(__file__).resolve().parent.parent)
    for name, seed in (("a.zarr", "1"), ("b.zarr", "2")):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-c", code, str(tmp_path / name), root], check=True, env=env)
    write_store(tmp_path / "c.zarr", make_episodes(), ATTRS)
    assert files_of(tmp_path / "a.zarr") == files_of(tmp_path / "b.zarr") == files_of(tmp_path / "c.zarr")


# -- atomic writes ----------------------------------------------------------------------------


def _count_array_writes(monkeypatch, fail_at: int | None = None, exc: BaseException | None = None) -> list:
    """Record each array the writer creates; optionally raise `exc` at the `fail_at`-th."""
    calls = []
    real = store_module._create_array

    def spy(group, name, values):
        calls.append(name)
        if fail_at is not None and len(calls) == fail_at:
            raise exc
        real(group, name, values)

    monkeypatch.setattr(store_module, "_create_array", spy)
    return calls


def test_bad_array_mid_write_leaves_nothing(tmp_path, monkeypatch):
    calls = _count_array_writes(monkeypatch)
    episodes = make_episodes()
    episodes[2]["state"][1, 4] = np.nan  # 'state' is written after 'action', 'obs', 'reward'
    dest = tmp_path / "new" / "deeper" / "demos.zarr"
    with pytest.raises(ValueError, match="episode 2: 'state' has non-finite values"):
        write_store(dest, episodes, ATTRS)
    assert calls == ["action", "obs", "reward"]  # it failed mid-write, not before starting
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary litter, no parents it created


def test_unconvertible_array_mid_write_leaves_nothing(tmp_path, monkeypatch):
    calls = _count_array_writes(monkeypatch)
    episodes = make_episodes()
    episodes[1]["success"] = np.array(["yes"] * 9)  # a str would be truthy, but it is not a bool
    with pytest.raises(ValueError, match="episode 1: 'success': dtype <U3 cannot be stored"):
        write_store(tmp_path / "demos.zip", episodes, ATTRS)
    assert len(calls) == 4
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["demos.zarr", "demos.zip"])
def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch, name):
    _count_array_writes(monkeypatch, fail_at=3, exc=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        write_store(tmp_path / name, make_episodes(), ATTRS)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["demos.zarr", "demos.zip"])
def test_existing_store_is_refused(tmp_path, name):
    path = write_store(tmp_path / name, make_episodes(), ATTRS)
    before = files_of(path)
    with pytest.raises(StoreError, match="already exists") as err:
        write_store(path, make_episodes(seed=1), ATTRS)
    assert str(path) in str(err.value)
    assert isinstance(err.value, UserError)
    assert files_of(path) == before


@pytest.mark.parametrize("name", ["demos.zarr", "demos.zip"])
def test_overwrite_replaces_only_when_complete(tmp_path, monkeypatch, name):
    path = write_store(tmp_path / name, make_episodes(), ATTRS)
    before = files_of(path)
    # a failing overwrite keeps the old store whole
    _count_array_writes(monkeypatch, fail_at=2, exc=RuntimeError("disk on fire"))
    with pytest.raises(RuntimeError):
        write_store(path, make_episodes(seed=1), ATTRS, overwrite=True)
    assert files_of(path) == before
    assert [p.name for p in tmp_path.iterdir()] == [name]
    monkeypatch.undo()
    # a successful one replaces it
    write_store(path, make_episodes(lengths=(4, 4), seed=1), {"task": "can"}, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == [name]
    with open_store(path) as store:
        assert store.task == "can" and store.n_episodes == 2
        np.testing.assert_array_equal(store["obs"],
                                      np.concatenate([e["obs"] for e in make_episodes((4, 4), 1)]))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda eps: eps[1].pop("reward"), "episode 1: keys"),
        (lambda eps: [e.pop("state") for e in eps], "episode 0: missing 'state'"),
        (lambda eps: eps[2].update(obs=eps[2]["obs"][:2]), "episode 2: 'action' has 3 steps"),
        (lambda eps: eps[1].update(obs=eps[1]["obs"][:, :5]), r"episode 1: 'obs' has shape \(9, 5\)"),
        (lambda eps: eps[0].update(reward=np.float32(1)), "episode 0: 'reward' is a scalar"),
        (lambda eps: eps.clear(), "no episodes"),
    ],
)
def test_malformed_episodes_are_refused(tmp_path, change, message):
    episodes = make_episodes()
    change(episodes)
    with pytest.raises(ValueError, match=message):
        write_store(tmp_path / "demos.zarr", episodes, ATTRS)
    assert list(tmp_path.iterdir()) == []


def test_bool_from_other_than_0_or_1_is_refused(tmp_path):
    episodes = make_episodes()
    episodes[0]["success"] = np.full(5, 2)
    with pytest.raises(ValueError, match="episode 0: 'success': values other than 0 and 1"):
        write_store(tmp_path / "demos.zarr", episodes, ATTRS)


@pytest.mark.parametrize("attrs", [{"x": float("nan")}, {"x": {1: "a"}}, {"x": object()}])
def test_attrs_json_cannot_hold_are_refused(tmp_path, attrs):
    with pytest.raises((TypeError, ValueError), match=r"attrs\['x'\]"):
        write_store(tmp_path / "demos.zarr", make_episodes(), attrs)
    assert list(tmp_path.iterdir()) == []


# -- diffusion_policy's zarr v2 replay buffers --------------------------------------------------


def write_dp_v2(root: zarr.Group) -> dict[str, np.ndarray]:
    """A replay buffer as diffusion_policy writes it: zarr v2, Blosc, no attributes."""
    rng = np.random.default_rng(3)
    data = {
        "state": rng.normal(size=(30, 5)).astype(np.float32),
        "action": rng.normal(size=(30, 2)).astype(np.float32),
        "img": rng.integers(0, 255, size=(30, 8, 8, 3), dtype=np.uint8),
    }
    blosc = numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.NOSHUFFLE)
    for key, value in data.items():
        array = root.create_array(f"data/{key}", shape=value.shape, dtype=value.dtype,
                                  chunks=(7, *value.shape[1:]), compressors=blosc)
        array[...] = value
    ends = root.create_array("meta/episode_ends", shape=(3,), dtype=np.int64, chunks=(3,), compressors=None)
    ends[...] = [10, 25, 30]
    return data


def _as_zarr2_python_wrote_it(path: Path) -> None:
    # zarr-python 2 wrote no .zattrs unless asked, and older versions no dimension_separator
    for p in path.rglob(".zattrs"):
        p.unlink()
    for p in path.rglob(".zarray"):
        meta = json.loads(p.read_text())
        meta.pop("dimension_separator", None)
        p.write_text(json.dumps(meta))


def _check_dp_store(store, data):
    assert store.zarr_format == 2
    assert store.attrs == {} and store.task is None
    assert store.keys == ("action", "img", "state")
    np.testing.assert_array_equal(store.episode_ends, [10, 25, 30])
    assert store.episode_ends.dtype == np.int64
    for key, value in data.items():
        np.testing.assert_array_equal(store[key], value)
        np.testing.assert_array_equal(store.episode(1)[key], value[10:25])


def test_reads_diffusion_policy_v2_directory(tmp_path):
    path = tmp_path / "pusht.zarr"
    data = write_dp_v2(zarr.open_group(path, mode="w", zarr_format=2))
    _as_zarr2_python_wrote_it(path)
    assert (path / ".zgroup").exists() and not (path / "zarr.json").exists()
    with open_store(path, task="lift") as store:  # it records no task: the check has nothing to refuse
        _check_dp_store(store, data)


def test_reads_diffusion_policy_v2_zip(tmp_path):
    path = tmp_path / "pusht.zarr.zip"
    zip_store = zarr.storage.ZipStore(path, mode="w")
    data = write_dp_v2(zarr.open_group(zip_store, mode="w", zarr_format=2))
    zip_store.close()
    assert ".zgroup" in zipfile.ZipFile(path).namelist()
    with open_store(path) as store:
        _check_dp_store(store, data)


def test_reads_a_zipped_directory(tmp_path):
    """`zip -r x.zarr.zip x.zarr`: the group sits in the zip's one top-level folder."""
    folder = tmp_path / "pusht.zarr"
    data = write_dp_v2(zarr.open_group(folder, mode="w", zarr_format=2))
    path = tmp_path / "pusht.zarr.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for p in sorted(folder.rglob("*")):
            zf.write(p, p.relative_to(tmp_path).as_posix())
    with open_store(path) as store:
        _check_dp_store(store, data)


# -- refusing stores --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["demos.zarr", "demos.zip"])
def test_wrong_task_is_refused(tmp_path, name):
    path = write_store(tmp_path / name, make_episodes(), {"task": "can"})
    with pytest.raises(StoreError) as err:
        open_store(path, task="lift")
    assert str(err.value) == f"{path}: store holds task 'can', expected 'lift'"
    open_store(path, task="can").close()


def test_missing_store(tmp_path):
    path = tmp_path / "nope.zarr"
    with pytest.raises(StoreError) as err:
        open_store(path)
    assert str(err.value) == f"{path}: no such demonstration store"


def raw_store(path, data: dict, ends, attrs=None, zarr_format=3) -> Path:
    """A zarr group in the replay-buffer layout with exactly the given (possibly wrong) parts."""
    root = zarr.open_group(path, mode="w", zarr_format=zarr_format)
    root.attrs.update(attrs or {})
    for key, value in data.items():
        value = np.asarray(value)
        root.create_array(f"data/{key}", shape=value.shape, dtype=value.dtype)[...] = value
    if ends is not None:
        ends = np.asarray(ends)
        root.create_array("meta/episode_ends", shape=ends.shape, dtype=ends.dtype)[...] = ends
    return Path(path)


def _damage(kind: str, tmp_path: Path) -> tuple[Path, str]:
    """Make a damaged store of `kind`; return it and what the error must say."""
    ok = {"obs": np.zeros((6, 3)), "action": np.zeros((6, 7))}
    p = tmp_path / "bad.zarr"
    if kind == "empty directory":
        p.mkdir()
        return p, "not a readable zarr group"
    if kind == "garbage metadata":
        p.mkdir()
        (p / "zarr.json").write_text("{not json")
        return p, "not a readable zarr group"
    if kind == "an array, not a group":
        zarr.open_array(p, mode="w", shape=(3,), dtype="f4")
        return p, "not a readable zarr group"
    if kind == "a text file":
        p.write_text("hello")
        return p, "not a demonstration store"
    if kind == "a truncated zip":
        good = write_store(tmp_path / "good.zip", make_episodes(), ATTRS)
        p = tmp_path / "bad.zip"
        p.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        return p, "bad.zip"
    if kind == "no episode_ends":
        return raw_store(p, ok, None), "meta/episode_ends: missing"
    if kind == "2-D episode_ends":
        return raw_store(p, ok, [[6]]), "meta/episode_ends: expected 1-D integers"
    if kind == "float episode_ends":
        return raw_store(p, ok, [6.0]), "meta/episode_ends: expected 1-D integers"
    if kind == "no data":
        return raw_store(p, {}, [6]), "data/: missing"
    if kind == "lengths differ":
        return (raw_store(p, {**ok, "action": np.zeros((5, 7))}, [6]),
                "data/: arrays of different lengths (action 5, obs 6)")
    if kind == "ends not increasing":
        return raw_store(p, ok, [4, 4, 6]), "meta/episode_ends: not increasing (episode 1 ends at 4, after 4)"
    if kind == "ends short of the data":
        return raw_store(p, ok, [2, 5]), "meta/episode_ends: last end is 5 but data/ arrays have 6 steps"
    if kind == "ends past the data":
        return raw_store(p, ok, [2, 7]), "meta/episode_ends: last end is 7"
    if kind == "newer format":
        return raw_store(p, ok, [6], {"format": FORMAT, "format_version": 99}), "format_version 99 is newer"
    if kind == "missing chunk":
        path = write_store(p, make_episodes(), ATTRS)
        (path / "data" / "obs" / "c" / "0" / "0").unlink()
        return path, "data/obs: 1 of 1 chunks missing"
    raise AssertionError(kind)


DAMAGE = ["empty directory", "garbage metadata", "an array, not a group", "a text file", "a truncated zip",
          "no episode_ends", "2-D episode_ends", "float episode_ends", "no data", "lengths differ",
          "ends not increasing", "ends short of the data", "ends past the data",
          "newer format", "missing chunk"]


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_store_is_refused(tmp_path, kind):
    path, message = _damage(kind, tmp_path)
    with pytest.raises(StoreError) as err:
        open_store(path)
    text = str(err.value)
    assert text.startswith(f"{path}: "), text
    assert message in text
    assert "\n" not in text


def test_consistent_raw_store_opens(tmp_path):
    """The damaged-store cases above differ from this one only in what they damage."""
    path = raw_store(tmp_path / "ok.zarr", {"obs": np.zeros((6, 3)), "action": np.zeros((6, 7))}, [2, 6])
    with open_store(path) as store:
        assert store.n_episodes == 2 and store.task is None


def test_damaged_chunk_fails_to_read(tmp_path):
    path = write_store(tmp_path / "demos.zarr", make_episodes(), ATTRS)
    chunk = path / "data" / "state" / "c" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    with open_store(path) as store:
        np.testing.assert_array_equal(store["obs"], np.concatenate([e["obs"] for e in make_episodes()]))
        with pytest.raises(StoreError, match=f"{path}: data/state: cannot read"):
            store["state"]


def test_store_dir_copied_is_still_a_store(tmp_path):
    """Nothing in a store refers to where it was written."""
    path = write_store(tmp_path / "a.zarr", make_episodes(), ATTRS)
    shutil.copytree(path, tmp_path / "b.zarr")
    with open_store(tmp_path / "b.zarr", task="lift") as store:
        assert store.n_episodes == 3
