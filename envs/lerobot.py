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

Written by hand, on the libraries LeRobot itself uses for the format (pyarrow for the tables,
PyAV for the video), because LeRobot's own package (lerobot 0.4.4, the newest the registry
serves) pins torch < 2.11 and cannot be installed beside this project's torch. The reader is
tested on datasets LeRobot wrote (tests/fixtures/lerobot), the writer by LeRobot's loader.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import UserError
from common.files import building
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
    path = root / "meta" / "info.json"
    if not path.is_file():
        raise SourceError(f"{root}: not a LeRobotDataset (no meta/info.json)")
    try:
        info = json.loads(path.read_text())
    except ValueError as err:
        raise SourceError(f"{path}: not JSON ({err})") from None
    for key in ("codebase_version", "fps", "features"):
        if key not in info:
            raise SourceError(f"{path}: no {key!r}")
    if not str(info["codebase_version"]).startswith("v3"):
        raise SourceError(f"{path}: codebase_version {info['codebase_version']}; only v3.0 is read (convert "
                          "it with LeRobot: python -m lerobot.datasets.v30.convert_dataset_v21_to_v30)")
    return info


def plan_features(info: dict, where: Path) -> Plan:
    """The store's arrays from the dataset's features; SourceError naming a feature the store
    cannot hold (an image-typed, text or many-dimensional observation, a missing action)."""
    feats = {k: Feature(k, v.get("dtype"), tuple(v.get("shape", ())), v.get("names"))
             for k, v in info["features"].items()}
    if ACTION not in feats:
        raise SourceError(f"{where}: features has no {ACTION!r} (the actions to learn)")
    obs, videos, skipped = [], [], []
    for key, f in feats.items():
        if key in BOOKKEEPING or key == ACTION:
            continue
        if f.dtype == "video":
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
        return pa.concat_tables([pq.read_table(p) for p in paths], promote_options="default")
    except Exception as err:  # pyarrow's ways of saying "not a parquet file"
        raise SourceError(f"{folder}: unreadable {what} ({type(err).__name__}: {err})") from None


def _column(table, key: str, where: Path) -> np.ndarray:
    """A column as an array: [rows] for scalars, [rows, width] for a list column."""
    import pyarrow as pa

    if key not in table.column_names:
        raise SourceError(f"{where}: column {key!r} missing")
    col = table.column(key).combine_chunks()
    if col.null_count:
        raise SourceError(f"{where}: column {key!r} has {col.null_count} empty values")
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)
            or pa.types.is_fixed_size_list(col.type)):
        return col.to_numpy(zero_copy_only=False)
    values = col.flatten().to_numpy(zero_copy_only=False)
    if len(col) and len(values) % len(col):
        raise SourceError(f"{where}: column {key!r}: rows of different lengths")
    return values.reshape(len(col), -1)


def read_episodes(root: Path, n_rows: int) -> list[dict]:
    """The episodes' rows of meta/episodes, in episode order, checked against the data."""
    table = _read_tables(root / "meta" / "episodes", "episode table")
    where = root / "meta" / "episodes"
    rows = sorted(table.to_pylist(), key=lambda r: r.get("episode_index", -1))
    for i, ep in enumerate(rows):
        for key in ("episode_index", "length", "dataset_from_index", "dataset_to_index"):
            if ep.get(key) is None:
                raise SourceError(f"{where}: episode {i}: no {key!r}")
        span = ep["dataset_to_index"] - ep["dataset_from_index"]
        if ep["episode_index"] != i or span != ep["length"] or span < 1:
            raise SourceError(f"{where}: episode {ep['episode_index']}: length {ep['length']} but rows "
                              f"{ep['dataset_from_index']}..{ep['dataset_to_index']} (episodes 0..n-1, "
                              "each its rows)")
    if not rows or rows[-1]["dataset_to_index"] > n_rows:
        raise SourceError(f"{where}: the episodes end at row {rows[-1]['dataset_to_index'] if rows else 0}, "
                          f"the data has {n_rows} rows")
    return rows


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
    except (av.error.FFmpegError, IndexError) as err:
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
    if (off > 0.25 / fps).any():
        k = int(np.argmax(off > 0.25 / fps))
        raise SourceError(f"{where}: no frame at {want[k]:.3f} s (frame {k} of the episode); the video "
                          f"ends at {times[-1]:.3f} s")
    return frames[idx]


class Videos:
    """Decoded video files, each once (several episodes share one)."""

    def __init__(self, root: Path, info: dict):
        self.root, self.info, self.cache = root, info, {}

    def frames(self, key: str, ep: dict, fps: float) -> np.ndarray:
        chunk, file = ep.get(f"videos/{key}/chunk_index"), ep.get(f"videos/{key}/file_index")
        start = ep.get(f"videos/{key}/from_timestamp")
        if None in (chunk, file, start):
            raise SourceError(f"{self.root / 'meta' / 'episodes'}: episode {ep['episode_index']}: no video "
                              f"span for {key}")
        template = self.info.get("video_path") or VIDEO_PATH
        path = self.root / template.format(video_key=key, chunk_index=chunk, file_index=file)
        if path not in self.cache:
            self.cache = {path: decode_video(path)}  # episodes come in file order: keep one file
        where = f"{path} (episode {ep['episode_index']})"
        return episode_frames(self.cache[path], start, ep["length"], fps, where)


def _episode(data: dict[str, np.ndarray], ep: dict, plan: Plan) -> dict[str, np.ndarray]:
    rows = slice(ep["dataset_from_index"], ep["dataset_to_index"])
    n = ep["length"]
    obs = np.concatenate([data[f.key][rows].reshape(n, -1) for f in plan.obs], axis=1)
    success = (data[plan.success.key][rows].reshape(n).astype(bool) if plan.success is not None
               else np.arange(n) == n - 1)
    reward = data[plan.reward.key][rows].reshape(n) if plan.reward is not None else np.zeros(n)
    return {"obs": obs.astype(np.float32), "action": data[plan.action.key][rows].reshape(n, -1),
            "state": np.zeros((n, 0)), "reward": reward, "success": success}


def read_lerobot(root: str | os.PathLike) -> tuple[list[dict], dict]:
    """The episodes (store arrays) and store attributes of the LeRobotDataset at `root`."""
    require()
    root = Path(root)
    info = read_info(root)
    plan = plan_features(info, root / "meta" / "info.json")
    table = _read_tables(root / "data", "data")
    keys = [f.key for f in plan.obs] + [plan.action.key, "episode_index", "index"]
    keys += [f.key for f in (plan.reward, plan.success) if f is not None]
    data = {k: _column(table, k, root / "data") for k in keys}
    order = np.argsort(data["index"], kind="stable")
    data = {k: v[order] for k, v in data.items()}
    if (data["index"] != np.arange(len(order))).any():
        raise SourceError(f"{root / 'data'}: column 'index' is not 0..{len(order) - 1}, one row a frame")
    episodes_meta = read_episodes(root, len(order))
    fps = float(info["fps"])
    videos = Videos(root, info)
    episodes = []
    for ep in episodes_meta:
        rows = data["episode_index"][ep["dataset_from_index"]:ep["dataset_to_index"]]
        if (rows != ep["episode_index"]).any():
            raise SourceError(f"{root / 'data'}: rows {ep['dataset_from_index']}..{ep['dataset_to_index']} "
                              f"are not all episode {ep['episode_index']}, as meta/episodes says")
        arrays = _episode(data, ep, plan)
        for f in plan.videos:
            arrays[f"{camera_name(f.key)}_image"] = videos.frames(f.key, ep, fps)
        episodes.append(arrays)
    return episodes, _attrs(root, info, plan, episodes_meta)


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
            "episode_tasks": [list(ep.get("tasks") or []) for ep in episodes_meta],
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


def _obs_columns(store) -> list[Feature]:
    """The observation vector split back into features: an imported store's own, or a robosuite
    store's object part (`observation.environment_state`) and proprioception (`observation.state`)."""
    obs = np.asarray(store["obs"], dtype=np.float32)
    layout = store.attrs.get("obs_layout") or {"obs": [0, obs.shape[1]]}
    lerobot = store.attrs.get("lerobot")
    if lerobot:
        feats = lerobot["features"]
        return [Feature.of(k, obs[:, a:b].astype(feats[k]["dtype"]), feats[k]["dtype"], feats[k].get("names"))
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


def _columns(store) -> tuple[list[Feature], list[list[str]]]:
    """Every feature to write, and each episode's task strings."""
    action = np.asarray(store["action"], dtype=np.float32)
    lerobot = store.attrs.get("lerobot") or {}
    names = (lerobot.get("features", {}).get(ACTION, {}).get("names")
             or (ROBOSUITE_ACTION if action.shape[1] == 7 and not lerobot else None))
    ends = store.episode_ends
    done = np.zeros(len(action), dtype=bool)
    done[ends - 1] = True
    columns = [*_obs_columns(store), Feature.of(ACTION, action, "float32", names),
               Feature.of("next.reward", np.asarray(store["reward"], dtype=np.float32), "float32"),
               Feature.of("next.done", done, "bool"),
               Feature.of("next.success", np.asarray(store["success"], dtype=bool), "bool")]
    cameras = lerobot.get("cameras") or {}
    for key in store.keys:
        if key.endswith("_image") and np.dtype(store[key].dtype) == np.uint8 and len(store[key].shape) == 4:
            camera = key[: -len("_image")]
            columns.append(Feature.of(cameras.get(camera, IMAGE_PREFIX + camera), store[key], "video"))
    tasks = lerobot.get("episode_tasks") or [[store.task or "task"]] * len(ends)
    return columns, [list(t) or ["task"] for t in tasks]


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


def encode_video(path: Path, frames, fps: int) -> None:
    """h264 (yuv420p, a keyframe every 2 frames, as LeRobot records), one frame each 1/fps."""
    import av

    n, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise UserError(f"{path.name}: frames of {h}x{w} pixels; h264 video needs even sizes")
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": str(CRF), "g": "2"})
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


def _write_data(dest: Path, columns: list[Feature], ends: np.ndarray, fps: int,
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
                    fps: int) -> None:
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


def _info(columns: list[Feature], n_frames: int, n_episodes: int, n_tasks: int, fps: int,
          robot_type: str | None) -> dict:
    bookkeeping = {k: {"dtype": "float32" if k == "timestamp" else "int64", "shape": [1], "names": None}
                   for k in BOOKKEEPING}
    return {"codebase_version": CODEBASE_VERSION, "robot_type": robot_type, "total_episodes": n_episodes,
            "total_frames": n_frames, "total_tasks": n_tasks, "chunks_size": 1000,
            "data_files_size_in_mb": 100, "video_files_size_in_mb": 200, "fps": fps,
            "splits": {"train": f"0:{n_episodes}"}, "data_path": DATA_PATH,
            "video_path": VIDEO_PATH if any(c.dtype == "video" for c in columns) else None,
            "features": {**{c.key: c.describe(fps) for c in columns}, **bookkeeping}}


def _fps(store) -> int:
    lerobot = store.attrs.get("lerobot") or {}
    return int(lerobot.get("fps") or (store.attrs.get("env") or {}).get("control_freq") or 20)


def check_lerobot_destination(out: Path, overwrite: bool) -> None:
    """Refuse to write over anything but a LeRobotDataset, and over one without `overwrite`."""
    if out.exists():
        if not overwrite:
            raise UserError(f"{out}: already exists; pass overwrite=true to replace it")
        if not (out / "meta" / "info.json").is_file():
            raise UserError(f"{out}: not a LeRobotDataset (no meta/info.json); overwrite=true replaces only "
                            "one, so remove it yourself or choose another path")


def export_lerobot(store_path: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the store at `store_path` as a LeRobotDataset v3.0 folder `out` (atomically: built
    beside it and renamed into place when complete)."""
    require()
    out = Path(out)
    check_lerobot_destination(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open_store(store_path) as store, building(out) as dest:
        columns, tasks = _columns(store)
        ends, fps = np.asarray(store.episode_ends), _fps(store)
        unique = list(dict.fromkeys(t[0] for t in tasks))
        _write_data(dest, columns, ends, fps, np.array([unique.index(t[0]) for t in tasks]))
        _write_tasks(dest, unique)
        _write_episodes(dest, columns, tasks, ends, fps)
        for c in (c for c in columns if c.dtype == "video"):
            encode_video(dest / VIDEO_FILE.format(key=c.key), c.values, fps)
        stats = {c.key: _stats(np.asarray(c.values), c.dtype == "video") for c in columns}
        robot = ((store.attrs.get("lerobot") or {}).get("robot_type")
                 or (store.attrs.get("env") or {}).get("robots"))
        info = _info(columns, int(ends[-1]), len(ends), len(unique), fps, robot)
        (dest / "meta" / "info.json").write_text(json.dumps(info, indent=2))
        (dest / "meta" / "stats.json").write_text(json.dumps(stats, indent=2))
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
