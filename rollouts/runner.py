"""The closed-loop runner: one episode of a task driven by a policy's plans.

The policy sees the last `n_obs_steps` observations (the first one repeated at the start), plans
a chunk, and the runner executes `n_action_steps` of it before planning again.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from policy.safety import NonFiniteActions, ObservationOutOfRange, UnsafeActions


@dataclass
class PlanRecord:
    step: int  # control step at which the plan was made
    latency_ms: float
    model_evals: int
    parallel_iters: int
    converged: bool
    encode_ms: float = 0.0  # of latency_ms: the observation encoder (image policies)


@dataclass
class EpisodeResult:
    seed: int
    success: bool
    max_reward: float
    return_: float
    length: int
    plans: list[PlanRecord] = field(default_factory=list)
    error: str | None = None  # why the episode crashed (simulator instability, NaN action), if it did
    frames: list[np.ndarray] | None = None


def check_simulated(policy) -> None:
    """UserError unless a simulator runs `policy`'s task: a policy trained on an imported dataset
    (task=external) has none, so no command can run episodes of it."""
    from common.errors import UserError
    from envs.tasks import EXTERNAL

    if policy.meta.get("task") == EXTERNAL:
        raise UserError(f"{policy.meta.get('checkpoint', 'checkpoint')}: trained on an imported dataset "
                        "(task=external), which no simulator here runs, so it has no episodes; serve it to "
                        "the robot with dp-serve, or time its plans with dp-bench")


def make_policy_env(policy, **kwargs):
    """The env `policy` acts in: its task in the scene of its demonstrations, observing what it
    was trained on (state, or its cameras at its size); UserError if the layouts disagree or no
    simulator runs its task."""
    from envs import make_env
    from policy.checkpoint import check_matches

    check_simulated(policy)
    task = policy.meta["task"]
    env = make_env(task, obs=policy.obs_config, scene=policy.meta.get("scene"), **kwargs)
    check_matches(policy, task, env.observation_layout)
    return env


def video_frame(env) -> np.ndarray:
    """The scene camera's frame, and beside it, for an image policy, what its own cameras saw
    (scaled up to the same height)."""
    frame = env.render()
    images = list(env.images().values()) if getattr(env, "obs", None) is not None and env.obs.image else []
    for image in images:
        k = max(1, frame.shape[0] // image.shape[0])
        big = np.repeat(np.repeat(image, k, axis=0), k, axis=1)
        pad = np.zeros((frame.shape[0], big.shape[1], 3), np.uint8)
        pad[: big.shape[0]] = big[: frame.shape[0]]
        frame = np.concatenate([frame, pad], axis=1)
    return frame


def run_episode(env, policy, seed: int, render: bool = False) -> EpisodeResult:
    """Run one episode from `env.reset(seed=seed)` until success or the env's horizon.

    The policy's noise is seeded with `seed` too, so an episode is reproducible."""
    obs, _ = env.reset(seed=seed)
    policy.seed(seed)
    history = deque([obs] * policy.cfg.n_obs_steps, maxlen=policy.cfg.n_obs_steps)
    result = EpisodeResult(seed=seed, success=False, max_reward=0.0, return_=0.0, length=0,
                           frames=[video_frame(env)] if render else None)
    done = False
    while not done:
        since = result.length - result.plans[-1].step if result.plans else None  # a warm sampler's advance
        try:
            plan = policy.plan(np.stack(history), advance=since)
        except UnsafeActions as err:  # refused by the policy: nothing of it is executed, and it is no success
            kind = ("non-finite action" if isinstance(err, NonFiniteActions)
                    else "observation far outside the trained range" if isinstance(err, ObservationOutOfRange)
                    else "action outside the trained range")
            result.error = f"{kind} at step {result.length}"
            result.success = False
            return result
        result.plans.append(PlanRecord(result.length, plan.latency_ms, plan.model_evals, plan.parallel_iters,
                                       plan.converged, plan.encode_ms))
        for action in plan.actions:
            try:
                obs, reward, terminated, truncated, info = env.step(action)
            except Exception as err:  # MuJoCo instability surfaces as an exception from the sim
                result.error = f"simulator error at step {result.length}: {err}"
                return result
            history.append(obs)
            result.length += 1
            result.return_ += reward
            result.max_reward = max(result.max_reward, reward)
            result.success = result.success or info["success"]
            if render:
                result.frames.append(video_frame(env))
            done = terminated or truncated
            if done:
                break
    return result
