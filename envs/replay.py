"""Replaying a stored episode in the simulator, to check that a store means what it says."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ReplayCheck:
    episode: int
    seed: int
    steps: int
    max_obs_diff: float  # max |replayed obs - recorded obs| over the episode
    success: bool  # the replay reached the task's success


def replay_episode(store, i: int, env=None) -> ReplayCheck:
    """Reset to episode `i`'s seed, restore its first saved state and execute its actions."""
    from envs.robosuite_env import make_env

    ep = store.episode(i)
    seed = int(store.attrs["episode_seeds"][i])
    env = env or make_env(store.task, scene=store.attrs.get("scene"))
    env.reset(seed=seed)  # the seed fixes the model (Lift's cube size); the state does the rest
    obs = [env.set_state(ep["state"][0])]
    success = False
    for action in ep["action"]:
        o, _, _, _, info = env.step(action)
        obs.append(o)
        success = success or info["success"]
    diff = float(np.abs(np.asarray(obs[:-1]) - ep["obs"]).max())
    return ReplayCheck(i, seed, len(ep["action"]), diff, success)
