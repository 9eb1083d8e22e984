"""`dp-quickstart`: the whole path on lift in one command — collect scripted demonstrations,
train the reference policy, evaluate four samplers, print the table, write the Pareto plot.

Everything lives under `out` (default `outputs/quickstart`). A stage whose result is already
there is reused (training resumes from its latest checkpoint, the evaluation continues its
episode log); `restart=true` starts over. Budget on 2 CPU cores: about 1 min of collection,
13 min of training, 3 min of evaluation.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from envs.cli import command
from envs.tasks import TaskConfig

# Minutes each stage took on a 2-core CPU (used for "how long is left" until measured).
ESTIMATE_MIN = {"collect": 1.0, "train": 13.5, "eval": 3.5}


@dataclass
class QuickstartConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    n_demos: int = 200
    steps: int = 2500
    episodes: int = 20
    samplers: list[str] = field(default_factory=lambda: ["ddpm100", "paraddpm100", "ddim10", "paraddim15"])
    out: str = "outputs/quickstart"
    workers: int | None = None
    restart: bool = False


class Stages:
    """Says which stage runs, what it does, and how long is left in total."""

    def __init__(self, names: list[str]):
        self.names, self.start = names, time.monotonic()

    def begin(self, i: int, what: str) -> float:
        left = sum(ESTIMATE_MIN[n] for n in self.names[i:])
        print(f"[{i + 1}/{len(self.names)}] {what} (about {ESTIMATE_MIN[self.names[i]]:.0f} min; "
              f"about {left:.0f} min left in all)", flush=True)
        return time.monotonic()

    def end(self, i: int, started: float, note: str = "") -> None:
        took = (time.monotonic() - started) / 60
        print(f"[{i + 1}/{len(self.names)}] done in {took:.1f} min{note}", flush=True)


def _store_ok(path: Path, n_demos: int, task: str) -> bool:
    from envs.errors import UserError
    from envs.store import open_store

    try:
        with open_store(path, task=task) as store:
            return store.n_episodes >= n_demos
    except (UserError, OSError, ValueError):
        return False


def quickstart(cfg: QuickstartConfig) -> Path:
    import torch

    from envs.collect import collect, store_attrs
    from envs.store import write_store
    from policy.checkpoint import latest
    from policy.train import TrainConfig, train
    from rollouts.evaluate import EvalConfig, evaluate

    task = cfg.task.name
    root = Path(cfg.out)
    if cfg.restart and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    data, run, evaluation = root / f"{task}.zarr", root / "train", root / "eval"
    stages = Stages(["collect", "train", "eval"])
    total = time.monotonic()

    t = stages.begin(0, f"collecting {cfg.n_demos} scripted {task} demonstrations into {data}")
    if _store_ok(data, cfg.n_demos, task):
        stages.end(0, t, ": reusing the store already there")
    else:
        episodes, failed = collect(task, cfg.n_demos, seed=0, workers=cfg.workers or os.cpu_count() or 1)
        keys = ("obs", "action", "state", "reward", "success")
        write_store(data, [{k: e[k] for k in keys} for e in episodes], store_attrs(task, episodes, failed, 0),
                    overwrite=True)
        stages.end(0, t, f": {len(episodes)} demonstrations, {len(failed)} expert failures")

    t = stages.begin(1, f"training the diffusion policy for {cfg.steps} steps into {run} (Ctrl-C and rerun resumes)")
    ckpt = latest(run)
    if ckpt is not None and int(ckpt.name.split("-")[-1]) >= cfg.steps:
        stages.end(1, t, f": reusing {ckpt}")
    else:
        ckpt = train(TrainConfig(task=TaskConfig(task), data=str(data), out=str(run), steps=cfg.steps,
                                 threads=min(2, torch.get_num_threads())))
        stages.end(1, t)

    t = stages.begin(2, f"evaluating {', '.join(cfg.samplers)} on {cfg.episodes} episodes each into {evaluation}")
    evaluate(EvalConfig(checkpoint=str(ckpt), samplers=list(cfg.samplers), episodes=cfg.episodes,
                        out=str(evaluation), workers=cfg.workers, data=str(data)))
    stages.end(2, t)
    print(f"quickstart finished in {(time.monotonic() - total) / 60:.1f} min; plot: {evaluation / 'pareto.png'}")
    return evaluation


@command("quickstart", QuickstartConfig)
def main(cfg) -> None:
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(cfg, resolve=True)
    raw["task"] = TaskConfig(**raw["task"])
    quickstart(QuickstartConfig(**raw))


if __name__ == "__main__":
    main()
