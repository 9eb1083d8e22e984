"""LeRobotDataset v3 in and out (envs/lerobot.py), against datasets LeRobot 0.4.4 wrote
(tests/fixtures/lerobot; make_fixtures.py says how to regenerate them) and, where a LeRobot
environment is at hand (PARAPOLICY_LEROBOT_PYTHON=<its python>), LeRobot's own loader."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from commands import dp, one_line_error
from envs.lerobot import export_lerobot, import_lerobot, read_lerobot
from envs.store import open_store

FIXTURES = Path(__file__).parent / "fixtures" / "lerobot"
VALUES = np.load(FIXTURES / "values.npz")
LEROBOT_PYTHON = os.environ.get("PARAPOLICY_LEROBOT_PYTHON")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def store_arrays(path) -> dict:
    with open_store(path) as store:
        return {k: np.asarray(store[k]) for k in store.keys} | {"ends": np.asarray(store.episode_ends)}


def test_reads_the_features_and_episodes_lerobot_wrote():
    episodes, attrs = read_lerobot(FIXTURES / "lowdim")
    assert [len(e["action"]) for e in episodes] == [6, 9, 5]
    for i, ep in enumerate(episodes):
        assert np.array_equal(ep["obs"], VALUES[f"lowdim/{i}/state"])
        assert np.array_equal(ep["action"], VALUES[f"lowdim/{i}/action"])
        assert np.array_equal(ep["reward"], VALUES[f"lowdim/{i}/reward"][:, 0])
        assert ep["success"].tolist() == [False] * (len(ep["obs"]) - 1) + [True]
    assert attrs["task"] == "external" and attrs["obs_layout"] == {"observation.state": [0, 9]}
    lerobot = attrs["lerobot"]
    assert lerobot["features"]["observation.state"]["names"][-1] == "gripper_right"
    assert lerobot["episode_tasks"] == [["pick the cube"], ["place the cube"], ["pick the cube"]]
    assert lerobot["fps"] == 20 and lerobot["robot_type"] == "so100"


def test_video_frames_are_what_lerobots_own_decoder_gives():
    episodes, attrs = read_lerobot(FIXTURES / "video")
    frames = np.concatenate([e["front_image"] for e in episodes])
    assert frames.dtype == np.uint8 and frames.shape == (14, 48, 64, 3)
    assert np.array_equal(frames, VALUES["video/loaded_front"])
    assert attrs["lerobot"]["cameras"] == {"front": "observation.images.front"}
    # LeRobot recorded at its crf 30: its loss, not the reader's
    originals = np.concatenate([VALUES["video/0/front"], VALUES["video/1/front"]])
    assert psnr(frames, originals) > 25


def test_round_trip_keeps_low_dim_values_exactly(tmp_path):
    import_lerobot(FIXTURES / "lowdim", tmp_path / "a.zarr")
    out = export_lerobot(tmp_path / "a.zarr", tmp_path / "exported")
    import_lerobot(out, tmp_path / "b.zarr")
    a, b = store_arrays(tmp_path / "a.zarr"), store_arrays(tmp_path / "b.zarr")
    for key in ("obs", "action", "reward", "success", "ends"):
        assert np.array_equal(a[key], b[key]), key
    info = json.loads((out / "meta" / "info.json").read_text())
    assert info["total_episodes"] == 3 and info["total_frames"] == 20 and info["robot_type"] == "so100"
    assert info["features"]["action"]["names"] == ["dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"]


def test_round_trip_keeps_frames_within_the_codecs_loss(tmp_path):
    import_lerobot(FIXTURES / "video", tmp_path / "a.zarr")
    export_lerobot(tmp_path / "a.zarr", tmp_path / "exported")
    import_lerobot(tmp_path / "exported", tmp_path / "b.zarr")
    a, b = store_arrays(tmp_path / "a.zarr"), store_arrays(tmp_path / "b.zarr")
    assert a["front_image"].shape == b["front_image"].shape
    assert psnr(a["front_image"], b["front_image"]) >= 35
    assert np.array_equal(a["obs"], b["obs"])


def test_a_robosuite_store_exports_with_named_parts(image_store, tmp_path):
    out = export_lerobot(image_store, tmp_path / "lift")
    info = json.loads((out / "meta" / "info.json").read_text())
    feats = info["features"]
    assert feats["observation.environment_state"]["shape"] == [10]
    assert feats["observation.state"]["names"][:2] == ["robot0_eef_pos_0", "robot0_eef_pos_1"]
    assert feats["action"]["names"][-1] == "gripper" and info["robot_type"] == "Panda"
    assert {"observation.images.agentview", "observation.images.robot0_eye_in_hand"} <= set(feats)
    back = import_lerobot(out, tmp_path / "back.zarr")
    a, b = store_arrays(image_store), store_arrays(back)
    assert np.array_equal(a["obs"], b["obs"]) and np.array_equal(a["action"], b["action"])
    assert psnr(a["agentview_image"], b["agentview_image"]) >= 35


@pytest.mark.skipif(not LEROBOT_PYTHON, reason="LeRobot's loader needs its own environment (torch < 2.11): "
                    "set PARAPOLICY_LEROBOT_PYTHON (see tests/fixtures/lerobot/make_fixtures.py)")
def test_lerobots_loader_opens_an_export(image_store, tmp_path):
    out = export_lerobot(image_store, tmp_path / "lift")
    subprocess.run([LEROBOT_PYTHON, FIXTURES / "load_check.py", out, tmp_path / "loaded.npz"], check=True,
                   capture_output=True)
    loaded, store = np.load(tmp_path / "loaded.npz"), store_arrays(image_store)
    meta = json.loads(str(loaded["meta"]))
    assert meta["episodes"] == len(store["ends"]) and meta["frames"] == len(store["action"])
    assert np.array_equal(loaded["action"], store["action"])
    obs = np.concatenate([loaded["observation.environment_state"], loaded["observation.state"]], axis=1)
    assert np.array_equal(obs, store["obs"])
    assert psnr(loaded["observation.images.agentview"], store["agentview_image"]) >= 35


def broken(tmp_path: Path, name: str = "video") -> Path:
    root = tmp_path / "broken"
    shutil.copytree(FIXTURES / name, root)
    return root


def edit_info(root: Path, change) -> None:
    info = json.loads((root / "meta" / "info.json").read_text())
    change(info)
    (root / "meta" / "info.json").write_text(json.dumps(info))


def shorten_first_episode(root: Path) -> None:
    import pyarrow.parquet as pq

    path = next((root / "meta" / "episodes").glob("*/*.parquet"))
    table = pq.read_table(path)
    lengths = table.column("length").to_pylist()
    table = table.set_column(table.column_names.index("length"), "length", [[lengths[0] - 1, *lengths[1:]]])
    pq.write_table(table, path)


def edit_table(root: Path, folder: str, change) -> None:
    import pyarrow.parquet as pq

    path = next((root / folder).glob("*/*.parquet"))
    pq.write_table(change(pq.read_table(path)), path)


def set_column(table, key: str, values):
    import pyarrow as pa

    values = values if isinstance(values, pa.Array) else pa.array(values)
    return table.set_column(table.column_names.index(key), key, values)


def change_data(key: str, change):
    """A damage: the data's column `key`, as [rows, width] numbers, changed by `change`."""
    import pyarrow as pa

    def edit(table):
        col = table.column(key).combine_chunks()
        is_list = pa.types.is_fixed_size_list(col.type)
        values = change((col.flatten() if is_list else col).to_numpy().reshape(len(col), -1).copy())
        if not is_list and values.shape[1] == 1:
            return set_column(table, key, values[:, 0])
        return set_column(table, key, pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)),
                                                                         values.shape[1]))
    return lambda root: edit_table(root, "data", edit)


def one_value(x: float):
    def change(values):
        values = values.astype(np.float32)
        values[2, 0] = x
        return values
    return change


def change_episodes(key: str, values):
    return lambda root: edit_table(root, "meta/episodes", lambda t: set_column(t, key, values))


def video_outside(root: Path, absolute: bool) -> None:
    """video_path naming a real video outside the dataset: refused as a path, not for being missing."""
    outside = root.parent / "elsewhere" / "front.mp4"
    outside.parent.mkdir()
    shutil.copy(next((root / "videos").rglob("*.mp4")), outside)
    edit_info(root, lambda i: i.update(video_path=str(outside) if absolute else "../elsewhere/front.mp4"))


def info_sets(**values):
    return lambda root: edit_info(root, lambda i: i.update(**values))


def features(change):
    return lambda root: edit_info(root, lambda i: change(i["features"]))


def ragged(table):
    return set_column(table, "action", [[0.5] * 6, [0.5] * 8] + [[0.5] * 7] * (table.num_rows - 2))


BAD = {
    "no meta": (lambda root: (root / "meta" / "info.json").unlink(), "not a LeRobotDataset"),
    "v2.1": (lambda root: edit_info(root, lambda i: i.update(codebase_version="v2.1")), "only v3.0 is read"),
    "mismatched lengths": (shorten_first_episode, "episode 0: length 7 but rows 0..8"),
    "image feature": (features(lambda f: f.update(
        {"observation.depth": {"dtype": "image", "shape": [48, 64, 1], "names": None}})),
        "features.observation.depth: dtype 'image'"),
    "text feature": (features(lambda f: f.update(
        {"observation.language": {"dtype": "string", "shape": [1], "names": None}})),
        "features.observation.language: dtype 'string'"),
    "no action": (features(lambda f: f.pop("action")), "no 'action'"),
    "missing video": (lambda root: shutil.rmtree(root / "videos"), "missing (a video feature's file)"),
    # probe round 4: tracebacks before
    "no rows": (lambda root: edit_table(root, "data", lambda t: t.slice(0, 0)), "the data has no rows"),
    "NaN action": (change_data("action", one_value(np.nan)), "'action': 1 values are NaN or inf"),
    "NaN reward": (change_data("next.reward", one_value(np.nan)), "'next.reward': 1 values are NaN"),
    "inf state": (change_data("observation.state", one_value(np.inf)), "'observation.state': 1 values"),
    "-inf state": (change_data("observation.state", one_value(-np.inf)), "(first in row 2, episode 0)"),
    "info.json null": (lambda root: (root / "meta" / "info.json").write_text("null"), "is not a JSON object"),
    "fps 'fast'": (info_sets(fps="fast"), "fps: 'fast' is not a number"),
    "fps NaN": (info_sets(fps=float("nan")), "fps: nan is not a finite"),
    "fps null": (info_sets(fps=None), "fps: None is not a number"),
    "fps 0": (info_sets(fps=0), "fps: 0 must be positive"),
    "fps -20": (info_sets(fps=-20), "fps: -20 must be positive"),
    "fps inf": (info_sets(fps=float("inf")), "fps: inf is not a finite"),
    "features a list": (info_sets(features=["observation.state", "action"]), "features: [\"observation"),
    "feature not an object": (features(lambda f: f.update(action=7)), "features.action: 7 is not an object"),
    "shape an int": (features(lambda f: f["action"].update(shape=7)), "features.action: shape 7 is not a"),
    "from_index negative": (change_episodes("dataset_from_index", [-1, 8]), "dataset_from_index: -1 must be"),
    "from_index a float": (change_episodes("dataset_from_index", [0.5, 8.0]), "0.5 is not an integer"),
    "video_path unknown field": (info_sets(video_path="v/{camera}.mp4"), "KeyError 'camera'"),
    # accepted before
    "action 3 wide": (change_data("action", lambda v: v[:, :3]), "'action': 3 numbers a row, but info.json's "
                      "shape [7] says 7"),
    "state 5 wide": (change_data("observation.state", lambda v: v[:, :5]), "5 numbers a row"),
    "state 20 wide": (change_data("observation.state", lambda v: np.tile(v, 3)[:, :20]), "20 numbers a row"),
    "frames not info's shape": (features(lambda f: f["observation.images.front"].update(shape=[96, 128, 3])),
                                "frames of 48x64 pixels, but info.json's observation.images.front has shape"),
    "actions of 1e30": (change_data("action", one_value(1e30)), "1e+30 in row 2 (episode 0); values beyond"),
    "NaN from_timestamp": (change_episodes("videos/observation.images.front/from_timestamp", [np.nan, 0.4]),
                           "episode 0: videos/observation.images.front/from_timestamp: nan is not a finite"),
    "NaN timestamps": (change_data("timestamp", lambda v: v * np.nan), "'timestamp': 14 values are NaN"),
    "timestamps at another rate": (change_data("timestamp", lambda v: v * 2),
                                   "0.1 s at frame 1 of episode 0, which at 20 fps is at 0.05 s"),
    "floats where info says int8": (features(lambda f: f["observation.state"].update(dtype="int8")),
                                    "in row 0 does not fit dtype int8, which info.json gives it"),
    "ragged action": (lambda root: edit_table(root, "data", ragged), "rows of different lengths (6 in row 0"),
    "reward 2 wide": (change_data("next.reward", lambda v: np.tile(v, 2)), "'next.reward': 2 numbers a row"),
    "episodes leave a gap": (lambda root: edit_table(root, "meta/episodes", lambda t: set_column(
        set_column(t, "dataset_from_index", [0, 9]), "dataset_to_index", [8, 15])), "episode 1 starts at"),
    "video_path out of the dataset": (lambda root: video_outside(root, absolute=False),
                                      "gives '../elsewhere/front.mp4', a path outside the dataset's folder"),
    "video_path absolute": (lambda root: video_outside(root, absolute=True), "a path outside the dataset's"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_dataset_is_one_line_and_leaves_nothing(tmp_path, case):
    damage, message = BAD[case]
    root = broken(tmp_path)
    damage(root)
    out = tmp_path / "out" / "arm.zarr"
    result = dp("dp-import", f"in={root}", f"out={out}")
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nor a partial store, nor the folder it would go in


def a_user_folder(folder: Path, store: Path) -> None:
    folder.mkdir()


def an_empty_info(folder: Path, store: Path) -> None:
    (folder / "meta").mkdir(parents=True)
    (folder / "meta" / "info.json").write_text("{}")


def a_dataset_beside_other_files(folder: Path, store: Path) -> None:
    export_lerobot(store, folder)


NOT_DATASETS = {"a folder without meta/": (a_user_folder, "no readable meta/info.json"),
                "meta/info.json of {}": (an_empty_info, "its meta/info.json has no codebase_version"),
                "a dataset with the user's file in it": (a_dataset_beside_other_files, "also holds keep.txt")}


@pytest.mark.parametrize("case", NOT_DATASETS)
def test_export_refuses_to_replace_what_is_not_a_dataset(tmp_path, case):
    make, message = NOT_DATASETS[case]
    store = import_lerobot(FIXTURES / "lowdim", tmp_path / "a.zarr")
    make(tmp_path / "notes", store)
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    result = dp("dp-export-lerobot", f"store={store}", f"out={tmp_path / 'notes'}", "overwrite=true")
    one_line_error(result, "dp-export-lerobot", "not a LeRobotDataset", message)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    assert "wrote" in dp("dp-export-lerobot", f"store={store}", f"out={tmp_path / 'ds'}").stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zarr", "ds", "notes"]  # nothing half-written


def edit_store_attrs(store: Path, change) -> None:
    path = store / "zarr.json"
    meta = json.loads(path.read_text())
    change(meta["attributes"])
    path.write_text(json.dumps(meta))


def no_episodes(store: Path) -> None:
    import zarr

    shutil.rmtree(store)
    root = zarr.create_group(str(store), zarr_format=3, attributes={"task": "external"})
    data = root.create_group("data")
    for key, shape, dtype in [("obs", (0, 9), "float32"), ("action", (0, 7), "float32"),
                              ("reward", (0,), "float32"), ("success", (0,), "bool"),
                              ("state", (0, 0), "float64")]:
        data.create_array(key, shape=shape, dtype=dtype)
    root.create_group("meta").create_array("episode_ends", shape=(0,), dtype="int64")


def store_fps(fps):
    return lambda store: edit_store_attrs(store, lambda a: a["lerobot"].update(fps=fps))


BAD_STORES = {
    "no episodes": (no_episodes, "no episodes to export"),
    "fps 0": (store_fps(0), "attrs.lerobot.fps: 0 must be positive"),
    "fps -20": (store_fps(-20), "attrs.lerobot.fps: -20 must be positive"),
    "floats recorded as int8": (lambda s: edit_store_attrs(s, lambda a: a["lerobot"]["features"][
        "observation.state"].update(dtype="int8")), "(observation.state): 0.12573022 does not fit dtype"),
    "a span past the observation": (lambda s: edit_store_attrs(s, lambda a: a.update(
        obs_layout={"observation.state": [0, 12]})), "[0, 12] is not a span [start, stop] of the 9 columns"),
}


@pytest.mark.parametrize("case", BAD_STORES)
def test_export_of_a_bad_store_is_one_line_and_leaves_nothing(tmp_path, case):
    damage, message = BAD_STORES[case]
    store = import_lerobot(FIXTURES / "lowdim", tmp_path / "a.zarr")
    damage(store)
    result = dp("dp-export-lerobot", f"store={store}", f"out={tmp_path / 'out' / 'ds'}")
    one_line_error(result, "dp-export-lerobot", message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zarr"]  # nor the folder it would go in


def test_of_two_exports_to_one_new_folder_the_one_finishing_later_refuses(tmp_path, monkeypatch):
    import envs.lerobot as lerobot

    store = import_lerobot(FIXTURES / "lowdim", tmp_path / "a.zarr")
    out, write_tasks = tmp_path / "ds", lerobot._write_tasks

    def another_export_meanwhile(dest, unique):
        monkeypatch.setattr(lerobot, "_write_tasks", write_tasks)
        export_lerobot(store, out)  # started after ours, done before it
        write_tasks(dest, unique)

    monkeypatch.setattr(lerobot, "_write_tasks", another_export_meanwhile)
    result = dp("dp-export-lerobot", f"store={store}", f"out={out}")
    one_line_error(result, "dp-export-lerobot", f"{out}: already exists")
    assert json.loads((out / "meta" / "info.json").read_text())["total_episodes"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zarr", "ds"]


def files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_keeps_the_old_dataset_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    import errno

    import envs.lerobot as lerobot

    store = import_lerobot(FIXTURES / "lowdim", tmp_path / "a.zarr")
    out = export_lerobot(store, tmp_path / "ds")
    (out / "README.md").write_text("a dataset card, as the Hub has")
    old = files(out)

    def disk_full(dest, unique):
        assert files(out) == old and dest != out  # built elsewhere, the old one untouched
        raise OSError(errno.ENOSPC, "No space left on device", str(dest / "meta" / "tasks.parquet"))

    monkeypatch.setattr(lerobot, "_write_tasks", disk_full)
    result = dp("dp-export-lerobot", f"store={store}", f"out={out}", "overwrite=true")
    one_line_error(result, "dp-export-lerobot", "No space left on device")
    assert files(out) == old and sorted(p.name for p in tmp_path.iterdir()) == ["a.zarr", "ds"]
    monkeypatch.undo()
    edit_store_attrs(store, lambda a: a["lerobot"].update(robot_type="koch"))
    assert dp("dp-export-lerobot", f"store={store}", f"out={out}", "overwrite=true").returncode == 0
    assert json.loads((out / "meta" / "info.json").read_text())["robot_type"] == "koch"
    assert not (out / "README.md").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a.zarr", "ds"]


# Run as a process of its own: the export or import killed with SIGKILL halfway through writing.
KILLED_HALFWAY = """
import os, signal, sys
import envs.lerobot as lerobot, envs.store as store

def killed(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if sys.argv[1] == "export":
    lerobot._write_tasks = killed  # the data file written, the rest not
    lerobot.export_lerobot(sys.argv[2], sys.argv[3], overwrite=True)
else:
    arrays, create = [], store._create_array
    def some_then_killed(*args, **kwargs):
        arrays.append(args[1])
        if len(arrays) == 3:
            killed()
        create(*args, **kwargs)
    store._create_array = some_then_killed
    lerobot.import_lerobot(sys.argv[2], sys.argv[3])
"""


def test_a_kill_leaves_a_hidden_partial_that_the_next_run_removes(tmp_path):
    import signal
    import sys

    store = import_lerobot(FIXTURES / "lowdim", tmp_path / "a.zarr")
    out = export_lerobot(store, tmp_path / "ds")
    old = files(out)
    killed = subprocess.run([sys.executable, "-c", KILLED_HALFWAY, "export", store, out], cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL
    assert files(out) == old and len(list(tmp_path.glob(".ds.*.partial"))) == 1  # hidden, the old one kept
    assert dp("dp-export-lerobot", f"store={store}", f"out={out}", "overwrite=true").returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zarr", "ds"]

    killed = subprocess.run([sys.executable, "-c", KILLED_HALFWAY, "import", FIXTURES / "lowdim",
                             tmp_path / "b.zarr"], cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL
    assert [p.name[:8] for p in tmp_path.glob(".*")] == [".b.zarr."]  # only the hidden partial
    assert dp("dp-import", f"in={FIXTURES / 'lowdim'}", f"out={tmp_path / 'b.zarr'}").returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zarr", "b.zarr", "ds"]


@pytest.mark.parametrize("command", ["dp-import", "dp-export-lerobot"])
def test_ctrl_c_while_writing_leaves_nothing(tmp_path, monkeypatch, command):
    import envs.lerobot as lerobot
    import envs.store

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    if command == "dp-import":
        monkeypatch.setattr(envs.store, "_create_array", interrupted)
        args = [f"in={FIXTURES / 'video'}", f"out={tmp_path / 'out' / 'a.zarr'}"]
    else:
        store = import_lerobot(FIXTURES / "video", tmp_path / "a.zarr")
        monkeypatch.setattr(lerobot, "encode_video", interrupted)
        args = [f"store={store}", f"out={tmp_path / 'out' / 'ds'}"]
    result = dp(command, *args)
    assert result.returncode == 130 and "interrupted" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


# dp-import in a process whose files cannot grow past 2000 bytes: a write past that fails with
# EFBIG (SIGXFSZ, which would kill it, ignored), as a full disk fails one with ENOSPC.
FILES_OF_2000_BYTES = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))
from envs.launch import dp_import
sys.argv[0] = "dp-import"
dp_import()
"""


def test_a_full_disk_during_import_is_one_line_and_frees_the_space(tmp_path):
    import sys

    args = [f"in={FIXTURES / 'video'}", f"out={tmp_path / 'out' / 'a.zarr'}"]
    result = subprocess.run([sys.executable, "-c", FILES_OF_2000_BYTES, *args], cwd=tmp_path,
                            capture_output=True, text=True)
    one_line_error(result, "dp-import", "File too large")
    assert sorted(tmp_path.iterdir()) == []  # no partial store holding the space, nor its folder


def test_a_missing_extra_is_one_line(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "av", None)  # import av raises ImportError
    result = dp("dp-import", f"in={FIXTURES / 'lowdim'}", f"out={tmp_path / 'a.zarr'}")
    assert result.returncode != 0 and "pip install 'parapolicy[lerobot]'" in result.stderr
    assert not (tmp_path / "a.zarr").exists()


def test_a_policy_trains_on_an_imported_dataset_and_plans_through_dp_serve(tmp_path, start_server):
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    assert dp("dp-import", f"in={FIXTURES / 'lowdim'}", f"out={tmp_path / 'arm.zarr'}").returncode == 0
    result = dp("dp-train", "task=external", f"data={tmp_path / 'arm.zarr'}", f"out={tmp_path / 'run'}",
                "steps=6", "batch_size=8", "val_fraction=0", "threads=1", "progress=false",
                "policy.unet.down_dims=[16,32]", "policy.unet.step_embed_dim=16", "policy.unet.n_groups=4")
    assert result.returncode == 0, result.stderr
    _, port = start_server(path=tmp_path / "run")
    client = WebsocketClientPolicy(host="127.0.0.1", port=port)
    meta = client.get_server_metadata()
    state = meta["features"]["observation"]["observation.state"]
    assert state["shape"] == [9] and state["names"][0] == "joint0" and meta["features"]["fps"] == 20
    assert meta["features"]["action"]["names"][0] == "dx" and meta["task"] == "external"
    by_name = client.infer({"observation.state": VALUES["lowdim/0/state"][0]})["actions"]
    flat = client.infer({"obs_history": np.repeat(VALUES["lowdim/0/state"][:1], 2, axis=0)})["actions"]
    assert by_name.shape == flat.shape == (8, 7) and np.isfinite(by_name).all()
    with pytest.raises(RuntimeError, match=r"observation.state: shape \(4,\)"):
        client.infer({"observation.state": np.zeros(4, np.float32)})


def test_task_external_refuses_a_simulator_store(image_store, tmp_path):
    result = dp("dp-train", "task=external", f"data={image_store}", f"out={tmp_path / 'run'}", "steps=1")
    assert result.returncode != 0 and "store holds task 'lift', expected 'external'" in result.stderr
