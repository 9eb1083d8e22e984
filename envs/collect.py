"""`dp-collect`: scripted-expert demonstrations for a task, written as a demonstration store.

Episode seeds are tried in order from `seed`; the store keeps the first `n_demos` successful
ones. Which seeds those are does not depend on the number of workers or their timing, so the
same arguments give the same bytes.

`demos=mh` collects mixed-proficiency demonstrations instead (six operators, better / okay /
worse, taking turns by seed; on a task with two strategies each episode draws one), recorded per
episode under `meta/` so that training can select by operator, proficiency or strategy.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any

from tqdm import tqdm

from common.cli import command, ignore_ctrl_c_in_worker, workers_ignore_ctrl_c
from common.errors import UserError
from envs.tasks import DEMO_SETS, ObsConfig, TaskConfig, demo_scene, get_task


@dataclass
class CollectConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    obs: ObsConfig = field(default_factory=ObsConfig)  # obs=image adds each camera's frames
    n_demos: int = 200
    seed: int = 0
    demos: str = "ph"  # ph: one proficient scripted operator; mh: six of mixed proficiency
    out: str = "data/${task.name}.zarr"
    workers: int = 0  # 0: one per core
    max_attempts: int | None = None  # default: 2 * n_demos + 20
    overwrite: bool = False

    def __post_init__(self):
        """The numbers checked at start-up, before any worker starts: one line naming the key."""
        from common.checks import check_number

        if self.demos not in DEMO_SETS:
            raise UserError(f"demos: {self.demos!r} is not one of {', '.join(DEMO_SETS)}")
        check_number("n_demos", self.n_demos, 1, integer=True)
        check_number("seed", self.seed, 0, integer=True)  # episode seeds seed, seed + 1, ...: a simulator's
        check_number("workers", self.workers, 0, integer=True)  # 0: one per core
        if self.max_attempts is not None:
            check_number("max_attempts", self.max_attempts, 1, integer=True)


# -- worker side: one environment per process, reused across episodes --------------------------
_worker: dict[str, Any] = {}


class WorkerError(UserError):
    """A worker could not build its environment: every worker would fail the same way."""


def _init_worker(task: str, obs: dict | None = None, demos: str = "ph") -> None:
    ignore_ctrl_c_in_worker()  # the parent answers Ctrl-C and stops the pool
    _worker["task"] = task
    _worker["demos"] = demos
    try:
        from envs.robosuite_env import make_env

        _worker["env"] = make_env(task, obs=obs, scene=demo_scene(task, demos))
    except Exception as err:  # noqa: BLE001  (whatever it is, every worker would meet it)
        # An initializer that raises ends its process, and the pool starts another in its place,
        # forever. Kept instead, and reported by the first episode this worker is given.
        text = " ".join(str(err).split()) or "(no message)"
        _worker["error"] = f"{type(err).__name__}: {text}" if not isinstance(err, UserError) else text


def _run_seed(seed: int) -> dict:
    from envs.experts import expert_episode

    if "error" in _worker:
        raise WorkerError(f"task {_worker['task']}: a worker could not build its "
                          f"environment: {_worker['error']}")
    return expert_episode(_worker["env"], _worker["task"], seed, _worker["demos"])


# -- parent side ----------------------------------------------------------------------------------
def collect(task: str, n_demos: int, seed: int = 0, workers: int = 0, max_attempts: int | None = None,
            progress: bool = True, obs: ObsConfig | None = None,
            demos: str = "ph") -> tuple[list[dict], list[int]]:
    """Run the task's expert on seeds seed, seed+1, ... until `n_demos` succeed (recording each
    camera's frames too with an image `obs`; as each seed's operator with `demos="mh"`).

    Returns (successful episodes in seed order, failed seeds). Raises UserError when
    `max_attempts` seeds were tried without reaching `n_demos`.
    """
    obs = obs or ObsConfig()
    obs.check_cameras(get_task(task))  # an unknown task or camera: fail before starting workers
    if n_demos < 1:
        raise UserError(f"n_demos: must be >= 1, got {n_demos}")
    max_attempts = max_attempts or 2 * n_demos + 20
    workers = workers or os.cpu_count() or 1
    kept: list[dict] = []
    failed: list[int] = []
    seeds = range(seed, seed + max_attempts)
    bar = tqdm(total=n_demos, desc=f"collect {task}", unit="demo", disable=not progress)
    # spawn, not fork: each worker builds its own simulator and OpenGL context from scratch.
    pool = None
    try:
        with workers_ignore_ctrl_c():  # a Ctrl-C meanwhile is raised at its end, once `pool` is set
            pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker,
                                                initargs=(task, obs.to_dict(), demos))
        # imap keeps seed order, so "the first n_demos successes" is the same set on any machine.
        for episode in pool.imap(_run_seed, seeds):
            if episode["succeeded"]:
                kept.append(episode)
                bar.update(1)
            else:
                failed.append(int(episode["seed"]))
            bar.set_postfix(failed=len(failed))
            if len(kept) == n_demos:
                break
    finally:
        if pool is not None:
            pool.terminate()  # also stops the seeds already handed out beyond the last one needed
        bar.close()  # ends the bar's line: an error or an interrupt is then a line of its own
    if len(kept) < n_demos:
        raise UserError(
            f"max_attempts: only {len(kept)} of {n_demos} demos succeeded in {max_attempts} seeds "
            f"(failed: {len(failed)}); raise max_attempts"
        )
    return kept, failed


EPISODE_META = ("operator", "proficiency", "strategy", "decision_step")


def episode_meta(episodes: list[dict]) -> dict[str, list[int]]:
    """The per-episode records of mixed-proficiency episodes (none for the proficient expert's)."""
    if "operator" not in episodes[0]:
        return {}
    return {key: [int(e[key]) for e in episodes] for key in EPISODE_META}


def mh_attrs(demos: str, task: str) -> dict:
    """What an mh store says of its operators and of the codes in its meta/ arrays."""
    if demos != "mh":
        return {}
    from dataclasses import asdict

    from envs.experts import OPERATORS, PROFICIENCIES
    from envs.modes import task_modes

    modes = task_modes(task)
    return {"demos": "mh", "operators": [asdict(op) for op in OPERATORS],
            "episode_meta": {"proficiency": list(PROFICIENCIES),
                             "strategy": list(modes.names if modes is not None else ())}}


def store_attrs(task: str, episodes: list[dict], failed: list[int], seed: int,
                obs: ObsConfig | None = None, demos: str = "ph") -> dict:
    """What a store records about how its demonstrations were made."""
    spec = get_task(task).in_scene(demo_scene(task, demos))
    seeds = [int(e["seed"]) for e in episodes]
    return {
        **mh_attrs(demos, task),
        **({"scene": spec.scene} if spec.scene else {}),
        **({"cameras": obs.to_dict()} if obs is not None and obs.image else {}),
        "task": task,
        "env": spec.env_settings(),
        "controller": {"type": spec.controller, "arm": "OSC_POSE", "input_type": "delta"},
        "obs_keys": list(spec.obs_layout),
        "obs_layout": {k: list(v) for k, v in spec.obs_layout.items()},
        "source": "scripted-expert",
        "collect_seed": seed,
        "episode_seeds": seeds,
        # every seed tried, kept or not: an evaluation must not start from any of them
        "seeds_used": sorted(seeds + failed),
        "failed_seeds": failed,
        "parapolicy_version": version("parapolicy"),
    }


@command("collect", CollectConfig)
def main(cfg: CollectConfig) -> None:
    from envs.store import check_destination, store_size_mb, write_store

    out = check_destination(cfg.out, cfg.overwrite)  # fail now, not after the collection
    obs = cfg.obs
    episodes, failed = collect(cfg.task.name, cfg.n_demos, cfg.seed, cfg.workers, cfg.max_attempts, obs=obs,
                               demos=cfg.demos)
    keys = ("obs", "action", "state", "reward", "success", *obs.image_keys)
    write_store(out, [{k: e[k] for k in keys} for e in episodes],
                store_attrs(cfg.task.name, episodes, failed, cfg.seed, obs, cfg.demos),
                overwrite=cfg.overwrite, episode_meta=episode_meta(episodes))
    steps = sum(len(e["action"]) for e in episodes)
    print(f"wrote {out}: {len(episodes)} demos, {steps} steps, "
          f"{store_size_mb(out) / len(episodes):.2f} MB per demo; "
          f"{len(failed)} expert failures (seeds {failed[:10]}{' ...' if len(failed) > 10 else ''})")


if __name__ == "__main__":
    main()
