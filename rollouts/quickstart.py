"""`dp-quickstart`: the whole path on lift in one command — collect scripted demonstrations,
train the reference policy, evaluate four samplers, print the table, write the Pareto plot.

Everything lives under `out` (default `outputs/quickstart`). A stage whose result is already
there is reused (training resumes from its latest checkpoint, the evaluation continues its
episode log); `restart=true` starts over. On the slower 2-core CPU measured (2026-12-02): 1 min
of collection, 11 min of training, 2 min of evaluation.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.cli import command
from envs.tasks import TaskConfig

# Minutes per unit of each stage on the slower of the 2-core CPUs measured (2026-12-02): per
# demonstration, per training step (batch 256, 2 threads: 3.0 steps/s), per evaluated episode.
MIN_PER = {"collect": 1.0 / 200, "train": 1 / 3.0 / 60, "eval": 2.0 / 80}


@dataclass
class QuickstartConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    n_demos: int = 200
    steps: int = 2000  # measured: 79/80 episodes at 2000 steps, 77/80 at 1500 (docs/commands.md)
    episodes: int = 20
    samplers: list[str] = field(default_factory=lambda: ["ddpm100", "paraddpm100", "ddim10", "paraddim15"])
    out: str = "outputs/quickstart"
    workers: int | None = None
    restart: bool = False

    def __post_init__(self):
        """Every stage's settings checked now, before anything is collected or removed: a refusal
        of the evaluation's samplers must not come after minutes of collecting and training. One
        line naming the key."""
        from common.checks import check_number
        from common.errors import UserError
        from envs.tasks import get_task
        from policy.samplers import SamplerConfig, aligner_choice

        get_task(self.task.name)  # collect: an unknown task
        for key in ("n_demos", "steps", "episodes"):
            check_number(key, getattr(self, key), 1, integer=True)
        if self.workers is not None:
            check_number("workers", self.workers, 1, integer=True)
        if not self.samplers:
            raise UserError("samplers: empty list")
        for spec in self.samplers:
            if aligner_choice(SamplerConfig.parse(spec)) is not None:  # an unknown preset: one line here
                raise UserError(f"samplers: {spec!r} uses DPM-Aligner timesteps, which the quick start does "
                                "not learn; run dp-align on its policy, then dp-eval")


class Stages:
    """Says which stage runs, what it does, and how long is left in total; `minutes` holds each
    stage's estimate."""

    def __init__(self, minutes: dict[str, float]):
        self.minutes, self.names, self.start = minutes, list(minutes), time.monotonic()

    def begin(self, i: int, what: str) -> float:
        left = sum(self.minutes[n] for n in self.names[i:])
        print(f"[{i + 1}/{len(self.names)}] {what} (about {self.minutes[self.names[i]]:.0f} min; "
              f"about {left:.0f} min left in all)", flush=True)
        return time.monotonic()

    def end(self, i: int, started: float, note: str = "") -> None:
        took = (time.monotonic() - started) / 60
        print(f"[{i + 1}/{len(self.names)}] done in {took:.1f} min{note}", flush=True)


def _store_ok(path: Path, n_demos: int, task: str) -> bool:
    from common.errors import UserError
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
    import policy
    from rollouts.evaluate import EvalConfig, evaluate, loop_deadline

    task = cfg.task.name
    root = Path(cfg.out)
    if cfg.restart and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    data, run, evaluation = root / f"{task}.zarr", root / "train", root / "eval"
    stages = Stages({"collect": MIN_PER["collect"] * cfg.n_demos, "train": MIN_PER["train"] * cfg.steps,
                     "eval": MIN_PER["eval"] * cfg.episodes * len(cfg.samplers)})
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

    t = stages.begin(1, f"training the diffusion policy for {cfg.steps} steps into {run} "
                        "(Ctrl-C and rerun resumes)")
    ckpt = latest(run)
    if ckpt is not None and int(ckpt.name.split("-")[-1]) >= cfg.steps:
        stages.end(1, t, f": reusing {ckpt}")
    else:
        ckpt = train(TrainConfig(task=TaskConfig(task), data=str(data), out=str(run), steps=cfg.steps,
                                 threads=min(2, torch.get_num_threads())))
        stages.end(1, t)

    t = stages.begin(2, f"evaluating {', '.join(cfg.samplers)} on {cfg.episodes} episodes "
                        f"each into {evaluation}")
    spec = EvalConfig(checkpoint=str(ckpt), samplers=list(cfg.samplers), episodes=cfg.episodes,
                      out=str(evaluation), workers=cfg.workers, data=str(data))  # on backend=auto
    # the recommendation for the task's control rate: the time a chunk still covers when the next
    # plan is asked
    spec.deadline_ms = loop_deadline(spec, policy.load(str(ckpt)))
    evaluate(spec)
    stages.end(2, t)
    print(f"quickstart finished in {(time.monotonic() - total) / 60:.1f} min; plot: "
          f"{evaluation / 'pareto.png'}")
    return evaluation


@command("quickstart", QuickstartConfig)
def main(cfg: QuickstartConfig) -> None:
    quickstart(cfg)


if __name__ == "__main__":
    main()
