"""The closed-loop runner: one episode of a task driven by a policy's plans.

The policy sees the last `n_obs_steps` observations (the first one repeated at the start), plans
a chunk, and the runner executes `n_action_steps` of it before planning again.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from policy.safety import NonFiniteActions


@dataclass
class PlanRecord:
    step: int  # control step at which the plan was made
    latency_ms: float
    model_evals: int
    parallel_iters: int
    converged: bool


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


def run_episode(env, policy, seed: int, render: bool = False) -> EpisodeResult:
    """Run one episode from `env.reset(seed=seed)` until success or the env's horizon.

    The policy's noise is seeded with `seed` too, so an episode is reproducible."""
    obs, _ = env.reset(seed=seed)
    policy.seed(seed)
    history = deque([obs] * policy.cfg.n_obs_steps, maxlen=policy.cfg.n_obs_steps)
    result = EpisodeResult(seed=seed, success=False, max_reward=0.0, return_=0.0, length=0,
                           frames=[env.render()] if render else None)
    done = False
    while not done:
        since = result.length - result.plans[-1].step if result.plans else None  # a warm sampler's advance
        try:
            plan = policy.plan(np.stack(history), advance=since)
        except NonFiniteActions:  # refused by the policy: nothing of it is executed, and it is no success
            result.error = f"non-finite action at step {result.length}"
            result.success = False
            return result
        result.plans.append(PlanRecord(result.length, plan.latency_ms, plan.model_evals, plan.parallel_iters,
                                       plan.converged))
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
                result.frames.append(env.render())
            done = terminated or truncated
            if done:
                break
    return result
