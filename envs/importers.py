"""Importers: demonstrations made elsewhere, converted into a demonstration store.

`import_robomimic` reads robomimic's HDF5 (`data/demo_<i>/{obs/<key>, actions, rewards, dones,
states}` with a JSON `env_args` attribute on `data`), low-dim or image (`obs/<camera>_image`
uint8 frames are kept, one array per camera). `render_store` re-renders a low-dim store's saved
states into camera frames, as robomimic's `dataset_states_to_obs` does. `dp-import in=demo.hdf5
out=data/x.zarr [overwrite=true]` is the command line of the first, `dp-import in=data/x.zarr
out=data/x_image.zarr obs=image` of the second, `dp-import in=<LeRobotDataset folder>
out=data/x.zarr` of `envs.lerobot.import_lerobot`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import MISSING

from common.cli import command
from common.errors import UserError
from envs.errors import SourceError
from envs.store import check_destination, open_store, store_size_mb, write_store
from envs.tasks import ACTION_DIM, TASKS, ObsConfig, TaskSpec

_DEMO_NAME = re.compile(r"^demo_(\d+)$")


def import_robomimic(hdf5_path: str | os.PathLike, out_path: str | os.PathLike,
                     overwrite: bool = False) -> Path:
    """Convert the robomimic low-dim HDF5 at `hdf5_path` into a store at `out_path`.

    - Task: from `env_args.env_name` through the registry (Lift -> lift, PickPlaceCan -> can,
      NutAssemblySquare -> square).
    - Episodes: the demos in numeric order (demo_2 before demo_10).
    - obs: robomimic's `obs/<key>` concatenated in `envs.tasks.OBS_KEYS` order, float32; each
      key's width must match the task's observation layout.
    - action, reward, state: robomimic's `actions`, `rewards`, `states` (flattened sim states).
    - success, per step: with robosuite's sparse reward (env_kwargs.reward_shaping false, as in
      robomimic's datasets) the reward is positive exactly when the task's success check holds
      after the step, so success = reward > 0. With shaped rewards, `dones` when every demo
      has them (robomimic's done_mode 2 also marks each demo's last step), else only the last
      step of each demo. Which rule was used is recorded in attrs["success_source"].
    - attrs record the source file (absolute path, sha256), its demo names and filter masks,
      its env_args, the task's env settings and the observation layout.

    Raises SourceError naming the file and the missing or malformed field, StoreError if
    `out_path` exists and not `overwrite`. Writing is atomic (see `write_store`).
    """
    out_path = check_destination(out_path, overwrite)
    source = read_robomimic(hdf5_path)
    return write_store(out_path, source.episodes, source.attrs(), overwrite=overwrite)


@dataclasses.dataclass
class RobomimicSource:
    """The demonstrations of one robomimic HDF5, converted to store episodes."""

    path: Path
    spec: TaskSpec
    env_args: dict
    demo_names: list[str]
    episodes: list[dict[str, np.ndarray]]
    success_source: str
    masks: dict[str, list[str]]

    def attrs(self) -> dict[str, Any]:
        layout = self.spec.obs_layout
        images = [k for k in self.episodes[0] if k.endswith("_image")]
        cameras = {}
        if images:  # robomimic renders with MuJoCo's default quality
            size = int(self.episodes[0][images[0]].shape[1])
            cameras = {"cameras": ObsConfig("image", [k[: -len("_image")] for k in images], size,
                                            "full").to_dict()}
        return {
            **cameras,
            "task": self.spec.name,
            "env": self.spec.env_settings(),
            "obs_keys": list(layout),
            "obs_layout": {k: list(v) for k, v in layout.items()},
            "source": "robomimic",
            "source_file": str(self.path.resolve()),
            "source_sha256": _sha256(self.path),
            "source_demos": self.demo_names,
            "source_masks": self.masks,
            "robomimic_env_args": self.env_args,
            "success_source": self.success_source,
            "parapolicy_version": version("parapolicy"),
        }


def read_robomimic(hdf5_path: str | os.PathLike) -> RobomimicSource:
    """Read and check a robomimic low-dim HDF5 (see `import_robomimic` for the conversion)."""
    import h5py

    path = Path(hdf5_path)
    if not path.exists():
        raise SourceError(f"{path}: no such file")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise SourceError(f"{path}: not a readable HDF5 file ({err})") from None
    with f:
        if "data" not in f or not isinstance(f["data"], h5py.Group):
            raise SourceError(f"{path}: missing group 'data' (not a robomimic dataset?)")
        data = f["data"]
        env_args = _env_args(path, data)
        spec = _task_for_env(path, env_args)
        names = sorted((n for n in data if isinstance(data[n], h5py.Group)), key=_demo_order)
        if not names:
            raise SourceError(f"{path}: data: no demonstrations")
        shaped = bool(env_args.get("env_kwargs", {}).get("reward_shaping", False))
        if not shaped:
            success_source = "rewards"
        elif all("dones" in data[n] for n in names):
            success_source = "dones"
        else:
            success_source = "final_step"
        episodes = [_episode(path, spec, n, data[n], success_source) for n in names]
        _check_same_cameras(path, names, episodes)
        masks = {k: sorted((_str(v) for v in f["mask"][k][()]), key=_demo_order) for k in f.get("mask", {})}
    return RobomimicSource(path, spec, env_args, names, episodes, success_source, masks)


def _env_args(path: Path, data: Any) -> dict:
    if "env_args" not in data.attrs:
        raise SourceError(f"{path}: data: missing attribute 'env_args'")
    try:
        env_args = json.loads(_str(data.attrs["env_args"]))
    except (ValueError, TypeError) as err:
        raise SourceError(f"{path}: data.attrs['env_args']: not a JSON object ({err})") from None
    if not isinstance(env_args, dict) or "env_name" not in env_args:
        raise SourceError(f"{path}: data.attrs['env_args']: missing 'env_name'")
    return env_args


def _task_for_env(path: Path, env_args: dict) -> TaskSpec:
    by_env = {spec.env_name: spec for spec in TASKS.values()}
    env_name = env_args["env_name"]
    if env_name not in by_env:
        known = ", ".join(f"{e} -> {s.name}" for e, s in sorted(by_env.items()))
        raise SourceError(f"{path}: env_args.env_name {env_name!r} is not a known task (known: {known})")
    return by_env[env_name]


def _episode(path: Path, spec: TaskSpec, name: str, demo: Any, success_source: str) -> dict[str, np.ndarray]:
    import h5py

    where = f"{path}: data/{name}"
    for key in ("obs", "actions", "rewards", "states"):
        if key not in demo:
            raise SourceError(f"{where}: missing {key!r}")
    if not isinstance(demo["obs"], h5py.Group):
        raise SourceError(f"{where}/obs: a dataset, expected a group of one dataset per observation key")
    parts = []
    for key, (start, stop) in spec.obs_layout.items():
        if key not in demo["obs"]:
            raise SourceError(f"{where}/obs: missing {key!r}")
        value = _numbers(f"{where}/obs/{key}", demo["obs"][key], np.float32)
        if value.ndim != 2 or value.shape[1] != stop - start:
            raise SourceError(f"{where}/obs/{key}: shape {value.shape}, task {spec.name!r} "
                              f"expects [T, {stop - start}]")
        parts.append(value)
    images = {}
    for key in sorted(k for k in demo["obs"] if k.endswith("_image")):
        frames = np.asarray(_dataset(f"{where}/obs/{key}", demo["obs"][key])[()])
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise SourceError(f"{where}/obs/{key}: {frames.dtype} {frames.shape}, "
                              "expected uint8 [T, H, W, 3]")
        if frames.shape[1] != frames.shape[2]:
            raise SourceError(f"{where}/obs/{key}: frames of {frames.shape[1]}x{frames.shape[2]} pixels; an "
                              "image store holds square frames (obs.size)")
        images[key] = frames
    episode = {
        **images,
        "obs": np.concatenate(parts, axis=1),
        "action": _numbers(f"{where}/actions", demo["actions"], np.float32),
        "state": _numbers(f"{where}/states", demo["states"], np.float64),
        "reward": _numbers(f"{where}/rewards", demo["rewards"], np.float32),
    }
    if episode["action"].ndim != 2 or episode["action"].shape[1] != ACTION_DIM:
        raise SourceError(f"{where}/actions: shape {episode['action'].shape}, expected [T, {ACTION_DIM}]")
    if episode["state"].ndim != 2:
        raise SourceError(f"{where}/states: shape {episode['state'].shape}, expected [T, S]")
    if episode["reward"].ndim != 1:
        raise SourceError(f"{where}/rewards: shape {episode['reward'].shape}, expected [T]")
    n = len(episode["action"])
    if n == 0:
        raise SourceError(f"{where}/actions: no steps")
    if success_source == "rewards":
        episode["success"] = episode["reward"] > 0
    elif success_source == "dones":
        episode["success"] = np.asarray(_dataset(f"{where}/dones",
                                                 demo["dones"])[()]).astype(bool).reshape(-1)
    else:
        episode["success"] = np.arange(n) == n - 1
    lengths = {k: len(v) for k, v in episode.items()}
    if len(set(lengths.values())) > 1:
        raise SourceError(f"{where}: lengths differ ({', '.join(f'{k} {v}' for k, v in lengths.items())})")
    return episode


def render_store(src: str | os.PathLike, out_path: str | os.PathLike, obs: ObsConfig,
                 overwrite: bool = False, progress: bool = True) -> Path:
    """A copy of the store at `src` with each camera of `obs` rendered from its saved states
    (robomimic's `dataset_states_to_obs`): episode by episode, `reset(seed=episode seed)` (the
    seed fixes the model: Lift's cube size), then `set_state` at each step and the frames there.
    Everything else is copied as it is. StoreError/UserError naming the store and what it lacks."""
    from tqdm import tqdm

    from envs.robosuite_env import make_env

    if not obs.image:
        raise UserError("obs: re-rendering needs obs=image (cameras to render)")
    out_path = check_destination(out_path, overwrite)
    with open_store(src) as store:
        if store.task is None:
            raise UserError(f"{src}: records no task; cannot build its simulator")
        if "state" not in store.keys:
            raise UserError(f"{src}: data/state: missing (re-rendering replays the saved states)")
        seeds = store.attrs.get("episode_seeds")
        if not seeds or len(seeds) != store.n_episodes:
            raise UserError(f"{src}: attrs.episode_seeds: missing or not one per episode (the seed fixes "
                            f"the model each state belongs to)")
        env = make_env(store.task, obs=obs, scene=store.attrs.get("scene"))
        episodes = []
        try:
            for i in tqdm(range(store.n_episodes), desc=f"render {Path(src).name}", unit="demo",
                          disable=not progress):
                ep = {k: v for k, v in store.episode(i).items() if not k.endswith("_image")}
                env.reset(seed=int(seeds[i]))
                frames: dict[str, list] = {k: [] for k in obs.image_keys}
                for state in ep["state"]:
                    env.set_state(state)
                    for key, frame in env.images().items():
                        frames[key].append(frame)
                episodes.append({**ep, **{k: np.asarray(v, np.uint8) for k, v in frames.items()}})
        finally:
            env.close()
        attrs = {**store.attrs, "cameras": obs.to_dict(), "rendered_from": str(Path(src).resolve())}
    return write_store(out_path, episodes,
                       {k: v for k, v in attrs.items() if k not in ("format", "format_version")},
                       overwrite=overwrite)


def _check_same_cameras(path: Path, names: list[str], episodes: list[dict[str, np.ndarray]]) -> None:
    """SourceError naming the demo and field unless every demo has the cameras of the first, with
    frames of the first's size: a store holds one array per camera, and a policy one frame size."""
    first = {k: v.shape[1:] for k, v in episodes[0].items() if k.endswith("_image")}
    for name, episode in zip(names[1:], episodes[1:]):
        where = f"{path}: data/{name}/obs"
        these = {k: v.shape[1:] for k, v in episode.items() if k.endswith("_image")}
        missing, extra = sorted(set(first) - set(these)), sorted(set(these) - set(first))
        if missing:
            raise SourceError(f"{where}: no {missing[0]!r}, which data/{names[0]}/obs has "
                              f"(every demo needs the same cameras)")
        if extra:
            raise SourceError(f"{where}/{extra[0]}: a camera data/{names[0]}/obs does not have "
                              f"(every demo needs the same cameras)")
        for key, shape in sorted(these.items()):
            if shape != first[key]:
                raise SourceError(f"{where}/{key}: frames of {tuple(shape)}, data/{names[0]}'s are "
                                  f"{tuple(first[key])} (every demo needs frames of one size)")


def _dataset(where: str, node: Any) -> Any:
    """`node` if it is an HDF5 dataset; SourceError naming the field if it is a group."""
    import h5py

    if not isinstance(node, h5py.Dataset):
        raise SourceError(f"{where}: {'a group' if isinstance(node, h5py.Group) else 'not a dataset'}, "
                          "expected a dataset")
    return node


def _numbers(where: str, dataset: Any, dtype: type) -> np.ndarray:
    """An HDF5 dataset as finite numbers of `dtype`; SourceError naming the field otherwise (a
    group, a string-typed field, NaN or inf, a value too large for float32)."""
    raw = np.asarray(_dataset(where, dataset)[()])
    if raw.dtype.kind not in "biuf":
        raise SourceError(f"{where}: dtype {raw.dtype} is not numeric")
    with np.errstate(over="ignore"):
        value = raw.astype(dtype)
    bad = ~np.isfinite(value)
    if bad.any():
        row = int(np.argwhere(bad)[0][0]) if value.ndim else 0
        raise SourceError(f"{where}: {int(bad.sum())} values are NaN or inf as "
                          f"{np.dtype(dtype)} (first in row {row})")
    return value


def _demo_order(name: str) -> tuple[int, int, str]:
    """demo_2 before demo_10; names of another pattern after all demo_<i>, by name."""
    m = _DEMO_NAME.match(name)
    return (0, int(m.group(1)), name) if m else (1, 0, name)


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- command line -------------------------------------------------------------------------------

def _set_fields(self, **values: Any) -> None:
    """ImportConfig's __init__: the command harness builds the config (`OmegaConf.to_object`)
    with every field as a keyword, `in` included."""
    for key, value in values.items():
        setattr(self, key, value)


# The schema of conf/import.yaml. Its first key is the Python keyword `in`, which the dataclass
# decorator accepts only without a generated __init__/__repr__/__eq__ (they would name it as a
# variable): the __init__ is `_set_fields`, the field read with getattr(cfg, "in").
ImportConfig = dataclasses.dataclass(init=False, repr=False, eq=False)(
    type(
        "ImportConfig",
        (),
        {
            "__module__": __name__,
            "__init__": _set_fields,
            "__doc__": "dp-import: in=<robomimic .hdf5 | store> out=<store path> "
                       "overwrite=<bool> [obs=image].",
            "__annotations__": {"in": str, "out": str, "overwrite": bool, "obs": ObsConfig},
            "in": MISSING,
            "out": MISSING,
            "overwrite": False,
            "obs": dataclasses.field(default_factory=ObsConfig),
        },
    )
)

_USAGE = ("usage: dp-import in=demo.hdf5 out=data/lift.zarr [overwrite=true]; "
          "dp-import in=<LeRobotDataset folder> out=data/arm.zarr; "
          "dp-import in=data/lift.zarr out=data/lift_image.zarr obs=image (render cameras from saved states)")


def _require_in_and_out(cfg: Any) -> None:
    """Before the config is built (which would name a missing key alone): with the usage."""
    from omegaconf import OmegaConf

    for key in ("in", "out"):
        if OmegaConf.is_missing(cfg, key):
            raise UserError(f"{key}: required; {_USAGE}")


def _run(cfg: ImportConfig) -> None:
    from envs.lerobot import import_lerobot, is_lerobot

    obs = cfg.obs
    source = Path(getattr(cfg, "in"))
    is_store = source.is_dir() or (source.suffix == ".zip" and source.is_file())
    try:
        if is_lerobot(source):
            if obs.image:
                raise UserError(f"obs: {source} is a LeRobotDataset; its video features are imported as "
                                "camera frames without obs=image")
            out = import_lerobot(source, cfg.out, overwrite=cfg.overwrite)
        elif is_store:
            out = render_store(source, cfg.out, obs, overwrite=cfg.overwrite)
        elif obs.image:
            raise UserError(f"obs: {source} is a robomimic file; its image keys are imported as they "
                            "are, without obs=image")
        else:
            out = import_robomimic(getattr(cfg, "in"), cfg.out, overwrite=cfg.overwrite)
    except OSError as err:  # permissions, a full disk, ...: a file problem, not a bug
        raise UserError(f"{err.filename or cfg.out}: {err.strerror or err}") from err
    with open_store(out) as store:
        print(f"wrote {out}: task {store.task}, {store.n_episodes} demos, {store.n_steps} steps, "
              f"{store_size_mb(out) / store.n_episodes:.2f} MB per demo")


main = command("import", ImportConfig, before=_require_in_and_out)(_run)
