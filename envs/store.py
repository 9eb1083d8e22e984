"""The demonstration store: diffusion_policy's replay-buffer layout in a zarr group.

    data/<key>           arrays concatenated over episodes along the first (time) axis
    meta/episode_ends    int64 [n_episodes], cumulative: episode i is rows ends[i-1]:ends[i]
    meta/<name>          int64 [n_episodes], optional: who demonstrated each episode and how
                         (mixed-proficiency sets: operator, proficiency, strategy, decision_step;
                         attrs["episode_meta"][name] names the codes, as robomimic's filter keys)
    root attributes      how the demonstrations were made (task, env settings, seeds, ...) plus
                         format="parapolicy-replay-buffer" and format_version

A parapolicy store has at least `obs` float32 [N, obs_dim], `action` float32 [N, 7],
`state` float64 [N, S] (flattened MuJoCo states), `reward` float32 [N] and `success` bool [N].

`write_store` writes zarr v3, as a directory or, for a path ending in `.zip`, one zip file.
`open_store` reads zarr v3 and v2 (diffusion_policy's own replay buffers included), each as a
directory or a `.zip` file. Nothing here imports the simulator.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.storage import LocalStore, ZipStore

from common.closing import Closeable
from common.errors import UserError
from common.files import make_partial, remove_stale_partials, replace_into, unwritable
from envs.errors import StoreError
from envs.tasks import ObsConfig

FORMAT = "parapolicy-replay-buffer"
FORMAT_VERSION = 1

REQUIRED_KEYS: tuple[str, ...] = ("obs", "action", "state", "reward", "success")
# Keys with a fixed dtype: values are converted on write. Other keys keep the dtype they come with.
DTYPES: dict[str, np.dtype] = {
    "obs": np.dtype(np.float32),
    "action": np.dtype(np.float32),
    "state": np.dtype(np.float64),
    "reward": np.dtype(np.float32),
    "success": np.dtype(np.bool_),
}

# Chunks hold whole time steps, about this many uncompressed bytes each; a pure function of an
# array's shape and dtype, so the same data always gives the same files.
CHUNK_BYTES = 1 << 20
# Fixed zip entry metadata: a zip written twice from the same data is the same bytes.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


# -- writing ------------------------------------------------------------------------------------


def check_destination(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """`path` as a Path, once it is sure a store can be written there: StoreError if something
    is there and `overwrite` is false, if what is there is not a demonstration store (overwrite
    replaces nothing else), or if the folder it goes in cannot be written.

    Call it before expensive work that ends in `write_store`, to fail before, not after.
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise StoreError(f"{path}: already exists; pass overwrite=true to replace it")
        _check_replaceable(path)
    _check_writable(path.parent)
    return path


def _check_replaceable(path: Path) -> None:
    """StoreError unless `path` is a zarr group (directory or zip), an empty folder or a
    dangling link: overwrite=true must never delete a user's other files."""
    if not path.exists():  # a dangling symlink: nothing behind it to lose
        return
    if path.is_dir():
        entries = sorted(p.name for p in path.iterdir())
        if not entries or {"zarr.json", ".zgroup"} & set(entries):
            return
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise StoreError(f"{path}: not a demonstration store (it holds {shown}); overwrite=true replaces "
                         "only a store, so remove it yourself or choose another path")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            root = _zip_root(path)
            if (f"{root}/zarr.json".lstrip("/") in zf.namelist()
                    or f"{root}/.zgroup".lstrip("/") in zf.namelist()):
                return
    raise StoreError(f"{path}: a file that is not a demonstration store; overwrite=true replaces only a "
                     "store, so remove it yourself or choose another path")


def _check_writable(directory: Path) -> None:
    """StoreError naming the nearest existing folder on the way to `directory` if a store cannot
    be built there (read-only, not a folder)."""
    problem = unwritable(directory)
    if problem is not None:
        raise StoreError(f"{problem}; choose another path")


def write_store(
    path: str | os.PathLike,
    episodes: Sequence[Mapping[str, Any]],
    attrs: Mapping[str, Any],
    overwrite: bool = False,
    episode_meta: Mapping[str, Sequence[int]] | None = None,
) -> Path:
    """Write `episodes` (each a mapping key -> array with time first) as a store at `path`.

    Promises:
    - Every episode has the same keys, including REQUIRED_KEYS; within an episode every array
      has the same length (>= 1); across episodes a key has the same trailing shape. Keys in
      DTYPES are converted to their dtype; float values must be finite. Otherwise ValueError.
    - The root attributes are `attrs` (JSON-like: dicts with str keys, lists, tuples, str,
      finite numbers, bools, None, numpy scalars and arrays) plus `format` and `format_version`.
    - Atomic: the store is built under a temporary sibling name and renamed into place when
      complete. If anything fails or is interrupted, `path` is untouched (an old store stays,
      a missing one stays missing) and the temporary files are removed.
    - An existing `path` raises StoreError unless `overwrite`; then it is replaced only once
      the new store is complete.
    - Deterministic: the same arguments give the same files with the same bytes.
    - Missing parent directories are created (and removed again if the write fails).
    - `episode_meta`: one integer per episode for each name, written as `meta/<name>` (who
      demonstrated an episode and how, as robomimic's filter keys); ValueError on a wrong count.

    Returns `path` as a Path.
    """
    path = check_destination(path, overwrite)
    root_attrs = {"format": FORMAT, "format_version": FORMAT_VERSION}
    root_attrs.update({k: _plain(v, f"attrs[{k!r}]") for k, v in attrs.items() if k not in root_attrs})
    keys, lengths = _check_episodes(path, episodes)
    _check_cameras(path, attrs, episodes[0])
    per_episode = _check_episode_meta(path, episode_meta or {}, len(episodes))

    created = _make_parents(path.parent)
    remove_stale_partials(path.parent, path.name)  # what a killed writer of this path left
    tmp = make_partial(path.parent, path.name)
    try:
        built = tmp / "store"
        _write_group(built, path, episodes, keys, lengths, root_attrs, per_episode)
        if path.suffix == ".zip":
            _zip_directory(built, tmp / "store.zip")
            built = tmp / "store.zip"
        check_destination(path, overwrite)  # something may have appeared while we wrote
        replace_into(built, path, tmp)  # the old store moved, not deleted, until the new one is in place
    except BaseException:
        _settle_zarr_writes()
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    return path


def _settle_zarr_writes(timeout_s: float = 60.0) -> None:
    """Wait for the chunk writes still running in zarr's event loop. One failed write (a full
    disk) fails the array's assignment at once while zarr's other writes of it go on: a partial
    store removed before they end would get back the folders they go on to create."""
    import asyncio

    from zarr.core import sync

    loop = sync.loop[0]
    if loop is None or loop.is_closed() or not loop.is_running():
        return

    async def rest() -> None:
        me = asyncio.current_task()
        while others := [t for t in asyncio.all_tasks() if t is not me and not t.done()]:
            await asyncio.wait(others)

    try:
        asyncio.run_coroutine_threadsafe(rest(), loop).result(timeout_s)
    except Exception:  # a clean-up: the failed write's own error is the one reported
        pass


def _check_episodes(path: Path, episodes: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[int]]:
    """The sorted keys and the episode lengths; ValueError naming the episode and key if the
    episodes do not have one shape. Values are not converted here (that happens while writing)."""
    if len(episodes) == 0:
        raise ValueError(f"{path}: no episodes to write")
    keys = sorted(episodes[0])
    missing = [k for k in REQUIRED_KEYS if k not in keys]
    if missing:
        raise ValueError(f"{path}: episode 0: missing {', '.join(map(repr, missing))}")
    trailing = {k: np.shape(episodes[0][k])[1:] for k in keys}
    lengths = []
    for i, ep in enumerate(episodes):
        if sorted(ep) != keys:
            raise ValueError(f"{path}: episode {i}: keys {sorted(ep)} differ from episode 0's {keys}")
        shapes = {k: np.shape(ep[k]) for k in keys}
        for k, shape in shapes.items():
            if len(shape) == 0:
                raise ValueError(f"{path}: episode {i}: {k!r} is a scalar; arrays need a time axis")
            if shape[1:] != trailing[k]:
                raise ValueError(f"{path}: episode {i}: {k!r} has shape {shape}, episode 0 "
                                 f"has [T, *{trailing[k]}]")
        n = shapes["action"][0]
        bad = {k: s[0] for k, s in shapes.items() if s[0] != n}
        if bad:
            raise ValueError(f"{path}: episode {i}: 'action' has {n} steps but {bad}")
        if n == 0:
            raise ValueError(f"{path}: episode {i}: no steps")
        lengths.append(int(n))
    return keys, lengths


def _check_cameras(path: Path, attrs: Mapping[str, Any], episode: Mapping[str, Any]) -> None:
    """StoreError unless each camera the `cameras` attribute lists (an image store's) has its
    `<camera>_image` frames, uint8 of the size it states: training would refuse the store later.
    One episode says it for all (`_check_episodes` found them of one shape)."""
    if attrs.get("cameras") is None:
        return
    try:
        obs = ObsConfig.from_dict(attrs["cameras"])
    except (UserError, TypeError, ValueError) as err:
        raise StoreError(f"{path}: attrs['cameras'] is not an observation config ({err})") from None
    for camera, key in zip(obs.cameras if obs.image else [], obs.image_keys):
        if key not in episode:
            raise StoreError(f"{path}: attrs['cameras'] lists {camera!r}, but there is no data/{key}")
        frames = np.asarray(episode[key])
        if frames.dtype != np.uint8 or frames.shape[1:] != obs.image_shape:
            raise StoreError(f"{path}: data/{key}: {frames.dtype} frames of {frames.shape[1:]}, but "
                             f"attrs['cameras'] says uint8 {obs.image_shape}")


def _check_episode_meta(path: Path, meta: Mapping[str, Sequence[int]], n: int) -> dict[str, np.ndarray]:
    out = {}
    for name, values in meta.items():
        array = np.asarray(values)
        if name == "episode_ends" or not name.isidentifier():
            raise ValueError(f"{path}: meta/{name}: not a name for per-episode metadata")
        if array.shape != (n,) or array.dtype.kind not in "iu":
            raise ValueError(f"{path}: meta/{name}: expected {n} integers, got {array.dtype} "
                             f"of {array.shape}")
        out[name] = array.astype(np.int64)
    return out


def _write_group(
    where: Path, dest: Path, episodes: Sequence[Mapping[str, Any]], keys: list[str], lengths: list[int],
    attrs: dict, episode_meta: Mapping[str, np.ndarray],
) -> None:
    """Build the zarr v3 group at `where` (`dest` is where it is going, for messages)."""
    root = zarr.create_group(store=LocalStore(where), zarr_format=3, attributes=attrs)
    data = root.create_group("data")
    for key in keys:
        values = _column(dest, episodes, key)
        _create_array(data, key, values)
    meta = root.create_group("meta")
    _create_array(meta, "episode_ends", np.cumsum(lengths, dtype=np.int64))
    for name, values in episode_meta.items():
        _create_array(meta, name, values)


def _column(dest: Path, episodes: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    """Key `key` of every episode, converted and concatenated over time."""
    parts = []
    for i, ep in enumerate(episodes):
        where = f"{dest}: episode {i}: {key!r}"
        try:
            part = np.asarray(ep[key])
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: not an array ({err})") from None
        if part.dtype.kind not in "biuf":
            raise ValueError(f"{where}: dtype {part.dtype} cannot be stored (numbers and bools only)")
        dtype = DTYPES.get(key, part.dtype)
        if dtype.kind == "b" and part.dtype.kind != "b" and not np.isin(part, (0, 1)).all():
            raise ValueError(f"{where}: values other than 0 and 1 for a bool array")
        if part.dtype.kind == "f" and not np.isfinite(part).all():
            raise ValueError(f"{where} has non-finite values")
        parts.append(part.astype(dtype, copy=False))
    dtype = parts[0].dtype
    if any(p.dtype != dtype for p in parts):
        raise ValueError(f"{dest}: {key!r}: episodes disagree on dtype "
                         f"({sorted({str(p.dtype) for p in parts})})")
    return np.concatenate(parts)


def is_image(name: str, values) -> bool:
    """Camera frames: `<camera>_image` arrays of uint8 [T, H, W, 3] (robomimic's keys)."""
    return name.endswith("_image") and values.dtype == np.uint8 and values.ndim == 4 and values.shape[-1] == 3


def _create_array(group: zarr.Group, name: str, values: np.ndarray) -> None:
    row_bytes = values.dtype.itemsize * math.prod(values.shape[1:])
    # Frames are read a few at a time at random (training windows): one frame per chunk, as
    # diffusion_policy's image replay buffers, so a window decodes only what it uses.
    rows = 1 if is_image(name, values) else max(1, min(len(values), CHUNK_BYTES // max(1, row_bytes)))
    array = group.create_array(
        name,
        shape=values.shape,
        dtype=values.dtype,
        chunks=(rows, *(max(1, d) for d in values.shape[1:])),
        # zstd's checksum: a damaged chunk fails to read instead of decoding to wrong numbers
        compressors=ZstdCodec(level=3, checksum=True),
        fill_value=0,
        # every chunk is a file, even an all-zero one: a missing chunk file then means damage
        config={"write_empty_chunks": True},
    )
    array[...] = values


def _zip_directory(src: Path, dst: Path) -> None:
    """Zip the files under `src` (names relative to it) into `dst`, reproducibly."""
    files = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    # Chunks are already compressed; storing them keeps reads a plain seek.
    with zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in files:
            info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
            info.external_attr = 0o644 << 16
            zf.writestr(info, (src / name).read_bytes())


def _plain(value: Any, where: str) -> Any:
    """`value` as plain JSON data (numpy scalars/arrays and tuples become Python numbers and
    lists); TypeError/ValueError naming `where` for anything JSON cannot hold faithfully."""
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: key {k!r} is not a str")
            out[k] = _plain(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    elif isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}: {value} is not finite (JSON cannot hold it)")
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise TypeError(f"{where}: {type(value).__name__} is not JSON-serializable")


def _make_parents(directory: Path) -> list[Path]:
    """Create `directory` and its missing parents; the ones created, deepest first."""
    created = []
    d = directory.absolute()
    while not d.exists():
        created.append(d)
        d = d.parent
    directory.mkdir(parents=True, exist_ok=True)
    return created


def _remove_empty(directories: list[Path]) -> None:
    for d in directories:
        try:
            d.rmdir()
        except OSError:
            break


def store_size_mb(path: str | os.PathLike) -> float:
    """What a store takes on disk, in MB (a directory's files, or one zip)."""
    p = Path(path)
    files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files) / 1e6


# -- reading ------------------------------------------------------------------------------------


class DemoStore(Closeable):
    """A demonstration store opened for reading (see `open_store`).

    Arrays are read from disk on each access and returned as numpy arrays the caller owns.
    """

    def __init__(self, path: Path, group: zarr.Group, zip_store: ZipStore | None = None):
        self.path = path
        self._zip = zip_store
        self.zarr_format: int = group.metadata.zarr_format
        self.attrs: dict[str, Any] = json.loads(json.dumps(dict(group.attrs)))
        self._arrays, self.episode_ends = _validated(path, group, self.attrs)
        self.keys: tuple[str, ...] = tuple(self._arrays)
        # per-episode integers (operator, proficiency, strategy, ...): small, read once
        self.episode_meta: dict[str, np.ndarray] = _episode_meta(path, group, self.n_episodes)

    @property
    def n_episodes(self) -> int:
        return len(self.episode_ends)

    @property
    def n_steps(self) -> int:
        return int(self.episode_ends[-1]) if len(self.episode_ends) else 0

    @property
    def seeds_used(self) -> list[int]:
        """Every env seed its demonstrations were tried on, kept or failed (an evaluation must
        avoid them); the kept ones' where the store records only those, none where it says neither."""
        return [int(s) for s in self.attrs.get("seeds_used") or self.attrs.get("episode_seeds") or []]

    @property
    def task(self) -> str | None:
        """The task the demonstrations are of, or None where the store does not say."""
        return self.attrs.get("task")

    def __contains__(self, key: object) -> bool:
        return key in self._arrays

    def __getitem__(self, key: str) -> np.ndarray:
        """All of `data/<key>`, every episode concatenated; StoreError if there is no such key."""
        return self._read(key, slice(None))

    def episode_slice(self, i: int) -> slice:
        """The rows of episode `i` (negative counts from the end); IndexError if out of range."""
        n = self.n_episodes
        if not -n <= i < n:
            raise IndexError(f"episode {i} out of range: {self.path} has {n} episodes")
        i %= n
        start = int(self.episode_ends[i - 1]) if i > 0 else 0
        return slice(start, int(self.episode_ends[i]))

    def episode(self, i: int) -> dict[str, np.ndarray]:
        """Every key's rows of episode `i`."""
        rows = self.episode_slice(i)
        return {key: self._read(key, rows) for key in self.keys}

    def _read(self, key: str, rows: slice) -> np.ndarray:
        if key not in self._arrays:
            raise StoreError(f"{self.path}: no array data/{key}; it has {', '.join(self.keys)}")
        try:
            return np.asarray(self._arrays[key][rows])
        except Exception as err:  # codec and I/O errors of a damaged chunk, whatever raises them
            raise StoreError(f"{self.path}: data/{key}: cannot read ({type(err).__name__}: {err})") from err

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None


    def __repr__(self) -> str:
        return (f"DemoStore({str(self.path)!r}, task={self.task!r}, {self.n_episodes} episodes, "
                f"{self.n_steps} steps, keys={list(self.keys)})")


def open_store(path: str | os.PathLike, task: str | None = None) -> DemoStore:
    """Open the store at `path` (directory or .zip; zarr v3 or v2) after checking it.

    Raises StoreError naming the path (and the field) when the path is missing, is not a zarr
    group, lacks `meta/episode_ends` or `data/` arrays, has arrays of different lengths, has
    episode ends that are not increasing or do not end at the data's length, is a newer format
    than this code reads, or (with `task`) records a different task. A store that records no
    task (diffusion_policy's own) passes the task check.
    """
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path}: no such demonstration store")
    zip_store = None
    try:
        if path.is_dir():
            group = zarr.open_group(LocalStore(path, read_only=True), mode="r")
        else:
            if not zipfile.is_zipfile(path):
                raise StoreError(f"{path}: not a demonstration store (neither a directory nor a .zip file)")
            zip_store = ZipStore(path, mode="r")
            group = zarr.open_group(zip_store, path=_zip_root(path), mode="r")
        store = DemoStore(path, group, zip_store)
    except StoreError:
        if zip_store is not None:
            zip_store.close()
        raise
    except Exception as err:  # zarr's many ways of saying "not a readable group"
        if zip_store is not None:
            zip_store.close()
        raise StoreError(f"{path}: not a readable zarr group ({type(err).__name__}: {err})") from err
    if task is not None and store.task is not None and store.task != task:
        store.close()
        raise StoreError(f"{path}: store holds task {store.task!r}, expected {task!r}")
    return store


def select_episodes(store: DemoStore, which: str) -> np.ndarray:
    """The episodes `which` names, in order: "all", or words joined by "+" (their union), each a
    code name of a per-episode array (`better`, `worse`, `clockwise`, ...) or `operator<N>`.
    UserError naming `episodes` for a word the store cannot answer or a selection of none."""
    if which == "all":
        return np.arange(store.n_episodes)
    names = store.attrs.get("episode_meta") or {}
    keep = np.zeros(store.n_episodes, dtype=bool)
    for word in which.split("+"):
        hits = [(key, codes.index(word)) for key, codes in names.items()
                if key in store.episode_meta and word in codes]
        if word.startswith("operator") and word[8:].isdigit() and "operator" in store.episode_meta:
            hits.append(("operator", int(word[8:])))
        if not hits:
            known = sorted({c for key, codes in names.items() for c in codes if key in store.episode_meta})
            known += ["operator<N>"] if "operator" in store.episode_meta else []
            raise UserError(f"episodes: {store.path} cannot select {word!r}; it offers "
                            f"{', '.join(['all', *known])}")
        for key, code in hits:
            keep |= store.episode_meta[key] == code
    if not keep.any():
        raise UserError(f"episodes: {which!r} selects none of the {store.n_episodes} episodes "
                        f"of {store.path}")
    return np.flatnonzero(keep)


def _episode_meta(path: Path, group: zarr.Group, n: int) -> dict[str, np.ndarray]:
    meta = group.get("meta")
    out = {}
    for name, node in sorted(meta.arrays()) if isinstance(meta, zarr.Group) else ():
        if name == "episode_ends":
            continue
        if node.shape != (n,) or node.dtype.kind not in "iu":
            raise StoreError(f"{path}: meta/{name}: expected one integer per episode ({n}), "
                             f"got {node.dtype} of {node.shape}")
        try:
            out[name] = np.asarray(node[...], dtype=np.int64)
        except Exception as err:  # a damaged chunk, whatever raises it
            raise StoreError(f"{path}: meta/{name}: cannot read ({type(err).__name__}: {err})") from err
    return out


def _zip_root(path: Path) -> str:
    """Where the group sits in a zip: at its root (zarr's ZipStore, our writer), or in its one
    top-level folder (`zip -r x.zarr.zip x.zarr`)."""
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
    if names & {"zarr.json", ".zgroup"}:
        return ""
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) == 1:
        (top,) = tops
        if names & {f"{top}/zarr.json", f"{top}/.zgroup"}:
            return top
    return ""


def _validated(path: Path, group: zarr.Group, attrs: dict) -> tuple[dict[str, zarr.Array], np.ndarray]:
    """The data arrays by sorted key, and the episode ends; StoreError for what is wrong."""
    version = attrs.get("format_version")
    if attrs.get("format") == FORMAT and isinstance(version, int) and version > FORMAT_VERSION:
        raise StoreError(f"{path}: format_version {version} is newer than this parapolicy "
                         f"reads ({FORMAT_VERSION})")

    meta = group.get("meta")
    ends_node = meta.get("episode_ends") if isinstance(meta, zarr.Group) else None
    if not isinstance(ends_node, zarr.Array):
        raise StoreError(f"{path}: meta/episode_ends: missing")
    if ends_node.ndim != 1 or ends_node.dtype.kind not in "iu":
        raise StoreError(f"{path}: meta/episode_ends: expected 1-D integers, got {ends_node.dtype} of "
                         f"shape {ends_node.shape}")

    data = group.get("data")
    if not isinstance(data, zarr.Group):
        raise StoreError(f"{path}: data/: missing")
    arrays = dict(sorted(data.arrays()))
    if not arrays:
        raise StoreError(f"{path}: data/: no arrays")
    for key, array in arrays.items():
        if array.ndim == 0:
            raise StoreError(f"{path}: data/{key}: a scalar; arrays need a time axis")
    lengths = {key: array.shape[0] for key, array in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise StoreError(f"{path}: data/: arrays of different lengths "
                         f"({', '.join(f'{k} {n}' for k, n in lengths.items())})")
    n_steps = next(iter(lengths.values()))

    try:
        ends = np.asarray(ends_node[...]).astype(np.int64)
    except Exception as err:
        raise StoreError(f"{path}: meta/episode_ends: cannot read ({type(err).__name__}: {err})") from err
    starts = np.concatenate([[0], ends[:-1]])
    bad = np.flatnonzero(ends <= starts)
    if len(bad):
        i = int(bad[0])
        raise StoreError(f"{path}: meta/episode_ends: not increasing (episode {i} ends at "
                         f"{ends[i]}, after {starts[i]})")
    last = int(ends[-1]) if len(ends) else 0
    if last != n_steps:
        raise StoreError(f"{path}: meta/episode_ends: last end is {last} but data/ "
                         f"arrays have {n_steps} steps")

    if attrs.get("format") == FORMAT:
        # Our writer writes every chunk; a missing one would silently read as zeros.
        for key, array in {**{f"data/{k}": a for k, a in arrays.items()},
                           "meta/episode_ends": ends_node}.items():
            if array.nchunks_initialized < array.nchunks:
                raise StoreError(f"{path}: {key}: {array.nchunks - array.nchunks_initialized} of "
                                 f"{array.nchunks} chunks missing (damaged store)")
    return arrays, ends
