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

from commands import dp
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


BAD = {
    "no meta": (lambda root: (root / "meta" / "info.json").unlink(), "not a LeRobotDataset"),
    "v2.1": (lambda root: edit_info(root, lambda i: i.update(codebase_version="v2.1")), "only v3.0 is read"),
    "mismatched lengths": (shorten_first_episode, "episode 0: length 7 but rows 0..8"),
    "image feature": (lambda root: edit_info(root, lambda i: i["features"].update(
        {"observation.depth": {"dtype": "image", "shape": [48, 64, 1], "names": None}})),
        "features.observation.depth: dtype 'image'"),
    "text feature": (lambda root: edit_info(root, lambda i: i["features"].update(
        {"observation.language": {"dtype": "string", "shape": [1], "names": None}})),
        "features.observation.language: dtype 'string'"),
    "no action": (lambda root: edit_info(root, lambda i: i["features"].pop("action")), "no 'action'"),
    "missing video": (lambda root: shutil.rmtree(root / "videos"), "missing (a video feature's file)"),
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


def test_export_refuses_to_replace_what_is_not_a_dataset(tmp_path):
    import_lerobot(FIXTURES / "lowdim", tmp_path / "a.zarr")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    store = f"store={tmp_path / 'a.zarr'}"
    result = dp("dp-export-lerobot", store, f"out={tmp_path / 'notes'}", "overwrite=true")
    assert result.returncode != 0 and "not a LeRobotDataset" in result.stderr
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    assert "wrote" in dp("dp-export-lerobot", store, f"out={tmp_path / 'ds'}").stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zarr", "ds", "notes"]  # nothing half-written


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
