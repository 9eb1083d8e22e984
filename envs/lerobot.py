"""LeRobotDataset v3 in and out of a demonstration store.

A LeRobotDataset (codebase v3.0) is a folder: `meta/info.json` (fps and the features, each with
its dtype, shape and names), `meta/episodes/chunk-*/file-*.parquet` (one row an episode: its
length, its rows in the data files, its span in each video file), `meta/tasks.parquet`,
`meta/stats.json`, the frames in `data/chunk-*/file-*.parquet` and each camera's frames in
`videos/<key>/chunk-*/file-*.mp4`, several episodes one after another in a file.

`import_lerobot` reads one into a store: the numeric `observation.*` features side by side in
`obs` (their spans recorded in `obs_layout`, their names in `attrs["lerobot"]`), `action`, reward
and success from `next.reward` / `next.success`, each video feature decoded to uint8 frames in
`<camera>_image`, the episodes as they were. The store's task is `external` (`task=external`
trains on it). `export_lerobot` writes a store as a LeRobotDataset that LeRobot's loader opens:
an imported store with its original features, a robosuite store with `observation.state`
(proprioception), `observation.environment_state` (the object), `action`, `next.reward`,
`next.done`, `next.success` and one h264 video a camera.

What a dataset says of itself is checked against what it holds before anything is written: the
data's widths, dtypes and values against info.json's features (finite, observations and actions
within ±MAX_ABS), the episodes against the data's rows, each video's frames against its
feature's shape and the episode's times, and every path its metadata builds against the
dataset's folder. Each mismatch is a `SourceError` naming the file and field.

Written by hand, on the libraries LeRobot itself uses for the format (pyarrow for the tables,
PyAV for the video), because LeRobot's own package (lerobot 0.4.4, the newest the registry
serves) pins torch < 2.11 and cannot be installed beside this project's torch. The reader is
tested on datasets LeRobot wrote (tests/fixtures/lerobot), the writer by LeRobot's loader.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from common.checks import check_number
from common.errors import UserError
from common.files import building, remove_stale_partials
from envs.errors import SourceError
from envs.store import check_destination, open_store, write_store
from envs.tasks import EXTERNAL

CODEBASE_VERSION = "v3.0"
ACTION = "action"  # the feature a policy learns to output (LeRobot's name for it)
BOOKKEEPING = ("timestamp", "frame_index", "episode_index", "index", "task_index")
NUMERIC = ("float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")
IMAGE_PREFIX = "observation.images."
DATA_FILE = "data/chunk-000/file-000.parquet"
EPISODES_FILE = "meta/episodes/chunk-000/file-000.parquet"
VIDEO_FILE = "videos/{key}/chunk-000/file-000.mp4"
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
CRF = 18  # h264 quality of exported video: ~40 dB on rendered frames (LeRobot records at 30)
QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)  # the stats LeRobot 0.4 writes beside min/max/mean/std
# The largest observation or action imported: no robot's joint, pose, gripper or motor reading is
# larger in any unit LeRobot records, and a range past it makes normalized values meaningless.
MAX_ABS = 1e6


def require() -> None:
    """UserError in one line when the optional `lerobot` extra is not installed."""
    try:
        import av  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError as err:
        raise UserError(f"LeRobotDataset support needs the lerobot extra ({err.name} is not installed): "
                        "pip install 'parapolicy[lerobot]'") from None


def is_lerobot(path: str | os.PathLike) -> bool:
    """A folder laid out as a LeRobotDataset (a meta/ folder, not a zarr group): read_info says
    what, if anything, it lacks."""
    path = Path(path)
    return (path / "meta").is_dir() and not any((path / z).exists() for z in ("zarr.json", ".zgroup"))


# -- reading ------------------------------------------------------------------------------------

@dataclass
class Feature:
    """One feature of a dataset: LeRobot's description of it and, to be written, its values
    ([rows, *shape])."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    names: Any = None
    values: Any = None

    @classmethod
    def of(cls, key: str, values, dtype: str, names: Any = None) -> Feature:
        return cls(key, dtype, tuple(values.shape[1:]) or (1,), names, values)

    @property
    def width(self) -> int:
        return int(np.prod(self.shape))

    def describe(self, fps: float | None = None) -> dict:
        """info.json's entry; a video's with its codec settings when `fps` is given (writing)."""
        entry = {"dtype": self.dtype, "shape": list(self.shape), "names": self.names}
        if self.dtype != "video" or fps is None:
            return entry
        h, w, c = self.shape
        return {**entry, "names": ["height", "width", "channels"],
                "info": {"video.height": h, "video.width": w, "video.codec": "h264",
                         "video.pix_fmt": "yuv420p", "video.is_depth_map": False, "video.fps": fps,
                         "video.channels": c, "has_audio": False}}


@dataclass
class Plan:
    """Which features of a dataset become which arrays of the store."""

    obs: list[Feature]
    action: Feature
    videos: list[Feature]
    reward: Feature | None = None
    success: Feature | None = None
    skipped: list[str] = field(default_factory=list)

    def obs_layout(self) -> dict[str, list[int]]:
        layout, start = {}, 0
        for f in self.obs:
            layout[f.key] = [start, start + f.width]
            start += f.width
        return layout


def camera_name(key: str) -> str:
    """`observation.images.front` -> `front`: the store keeps its frames in `front_image`."""
    return (key[len(IMAGE_PREFIX):] if key.startswith(IMAGE_PREFIX) else key).replace(".", "_")


def read_info(root: Path) -> dict:
    """meta/info.json, checked: a JSON object with a v3 `codebase_version`, a positive finite
    `fps`, `features` an object of features, path templates and `robot_type` strings."""
    path = root / "meta" / "info.json"
    if not path.is_file():
        raise SourceError(f"{root}: not a LeRobotDataset (no meta/info.json)")
    try:
        info = json.loads(path.read_text())
    except ValueError as err:
        raise SourceError(f"{path}: not JSON ({err})") from None
    if not isinstance(info, dict):
        raise SourceError(f"{path}: {json.dumps(info)[:40]} is not a JSON object (fps, features, ...)")
    for key in ("codebase_version", "fps", "features"):
        if key not in info:
            raise SourceError(f"{path}: no {key!r}")
    if not str(info["codebase_version"]).startswith("v3"):
        raise SourceError(f"{path}: codebase_version {info['codebase_version']}; only v3.0 is read (convert "
                          "it with LeRobot: python -m lerobot.datasets.v30.convert_dataset_v21_to_v30)")
    check_number(f"{path}: fps", info["fps"], 0, low_open=True)
    if not isinstance(info["features"], dict) or not info["features"]:
        raise SourceError(f"{path}: features: {json.dumps(info['features'])[:40]} is not an object of "
                          "features by name")
    for key in ("video_path", "data_path"):
        if info.get(key) is not None and not isinstance(info[key], str):
            raise SourceError(f"{path}: {key}: {info[key]!r} is not a path template")
    if info.get("robot_type") is not None and not isinstance(info["robot_type"], str):
        raise SourceError(f"{path}: robot_type: {info['robot_type']!r} is not a name")
    return info


def _spec(key: str, spec: Any, where: Path) -> Feature:
    """One entry of info.json's features: SourceError unless it is an object with a dtype name
    and a shape of positive whole numbers."""
    at = f"{where}: features.{key}"
    if not isinstance(spec, dict):
        raise SourceError(f"{at}: {json.dumps(spec)[:40]} is not an object (dtype, shape, names)")
    dtype, shape = spec.get("dtype"), spec.get("shape")
    if not isinstance(dtype, str):
        raise SourceError(f"{at}: dtype {dtype!r} is not a type name")
    if (not isinstance(shape, list) or not shape
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)):
        raise SourceError(f"{at}: shape {shape!r} is not a list of positive whole numbers")
    try:  # the store keeps them: plain JSON
        json.dumps(spec.get("names"), allow_nan=False)
    except ValueError:
        raise SourceError(f"{at}: names {spec.get('names')!r} hold NaN or inf") from None
    return Feature(key, dtype, tuple(shape), spec.get("names"))


def frame_shape(f: Feature, where: Path) -> tuple[int, int, int]:
    """(height, width, 3) of a video feature's frames: its shape, read channels-first where its
    names say so; SourceError for a shape that is not a colour picture's."""
    channels_first = isinstance(f.names, list) and bool(f.names) and str(f.names[0]).startswith("channel")
    if len(f.shape) != 3 or (f.shape[0] if channels_first else f.shape[2]) != 3:
        raise SourceError(f"{where}: features.{f.key}: shape {list(f.shape)}; a video feature's frames are "
                          "[height, width, 3] (colour)")
    return (f.shape[1], f.shape[2], 3) if channels_first else f.shape


def plan_features(info: dict, where: Path) -> Plan:
    """The store's arrays from the dataset's features; SourceError naming a feature the store
    cannot hold (an image-typed, text or many-dimensional observation, a missing action)."""
    feats = {k: _spec(k, v, where) for k, v in info["features"].items()}
    if ACTION not in feats:
        raise SourceError(f"{where}: features has no {ACTION!r} (the actions to learn)")
    obs, videos, skipped = [], [], []
    for key, f in feats.items():
        if key in BOOKKEEPING or key == ACTION:
            continue
        if f.dtype == "video":
            frame_shape(f, where)
            videos.append(f)
        elif key.startswith("observation.") and f.dtype in NUMERIC and len(f.shape) == 1:
            obs.append(f)
        elif key.startswith("observation."):
            raise SourceError(f"{where}: features.{key}: dtype {f.dtype!r} shape {list(f.shape)} is not "
                              "supported (numeric vectors and video are)")
        elif key not in ("next.reward", "next.success", "next.done"):
            skipped.append(key)
    action = feats[ACTION]
    if action.dtype not in NUMERIC or len(action.shape) != 1:
        raise SourceError(f"{where}: features.{ACTION}: dtype {action.dtype!r} shape "
                          f"{list(action.shape)}; actions must be a numeric vector")
    for f in (feats.get("next.reward"), feats.get("next.success")):
        if f is not None and (f.dtype not in NUMERIC or f.width != 1):
            raise SourceError(f"{where}: features.{f.key}: dtype {f.dtype!r} shape {list(f.shape)}; "
                              "one number a frame is read")
    if not obs:
        raise SourceError(f"{where}: features: no numeric observation.* feature to observe")
    return Plan(obs, action, videos, feats.get("next.reward"), feats.get("next.success"), skipped)


def _read_tables(folder: Path, what: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = sorted(folder.glob("chunk-*/file-*.parquet"))
    if not paths:
        raise SourceError(f"{folder}: no {what} (chunk-*/file-*.parquet)")
    try:
        table = pa.concat_tables([pq.read_table(p) for p in paths], promote_options="default")
    except Exception as err:  # pyarrow's ways of saying "not a parquet file"
        raise SourceError(f"{folder}: unreadable {what} ({type(err).__name__}: {err})") from None
    if not table.num_rows:
        raise SourceError(f"{folder}: the {what} has no rows")
    return table


def _column(table, key: str, where: Path) -> np.ndarray:
    """A column of numbers as [rows, width] (a scalar column is 1 wide); SourceError for one
    missing, with empty values, of another type or with rows of different lengths."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if key not in table.column_names:
        raise SourceError(f"{where}: column {key!r} missing")
    col = table.column(key).combine_chunks()
    is_list = pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(
        col.type)
    flat = col.flatten() if is_list else col
    if col.null_count or flat.null_count:
        raise SourceError(f"{where}: column {key!r} has {col.null_count + flat.null_count} empty values")
    if not any(is_(flat.type) for is_ in (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean)):
        raise SourceError(f"{where}: column {key!r} holds {col.type}, not numbers")
    values = flat.to_numpy(zero_copy_only=False)
    if not is_list:
        return values.reshape(-1, 1)
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    if (lengths != lengths[0]).any():
        row = int(np.argmax(lengths != lengths[0]))
        raise SourceError(f"{where}: column {key!r}: rows of different lengths ({lengths[0]} in row 0, "
                          f"{lengths[row]} in row {row})")
    return values.reshape(len(col), int(lengths[0]))


def _first(bad: np.ndarray) -> int:
    return int(np.argwhere(bad)[0][0])


def check_values(values: np.ndarray, f: Feature, where: Path, episode: np.ndarray,
                 limit: float | None = None) -> None:
    """SourceError unless feature `f`'s column (`values`, [rows, width], rows in `index` order)
    is as info.json describes it: `f.width` numbers a row, each finite, held by `f.dtype` without
    loss (any number by a float dtype) and, given `limit`, no larger in magnitude."""
    at = f"{where}: column {f.key!r}"
    if values.shape[1] != f.width:
        raise SourceError(f"{at}: {values.shape[1]} numbers a row, but info.json's shape {list(f.shape)} "
                          f"says {f.width}")
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        bad = ~np.isfinite(values)
        row = _first(bad)
        raise SourceError(f"{at}: {int(bad.sum())} values are NaN or inf (first in row {row}, episode "
                          f"{episode[row]})")
    want = np.dtype(f.dtype)
    if want.kind != "f":
        with np.errstate(invalid="ignore", over="ignore"):
            lost = values.astype(want).astype(values.dtype) != values
        if lost.any():
            row = _first(lost)
            raise SourceError(f"{at}: {values[lost][0]!r} in row {row} does not fit dtype {f.dtype}, which "
                              "info.json gives it")
    if limit is not None and (np.abs(values.astype(np.float64)) > limit).any():
        big = np.abs(values.astype(np.float64)) > limit
        row = _first(big)
        raise SourceError(f"{at}: {float(values[big][0]):g} in row {row} (episode {episode[row]}); values "
                          f"beyond ±{limit:g} are refused (no robot's state or command is that large, and a "
                          "range that wide makes the normalized values and the trained range meaningless)")


def _whole(value: Any, name: str, low: int = 0) -> int:
    """`value` from an episode's metadata as a whole number >= `low`; SourceError otherwise."""
    try:
        check_number(name, value, low, integer=True)
    except UserError as err:
        raise SourceError(str(err)) from None
    return int(value)


def read_episodes(root: Path, n_rows: int) -> list[dict]:
    """The episodes' rows of meta/episodes, in episode order, checked against the data: whole
    numbers, episodes 0..n-1 covering the data's rows one after another."""
    where = root / "meta" / "episodes"
    rows = _read_tables(where, "episode table").to_pylist()
    for i, ep in enumerate(rows):
        for key in ("episode_index", "length", "dataset_from_index", "dataset_to_index"):
            if ep.get(key) is None:
                raise SourceError(f"{where}: episode {i}: no {key!r}")
            ep[key] = _whole(ep[key], f"{where}: row {i}: {key}", 1 if key == "length" else 0)
    rows.sort(key=lambda r: r["episode_index"])
    end = 0
    for i, ep in enumerate(rows):
        span = ep["dataset_to_index"] - ep["dataset_from_index"]
        if ep["episode_index"] != i or span != ep["length"]:
            raise SourceError(f"{where}: episode {ep['episode_index']}: length {ep['length']} but rows "
                              f"{ep['dataset_from_index']}..{ep['dataset_to_index']} (episodes 0..n-1, "
                              "each its rows)")
        if ep["dataset_from_index"] != end:
            raise SourceError(f"{where}: episode {i} starts at row {ep['dataset_from_index']}, not at {end} "
                              "(the episodes cover the data's rows one after another)")
        end = ep["dataset_to_index"]
    if end != n_rows:
        raise SourceError(f"{where}: the episodes end at row {end}, the data has {n_rows} rows")
    return rows


def inside(root: Path, relative: str, what: str) -> Path:
    """`root / relative` for a path that the dataset's own metadata names: SourceError if it leads
    out of `root` (absolute, or more `..` than folders). Judged as written, not resolved: a
    dataset in Hugging Face's cache is symbolic links into the cache's blobs/ folder."""
    norm = os.path.normpath(relative)
    if os.path.isabs(norm) or norm == os.pardir or norm.startswith(os.pardir + os.sep):
        raise SourceError(f"{what} gives {relative!r}, a path outside the dataset's folder")
    return root / norm


def decode_video(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every frame of the mp4 at `path`: (times in seconds, uint8 [n, H, W, 3])."""
    import av

    if not path.is_file():
        raise SourceError(f"{path}: missing (a video feature's file)")
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            times, frames = [], []
            for frame in container.decode(stream):
                times.append(float(frame.pts * stream.time_base))
                frames.append(frame.to_ndarray(format="rgb24"))
    except (av.error.FFmpegError, IndexError, TypeError) as err:  # TypeError: a frame without a time
        raise SourceError(f"{path}: not a readable video ({err})") from None
    if not frames:
        raise SourceError(f"{path}: no frames")
    return np.asarray(times), np.stack(frames)


def episode_frames(video: tuple[np.ndarray, np.ndarray], start: float, n: int, fps: float,
                   where: str) -> np.ndarray:
    """The `n` frames of an episode that starts `start` seconds into the video, one each 1/fps."""
    times, frames = video
    want = start + np.arange(n) / fps
    idx = np.clip(np.searchsorted(times, want - 0.25 / fps), 0, len(times) - 1)
    off = np.abs(times[idx] - want)
    if not (off <= 0.25 / fps).all():
        k = int(np.argmax(~(off <= 0.25 / fps)))
        raise SourceError(f"{where}: no frame at {want[k]:.3f} s (frame {k} of the episode); the video "
                          f"ends at {times[-1]:.3f} s")
    return frames[idx]


class Videos:
    """Decoded video files, each once (several episodes share one)."""

    def __init__(self, root: Path, info: dict):
        self.root, self.info, self.cache = root, info, {}

    def path(self, key: str, chunk: int, file: int) -> Path:
        """The file info.json's `video_path` names, inside the dataset's folder."""
        template = self.info.get("video_path") or VIDEO_PATH
        what = f"{self.root / 'meta' / 'info.json'}: video_path {template!r}"
        try:
            relative = template.format(video_key=key, chunk_index=chunk, file_index=file)
        except (KeyError, IndexError, ValueError, AttributeError, TypeError) as err:
            raise SourceError(f"{what}: {type(err).__name__} {err} (its fields are video_key, chunk_index "
                              "and file_index)") from None
        return inside(self.root, relative, what)

    def frames(self, f: Feature, ep: dict, fps: float) -> np.ndarray:
        """Episode `ep`'s frames of video feature `f`: SourceError unless its file has frames of
        the feature's shape at each of the episode's times."""
        where = f"{self.root / 'meta' / 'episodes'}: episode {ep['episode_index']}"
        span = [ep.get(f"videos/{f.key}/{k}") for k in ("chunk_index", "file_index", "from_timestamp")]
        if any(v is None for v in span):
            raise SourceError(f"{where}: no video span for {f.key}")
        chunk = _whole(span[0], f"{where}: videos/{f.key}/chunk_index")
        file = _whole(span[1], f"{where}: videos/{f.key}/file_index")
        try:
            check_number(f"{where}: videos/{f.key}/from_timestamp", span[2], 0)
        except UserError as err:
            raise SourceError(str(err)) from None
        path = self.path(f.key, chunk, file)
        if path not in self.cache:
            self.cache = {path: decode_video(path)}  # episodes come in file order: keep one file
            shape = self.cache[path][1].shape[1:]
            if shape != frame_shape(f, self.root / "meta" / "info.json"):
                raise SourceError(f"{path}: frames of {shape[0]}x{shape[1]} pixels, but info.json's "
                                  f"{f.key} has shape {list(f.shape)}")
        return episode_frames(self.cache[path], span[2], ep["length"], fps, f"{path} ({where})")


def _episode(data: dict[str, np.ndarray], ep: dict, plan: Plan) -> dict[str, np.ndarray]:
    rows = slice(ep["dataset_from_index"], ep["dataset_to_index"])
    n = ep["length"]
    obs = np.concatenate([data[f.key][rows] for f in plan.obs], axis=1)
    success = (data[plan.success.key][rows].reshape(n).astype(bool) if plan.success is not None
               else np.arange(n) == n - 1)
    reward = data[plan.reward.key][rows].reshape(n) if plan.reward is not None else np.zeros(n)
    return {"obs": obs.astype(np.float32), "action": data[plan.action.key][rows],
            "state": np.zeros((n, 0)), "reward": reward, "success": success}


def read_data(root: Path, plan: Plan) -> dict[str, np.ndarray]:
    """The data's columns the store needs, in `index` order, checked against info.json (see
    `check_values`; observations and actions no larger than MAX_ABS, success 0 or 1)."""
    where = root / "data"
    table = _read_tables(where, "data")
    keys = [f.key for f in plan.obs] + [plan.action.key, "episode_index", "index"]
    keys += [f.key for f in (plan.reward, plan.success) if f is not None]
    keys += ["timestamp"] if "timestamp" in table.column_names else []
    data = {k: _column(table, k, where) for k in keys}
    for key in ("episode_index", "index"):
        if data[key].dtype.kind not in "iu" or data[key].shape[1] != 1:
            raise SourceError(f"{where}: column {key!r}: {data[key].dtype}, {data[key].shape[1]} a row; "
                              "one whole number a row expected")
        data[key] = data[key][:, 0]
    order = np.argsort(data["index"], kind="stable")
    data = {k: v[order] for k, v in data.items()}
    if (data["index"] != np.arange(len(order))).any():
        raise SourceError(f"{where}: column 'index' is not 0..{len(order) - 1}, one row a frame")
    episode = data["episode_index"]
    for f in [*plan.obs, plan.action]:
        check_values(data[f.key], f, where, episode, MAX_ABS)
    for f in (plan.reward, plan.success):
        if f is not None:
            check_values(data[f.key], f, where, episode)
    if plan.success is not None and not np.isin(data[plan.success.key], (0, 1)).all():
        raise SourceError(f"{where}: column {plan.success.key!r}: values other than 0 and 1")
    if "timestamp" in data:
        check_values(data["timestamp"], Feature("timestamp", "float64", (1,)), where, episode)
    return data


def check_timestamps(data: dict[str, np.ndarray], ep: dict, fps: float, where: Path) -> None:
    """SourceError unless the episode's `timestamp`s (where the data has them) are its frames'
    times, one each 1/fps from 0, as LeRobot records them: its video frames are found by time."""
    if "timestamp" not in data:
        return
    times = data["timestamp"][ep["dataset_from_index"]:ep["dataset_to_index"], 0]
    off = np.abs(times - np.arange(ep["length"]) / fps)
    if (off > 0.25 / fps).any():
        k = int(np.argmax(off > 0.25 / fps))
        raise SourceError(f"{where}: column 'timestamp': {times[k]:g} s at frame {k} of episode "
                          f"{ep['episode_index']}, which at {fps:g} fps is at {k / fps:g} s")


def read_lerobot(root: str | os.PathLike) -> tuple[list[dict], dict]:
    """The episodes (store arrays) and store attributes of the LeRobotDataset at `root`."""
    require()
    root = Path(root)
    info = read_info(root)
    plan = plan_features(info, root / "meta" / "info.json")
    data = read_data(root, plan)
    episodes_meta = read_episodes(root, len(data["index"]))
    fps = info["fps"]
    videos = Videos(root, info)
    episodes = []
    for ep in episodes_meta:
        rows = data["episode_index"][ep["dataset_from_index"]:ep["dataset_to_index"]]
        if (rows != ep["episode_index"]).any():
            raise SourceError(f"{root / 'data'}: rows {ep['dataset_from_index']}..{ep['dataset_to_index']} "
                              f"are not all episode {ep['episode_index']}, as meta/episodes says")
        check_timestamps(data, ep, fps, root / "data")
        arrays = _episode(data, ep, plan)
        for f in plan.videos:
            arrays[f"{camera_name(f.key)}_image"] = videos.frames(f, ep, fps)
        episodes.append(arrays)
    return episodes, _attrs(root, info, plan, episodes_meta)


def _tasks(ep: dict) -> list[str]:
    tasks = ep.get("tasks")
    if isinstance(tasks, str):
        return [tasks]
    return [str(t) for t in tasks] if isinstance(tasks, (list, tuple)) else []


def _attrs(root: Path, info: dict, plan: Plan, episodes_meta: list[dict]) -> dict:
    return {
        "task": EXTERNAL,
        "obs_layout": plan.obs_layout(),
        "lerobot": {
            "source": str(root.resolve()), "codebase_version": info["codebase_version"],
            "robot_type": info.get("robot_type"), "fps": info["fps"],
            "obs": [f.key for f in plan.obs], "action": plan.action.key,
            "features": {f.key: f.describe() for f in [*plan.obs, plan.action, *plan.videos]},
            "cameras": {camera_name(f.key): f.key for f in plan.videos},
            "reward": plan.reward.key if plan.reward else None,
            "success_source": plan.success.key if plan.success else "the last frame of each episode",
            "episode_tasks": [_tasks(ep) for ep in episodes_meta],
            "skipped": plan.skipped,
        },
    }


def import_lerobot(root: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the LeRobotDataset at `root` as a store at `out` (atomically)."""
    out = check_destination(out, overwrite)
    episodes, attrs = read_lerobot(root)
    return write_store(out, episodes, attrs, overwrite=overwrite)


# -- writing ------------------------------------------------------------------------------------

ROBOSUITE_ACTION = ["x", "y", "z", "roll", "pitch", "yaw", "gripper"]  # OSC_POSE deltas, then the gripper


def _names(layout: dict[str, list[int]]) -> list[str]:
    return [k if b - a == 1 else f"{k}_{i}" for k, (a, b) in layout.items() for i in range(b - a)]


def imported(store) -> dict:
    """What an imported store records of its dataset (`attrs["lerobot"]`), {} for another store;
    UserError if it is not an object with an object of features."""
    lerobot = store.attrs.get("lerobot")
    if lerobot is None:
        return {}
    if not isinstance(lerobot, dict) or not isinstance(lerobot.get("features"), dict):
        raise UserError(f"{store.path}: attrs.lerobot: not an object with the dataset's features (an "
                        "imported store records them)")
    return lerobot


def _layout(store, width: int) -> dict[str, list[int]]:
    """The store's `obs_layout` (the whole vector as `obs` where it has none), checked: spans of
    its `width` columns, and for an imported store the features its attributes describe."""
    layout = store.attrs.get("obs_layout") or {"obs": [0, width]}
    where = f"{store.path}: attrs.obs_layout"
    if not isinstance(layout, dict):
        raise UserError(f"{where}: {layout!r} is not an object of spans by name")
    for key, span in layout.items():
        if not (isinstance(span, list) and len(span) == 2 and all(type(v) is int for v in span)
                and 0 <= span[0] < span[1] <= width):
            raise UserError(f"{where}.{key}: {span!r} is not a span [start, stop] of the {width} columns of "
                            "data/obs")
    lerobot = imported(store)
    for key in layout if lerobot else ():
        spec = lerobot["features"].get(key)
        if not isinstance(spec, dict) or spec.get("dtype") not in NUMERIC:
            raise UserError(f"{store.path}: attrs.lerobot.features.{key}: {spec!r}; a numeric feature "
                            "(dtype, names) expected for the observation part of that name")
    return layout


def _as_dtype(values: np.ndarray, dtype: str, where: str) -> np.ndarray:
    """`values` as `dtype` (a feature's recorded dtype); UserError rather than truncate a value
    that dtype does not hold (0.5 as an int8)."""
    cast = values.astype(dtype)
    if np.dtype(dtype).kind != "f" and (cast.astype(values.dtype) != values).any():
        bad = values[cast.astype(values.dtype) != values][0]
        raise UserError(f"{where}: {bad!r} does not fit dtype {dtype}, which the store records for it")
    return cast


def _obs_columns(store, obs: np.ndarray) -> list[Feature]:
    """The observation vector split back into features: an imported store's own, or a robosuite
    store's object part (`observation.environment_state`) and proprioception (`observation.state`)."""
    layout = _layout(store, obs.shape[1])
    lerobot = imported(store)
    if lerobot:
        feats = lerobot["features"]
        return [Feature.of(k, _as_dtype(obs[:, a:b], feats[k]["dtype"], f"{store.path}: data/obs ({k})"),
                           feats[k]["dtype"], feats[k].get("names"))
                for k, (a, b) in layout.items()]
    groups: dict[str, dict[str, list[int]]] = {}
    for key, span in layout.items():
        feature = "observation.environment_state" if key == "object" else "observation.state"
        groups.setdefault(feature, {})[key] = span
    columns = []
    for feature, spans in groups.items():
        cols = np.concatenate([np.arange(a, b) for a, b in spans.values()])
        columns.append(Feature.of(feature, obs[:, cols], "float32", _names(spans)))
    return columns


def _finite(store, key: str) -> np.ndarray:
    """data/`key` as float32; UserError naming it if a value is NaN or inf (a diffusion_policy
    store is written by other code than ours)."""
    values = np.asarray(store[key], dtype=np.float32)
    if not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).sum())
        raise UserError(f"{store.path}: data/{key}: {bad} values are NaN or inf")
    return values


def _columns(store) -> tuple[list[Feature], list[list[str]]]:
    """Every feature to write, and each episode's task strings."""
    action = _finite(store, "action").reshape(store.n_steps, -1)
    lerobot = imported(store)
    spec = lerobot.get("features", {}).get(ACTION)
    names = ((spec.get("names") if isinstance(spec, dict) else None)
             or (ROBOSUITE_ACTION if action.shape[1] == 7 and not lerobot else None))
    ends = store.episode_ends
    done = np.zeros(len(action), dtype=bool)
    done[ends - 1] = True
    columns = [*_obs_columns(store, _finite(store, "obs").reshape(store.n_steps, -1)),
               Feature.of(ACTION, action, "float32", names),
               Feature.of("next.reward", _finite(store, "reward").reshape(-1), "float32"),
               Feature.of("next.done", done, "bool"),
               Feature.of("next.success", np.asarray(store["success"], dtype=bool).reshape(-1), "bool")]
    cameras = lerobot.get("cameras") or {}
    for key in (k for k in store.keys if k.endswith("_image")):
        frames = store[key]
        if frames.dtype != np.uint8 or frames.ndim != 4:
            continue  # not camera frames
        if frames.shape[-1] != 3:
            raise UserError(f"{store.path}: data/{key}: frames of shape {list(frames.shape[1:])}; a video is "
                            "written from colour frames [height, width, 3]")
        camera = key[: -len("_image")]
        columns.append(Feature.of(cameras.get(camera, IMAGE_PREFIX + camera), frames, "video"))
    tasks = lerobot.get("episode_tasks") or [[store.task or "task"]] * len(ends)
    if not isinstance(tasks, list) or len(tasks) != len(ends):
        raise UserError(f"{store.path}: attrs.lerobot.episode_tasks: not one list of tasks per episode "
                        f"({len(ends)} episodes)")
    return columns, [[str(x) for x in t] or ["task"] if isinstance(t, list) else [str(t)] for t in tasks]


def _stats(values: np.ndarray, video: bool) -> dict:
    """LeRobot's per-feature statistics: per channel over all pixels (in [0, 1]) for video, per
    dimension otherwise."""
    x = values.astype(np.float64)
    if video:
        x = x.reshape(-1, x.shape[-1]) / 255.0
    elif x.ndim == 1:
        x = x[:, None]
    stats = {"min": x.min(0), "max": x.max(0), "mean": x.mean(0), "std": x.std(0),
             "count": np.array([len(values)])}
    stats.update({f"q{round(q * 100):02d}": np.quantile(x, q, axis=0) for q in QUANTILES})
    shape = (-1, 1, 1) if video else (-1,)
    return {k: (v if k == "count" else v.reshape(shape)).tolist() for k, v in stats.items()}


def encode_video(path: Path, frames, fps: float) -> None:
    """h264 (yuv420p, a keyframe every 2 frames, as LeRobot records), one frame each 1/fps."""
    import av

    n, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise UserError(f"{path.name}: frames of {h}x{w} pixels; h264 video needs even sizes")
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        rate = Fraction(fps).limit_denominator(1001)  # a whole rate, or a fractional one such as 29.97
        stream = container.add_stream("libx264", rate=rate, options={"crf": str(CRF), "g": "2"})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(0, n, 256):  # a store's frames are read a block at a time
            for img in np.asarray(frames[i:i + 256]):
                container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        container.mux(stream.encode())


def _arrow_column(column: Feature):
    import pyarrow as pa

    values = np.asarray(column.values)
    if column.shape == (1,):
        return pa.array(values.reshape(-1))
    width = int(np.prod(column.shape))
    return pa.ListArray.from_arrays(pa.array(np.arange(0, len(values) * width + 1, width, dtype=np.int32)),
                                    pa.array(values.reshape(-1)))


def _write_data(dest: Path, columns: list[Feature], ends: np.ndarray, fps: float,
                task_index: np.ndarray) -> None:
    """data/chunk-000/file-000.parquet: every frame's features and LeRobot's bookkeeping columns
    (`task_index`: each episode's, per frame)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = int(ends[-1])
    starts = np.concatenate([[0], ends[:-1]])
    episode = np.repeat(np.arange(len(ends)), ends - starts)
    frame = np.arange(n) - starts[episode]
    table = {c.key: _arrow_column(c) for c in columns if c.dtype != "video"}
    table.update({"timestamp": pa.array((frame / fps).astype(np.float32)), "frame_index": pa.array(frame),
                  "episode_index": pa.array(episode), "index": pa.array(np.arange(n)),
                  "task_index": pa.array(task_index[episode])})
    path = dest / DATA_FILE
    path.parent.mkdir(parents=True)
    pq.write_table(pa.table(table), path)


def _write_tasks(dest: Path, unique: list[str]) -> None:
    """meta/tasks.parquet: a pandas frame indexed by the task string, as LeRobot reads it (pandas
    itself is not needed to write one: its schema metadata says which column is the index)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pandas = {"index_columns": ["__index_level_0__"], "column_indexes": [], "columns": [
        {"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64",
         "metadata": None},
        {"name": None, "field_name": "__index_level_0__", "pandas_type": "unicode", "numpy_type": "object",
         "metadata": None}], "attributes": {}, "creator": {"library": "pyarrow", "version": pa.__version__}}
    table = pa.table({"task_index": pa.array(np.arange(len(unique))), "__index_level_0__": pa.array(unique)})
    table = table.replace_schema_metadata({"pandas": json.dumps(pandas)})
    (dest / "meta").mkdir(exist_ok=True)
    pq.write_table(table, dest / "meta" / "tasks.parquet")


def _write_episodes(dest: Path, columns: list[Feature], tasks: list[list[str]], ends: np.ndarray,
                    fps: float) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    starts = np.concatenate([[0], ends[:-1]])
    n = len(ends)
    table = {"episode_index": np.arange(n), "tasks": pa.array(tasks), "length": ends - starts,
             "data/chunk_index": np.zeros(n, np.int64), "data/file_index": np.zeros(n, np.int64),
             "dataset_from_index": starts, "dataset_to_index": ends}
    for c in (c for c in columns if c.dtype == "video"):
        table.update({f"videos/{c.key}/chunk_index": np.zeros(n, np.int64),
                      f"videos/{c.key}/file_index": np.zeros(n, np.int64),
                      f"videos/{c.key}/from_timestamp": starts / fps,
                      f"videos/{c.key}/to_timestamp": ends / fps})
    table.update({"meta/episodes/chunk_index": np.zeros(n, np.int64),
                  "meta/episodes/file_index": np.zeros(n, np.int64)})
    path = dest / EPISODES_FILE
    path.parent.mkdir(parents=True)
    pq.write_table(pa.table({k: pa.array(v) if isinstance(v, np.ndarray) else v
                             for k, v in table.items()}), path)


def _info(columns: list[Feature], n_frames: int, n_episodes: int, n_tasks: int, fps: float,
          robot_type: str | None) -> dict:
    bookkeeping = {k: {"dtype": "float32" if k == "timestamp" else "int64", "shape": [1], "names": None}
                   for k in BOOKKEEPING}
    return {"codebase_version": CODEBASE_VERSION, "robot_type": robot_type, "total_episodes": n_episodes,
            "total_frames": n_frames, "total_tasks": n_tasks, "chunks_size": 1000,
            "data_files_size_in_mb": 100, "video_files_size_in_mb": 200, "fps": fps,
            "splits": {"train": f"0:{n_episodes}"}, "data_path": DATA_PATH,
            "video_path": VIDEO_PATH if any(c.dtype == "video" for c in columns) else None,
            "features": {**{c.key: c.describe(fps) for c in columns}, **bookkeeping}}


def _fps(store) -> int | float:
    """The rate to write: an imported dataset's fps, a robosuite store's control rate, or 20 (the
    robosuite tasks' rate) where the store records neither; UserError unless positive and finite."""
    lerobot, env = imported(store), store.attrs.get("env") or {}
    fps, name = lerobot.get("fps"), "attrs.lerobot.fps"
    if fps is None:
        fps, name = env.get("control_freq"), "attrs.env.control_freq"
    if fps is None:
        return 20
    check_number(f"{store.path}: {name}", fps, 0, low_open=True)
    return int(fps) if float(fps).is_integer() else float(fps)


# What a LeRobotDataset folder holds: LeRobot's own folders and what the Hugging Face Hub adds
# (a dataset card, git's attributes, huggingface_hub's download cache).
DATASET_ENTRIES = {"meta", "data", "videos", "images", "README.md", ".gitattributes", ".cache"}


def _not_a_dataset(path: Path) -> str | None:
    """Why `path` is not a LeRobotDataset as LeRobot (or this module) writes one, or None."""
    if path.is_symlink():
        return "a symbolic link"
    if not path.is_dir():
        return "not a folder"
    try:
        info = json.loads((path / "meta" / "info.json").read_text())
    except (OSError, ValueError):
        return "no readable meta/info.json"
    if (not isinstance(info, dict) or not str(info.get("codebase_version", "")).startswith("v")
            or "fps" not in info or not isinstance(info.get("features"), dict) or not info["features"]):
        return "its meta/info.json has no codebase_version, fps and features"
    others = sorted(p.name for p in path.iterdir() if p.name not in DATASET_ENTRIES)
    if others:
        return f"it also holds {', '.join(others[:3])}{' and more' if len(others) > 3 else ''}"
    return None


def check_lerobot_destination(out: Path, overwrite: bool) -> None:
    """Refuse to write over anything but a LeRobotDataset, and over one without `overwrite`. A
    folder counts as one only as it is written: an info.json of LeRobot's (codebase_version, fps,
    features) and nothing beside a dataset's own entries, so a user's folder that merely holds a
    meta/info.json is never deleted."""
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise UserError(f"{out}: already exists; pass overwrite=true to replace it")
    why = _not_a_dataset(out)
    if why:
        raise UserError(f"{out}: not a LeRobotDataset ({why}); overwrite=true replaces only one, so remove "
                        "it yourself or choose another path")


def _write(dest: Path, store) -> None:
    """The whole dataset of `store` in the (empty) folder `dest`."""
    if store.n_episodes == 0:
        raise UserError(f"{store.path}: no episodes to export")
    columns, tasks = _columns(store)
    ends, fps = np.asarray(store.episode_ends), _fps(store)
    unique = list(dict.fromkeys(t[0] for t in tasks))
    _write_data(dest, columns, ends, fps, np.array([unique.index(t[0]) for t in tasks]))
    _write_tasks(dest, unique)
    _write_episodes(dest, columns, tasks, ends, fps)
    for c in (c for c in columns if c.dtype == "video"):
        encode_video(dest / VIDEO_FILE.format(key=c.key), c.values, fps)
    stats = {c.key: _stats(np.asarray(c.values), c.dtype == "video") for c in columns}
    robot = (imported(store).get("robot_type")
             or (store.attrs.get("env") or {}).get("robots"))
    info = _info(columns, int(ends[-1]), len(ends), len(unique), fps, robot)
    (dest / "meta" / "info.json").write_text(json.dumps(info, indent=2))
    (dest / "meta" / "stats.json").write_text(json.dumps(stats, indent=2))


def export_lerobot(store_path: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the store at `store_path` as a LeRobotDataset v3.0 folder `out`, atomically: built in
    a hidden partial folder beside it (one a killed export left is removed first) and renamed
    into place when complete. `out` is checked when the export starts and again just before the
    rename, so of two exports to one new `out` without `overwrite` the later one fails; a
    replaced dataset is deleted only once the new one is in place (`common.files.building`)."""
    require()
    out = Path(out)
    remove_stale_partials(out.parent, out.name)  # first: it may put back a dataset a kill moved aside
    check_lerobot_destination(out, overwrite)
    with open_store(store_path) as store:
        made = [d for d in [out.parent.absolute(), *out.parent.absolute().parents] if not d.exists()]
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            with building(out) as dest:
                _write(dest, store)
                check_lerobot_destination(out, overwrite)  # another export may have finished meanwhile
        except BaseException:
            for d in made:  # the folders made for `out`, deepest first, while empty
                with contextlib.suppress(OSError):
                    d.rmdir()
            raise
    return out


# -- command line -------------------------------------------------------------------------------

@dataclass
class ExportLeRobotConfig:
    store: str = "???"  # the demonstration store to export
    out: str = "???"  # the LeRobotDataset folder to write
    overwrite: bool = False  # replace a LeRobotDataset at `out` (only once the new one is complete)


def _run(cfg: ExportLeRobotConfig) -> None:
    try:
        out = export_lerobot(cfg.store, cfg.out, overwrite=cfg.overwrite)
    except OSError as err:  # permissions, a full disk, ...: a file problem, not a bug
        raise UserError(f"{err.filename or cfg.out}: {err.strerror or err}") from err
    info = json.loads((out / "meta" / "info.json").read_text())
    print(f"wrote {out}: LeRobotDataset {info['codebase_version']}, {info['total_episodes']} episodes, "
          f"{info['total_frames']} frames at {info['fps']} fps, features {', '.join(info['features'])}")


def main() -> None:
    from common.cli import command

    command("export-lerobot", ExportLeRobotConfig)(_run)()
