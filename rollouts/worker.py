"""dp-eval's episode worker: a process that loads the policy and its env once, then runs episode
jobs and returns each one's record (a dict for `episodes.jsonl`).

Three kinds of process run it: a pool worker (`init_worker` as the pool's initializer, then
`run_job` per job), dp-eval itself with one worker, and a Ray worker (`rollouts.cluster`, which
loads again only when an evaluation's `WorkerInit` differs from the one it holds). The state is
one per process, `state`, as a pool worker can hold nothing else between jobs.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.cli import ignore_ctrl_c_in_worker
from policy.samplers import SamplerConfig
from rollouts.realtime import LoopConfig


@dataclass(frozen=True)
class WorkerInit:
    """What a worker loads once (compared by a Ray worker to know an evaluation's first task)."""

    checkpoint: str
    device: str
    threads: int  # torch threads
    loop: dict | None = None  # the real-time loop's settings (`LoopConfig`'s fields); None: not real time
    pooled: bool = False  # a pool worker: the parent answers Ctrl-C and stops the pool
    horizon: int | None = None  # control steps an episode may take (None: the task's)


@dataclass
class Worker:
    """This process's worker: what `init_worker` loaded, and what its jobs keep for the next ones."""

    init: WorkerInit | None = None
    policy: Any = None
    env: Any = None
    checkpoint: str | None = None
    device: str | None = None  # the device the policy was loaded on (as given: dp-eval resolves `auto`)
    threads: int | None = None
    loop: LoopConfig | None = None
    render_env: Any = None  # the env that renders videos, made by the first job with one
    warmed_up: set[str] = field(default_factory=set)  # labels whose first plans were run untimed
    server: Any = None  # realtime with transport=server: the dp-serve process of `server_label`
    client: Any = None
    server_label: str | None = None


state = Worker()


def init_worker(init: WorkerInit) -> None:
    """Load the policy and env of `init` into `state` (what a previous init left otherwise stays)."""
    if init.pooled:
        ignore_ctrl_c_in_worker()  # the parent answers Ctrl-C and stops the pool
    import torch

    import policy
    from rollouts.runner import make_policy_env

    torch.set_num_threads(init.threads)
    state.policy = policy.load(init.checkpoint, device=init.device)
    state.env = make_policy_env(state.policy, horizon=init.horizon)
    state.threads, state.checkpoint, state.device = init.threads, init.checkpoint, init.device
    state.loop = LoopConfig(**init.loop) if init.loop is not None else None
    state.init = init


def _warm_up(label: str, plan) -> None:
    """A worker's first plans pay for allocations and caches; keep them out of the latencies."""
    if label not in state.warmed_up:
        pol = state.policy
        for _ in range(3):
            plan(pol.neutral_obs()[0].cpu().numpy())
        state.warmed_up.add(label)


def _planner(label: str, sampler: SamplerConfig):
    """The real-time loop's planner for `sampler`: the worker's policy in a thread, or a dp-serve
    process of its own (one at a time: a new sampler's server replaces the previous one)."""
    from rollouts.realtime import LocalPlanner, RemotePlanner

    if state.loop.transport == "local":
        state.policy.sampler = sampler
        planner = LocalPlanner(state.policy)
    else:
        from rollouts.client import PolicyClient, ServerProcess

        if state.server_label != label:
            close_server()
            state.server = ServerProcess(state.checkpoint, sampler, threads=state.threads,
                                         device=state.device)
            state.client = PolicyClient(state.server.host, state.server.port)
            state.server_label = label
            state.warmed_up.discard(label)  # a new process pays its first plans again
        planner = RemotePlanner(state.client)
    _warm_up(label, lambda obs: planner.plan(obs, planner.max_actions))
    return planner


def close_server() -> None:
    """Stop this worker's dp-serve process, if it has one (a pool worker's dies with the worker)."""
    for name in ("client", "server"):
        part = getattr(state, name)
        if part is not None:
            setattr(state, name, None)
            part.close()
    state.server_label = None


def _run_realtime_job(job: dict, record: dict) -> dict:
    from rollouts.realtime import loop_summary, run_realtime_episode
    from rollouts.robot import SimRobot

    planner = _planner(job["label"], SamplerConfig(**job["config"]))
    loop = state.loop
    robot = SimRobot(state.env, period=1.0 / loop.rate_hz if loop.rate_hz else None)
    r, stats = run_realtime_episode(robot, planner, job["seed"], loop)
    # plans: dicts with the loop's fields
    record.update(_outcome(r), plans=r.plans, realtime=loop_summary(stats), backend=planner.backend)
    return record


def _outcome(r) -> dict:
    """The JSON fields of an `EpisodeResult`, plans aside."""
    return {"success": bool(r.success), "max_reward": float(r.max_reward), "return_": float(r.return_),
            "length": int(r.length), "error": r.error}


def _run_episode_job(job: dict, record: dict) -> dict:
    from rollouts.runner import run_episode

    pol = state.policy
    render = job["video"] is not None
    pol.sampler = SamplerConfig(**job["config"])
    pol.prepare()  # window=auto chosen, runtime calls compiled (cached after a label's first episode)
    _warm_up(job["label"], pol.plan)
    if render and state.render_env is None:
        from rollouts.runner import make_policy_env

        state.render_env = make_policy_env(pol, render=True, horizon=state.init.horizon)
    r = run_episode(state.render_env if render else state.env, pol, job["seed"], render=render)
    record.update(_outcome(r), plans=[dataclasses.asdict(p) for p in r.plans], backend=pol.backend)
    if render:
        from rollouts.video import write_video

        write_video(Path(job["video"]), r, job["label"])
        record["video"] = job["video"]
    return record


def run_job(job: dict) -> dict:
    """One episode of `job` (label, sampler config, seed, episode index, video path or None) as
    its record; an episode that raises is recorded as a failure with its reason, never dropped."""
    record = {"sampler": job["label"], "seed": job["seed"], "episode": job["episode"], "pid": os.getpid(),
              "threads": state.threads}
    try:
        if state.loop is not None:
            return _run_realtime_job(job, record)
        return _run_episode_job(job, record)
    except Exception as err:
        record.update(success=False, max_reward=0.0, return_=0.0, length=0, plans=[],
                      error=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    return record
