"""Simulation and demonstrations: robosuite tasks as gymnasium envs, scripted experts, the store.

Importing this package does not import robosuite; environments are built lazily by `make_env`.
"""

from envs.tasks import OBS_KEYS, TASKS, TaskSpec, UnknownTaskError, get_task


def make_env(task: str, seed: int | None = None, render: bool = False, **kwargs):
    """A gymnasium env for `task` (lift, can or square); builds the simulator on first use."""
    from envs.robosuite_env import make_env as _make_env

    return _make_env(task, seed=seed, render=render, **kwargs)


__all__ = ["OBS_KEYS", "TASKS", "TaskSpec", "UnknownTaskError", "get_task", "make_env"]
