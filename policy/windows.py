"""Training windows over a demonstration store, as Diffusion Policy samples them.

A window starting at step s of an episode holds observations s .. s+n_obs-1 and actions
s .. s+horizon-1. Starts range from -(n_obs-1) (so the first action of an episode is predicted
from a history padded with the first observation) to len-n_action_steps (so the last executed
actions exist); indices outside the episode repeat its first or last step.
"""

from __future__ import annotations

import numpy as np

from common.errors import UserError


def episode_split(n_episodes: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Episode indices (train, val); at least one training episode, val may be empty."""
    if n_episodes < 1:
        raise UserError("store: has no episodes")
    order = np.random.default_rng(seed).permutation(n_episodes)
    n_val = min(int(round(val_fraction * n_episodes)), n_episodes - 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def window_index(episode_ends: np.ndarray, episodes: np.ndarray, horizon: int, n_obs: int,
                 n_action: int) -> np.ndarray:
    """Rows (episode_start, episode_end, window_start) of every window of the given episodes."""
    starts = np.concatenate([[0], episode_ends[:-1]])
    rows = []
    for e in episodes:
        a, b = int(starts[e]), int(episode_ends[e])
        for s in range(-(n_obs - 1), (b - a) - n_action + 1):
            rows.append((a, b, a + s))
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3)


def gather(data, rows: np.ndarray, length: int) -> np.ndarray:
    """data[start + 0 .. start + length-1] for each row, clamped to its episode (edge padding)."""
    a, b, s = rows[:, 0:1], rows[:, 1:2], rows[:, 2:3]
    idx = np.clip(s + np.arange(length)[None, :], a, b - 1)
    return data[idx]


class Observations:
    """A store's observations as a policy sees them: the flat vector of its observation layout,
    assembled per window from the store's arrays (camera frames stay uint8 in memory, 4x less
    than float32, and become float only for the windows drawn). Indexing with an integer array
    `idx` [...] gives float32 [..., dim]."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        self.dim = sum(int(np.prod(p.shape[1:])) for p in parts)

    def __len__(self) -> int:
        return len(self.parts[0])

    def __getitem__(self, idx) -> np.ndarray:
        idx = np.asarray(idx)
        return np.concatenate([p[idx].reshape(*idx.shape, -1).astype(np.float32) for p in self.parts],
                              axis=-1)


def read_observations(store, obs_cfg, where: str) -> Observations:
    """The observations of `store` for a policy observing `obs_cfg` (`envs.tasks.ObsConfig`):
    `data/obs` for state; for images its proprioceptive columns (found by key in the store's
    `obs_layout`) then each camera's `data/<camera>_image`. UserError naming the store and what
    it lacks."""
    from envs.tasks import PROPRIO_KEYS, get_task

    if "obs" not in store.keys:
        raise UserError(f"{where}: data/obs: missing")
    obs = np.asarray(store["obs"], dtype=np.float32)
    if not obs_cfg.image:
        return Observations([obs])
    layout = store.attrs.get("obs_layout") or {k: list(v)
                                               for k, v in get_task(store.task or "lift").obs_layout.items()}
    missing = [k for k in PROPRIO_KEYS if k not in layout]
    if missing:
        raise UserError(f"{where}: obs_layout has no {', '.join(missing)}: cannot take "
                        "the proprioceptive keys")
    cols = np.concatenate([np.arange(*layout[k]) for k in PROPRIO_KEYS])
    parts = [obs[:, cols]]
    for key in obs_cfg.image_keys:
        if key not in store.keys:
            raise UserError(f"{where}: data/{key}: missing (an image store holds each camera's frames; "
                            f"dp-collect obs=image, or dp-import in=<low-dim store> obs=image renders them)")
        frames = store[key]
        if frames.dtype != np.uint8 or frames.shape[1:] != obs_cfg.image_shape:
            raise UserError(f"{where}: data/{key}: {frames.dtype} {frames.shape[1:]}, the policy takes uint8 "
                            f"{obs_cfg.image_shape}")
        parts.append(frames)
    return Observations(parts)


def _episodes(policy, data: str, split: str) -> tuple[Observations, np.ndarray, np.ndarray, np.ndarray]:
    """A store's observations, actions and episode ends, checked against the policy, and the
    episodes of `split` ("train" or "val": the policy's own split; all episodes when it has none)."""
    from envs.store import open_store

    with open_store(data, task=policy.meta.get("task")) as store:
        obs = read_observations(store, policy.obs_config, str(data))
        action = np.asarray(store["action"], dtype=np.float32)
        ends = store.episode_ends
    if obs.dim != policy.obs_dim:
        raise UserError(f"{data}: data/obs has {obs.dim} dims; the policy takes {policy.obs_dim}")
    if action.shape[1] != policy.action_dim:
        raise UserError(f"{data}: data/action has {action.shape[1]} dims; the policy "
                        f"takes {policy.action_dim}")
    episodes = np.asarray(policy.meta.get(f"{split}_episodes") or [], dtype=np.int64)
    if not len(episodes) or episodes.max() >= len(ends):
        episodes = np.arange(len(ends))
    return obs, action, ends, episodes


def sample_windows(policy, data: str, split: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` random windows of a store's episodes as the policy sees them: observation histories
    [n, n_obs, obs_dim] and action chunks [n, horizon, action_dim], from the episodes of `split`."""
    obs, action, ends, episodes = _episodes(policy, data, split)
    c = policy.cfg
    rows = window_index(ends, episodes, c.horizon, c.n_obs_steps, c.n_action_steps)
    pick = np.random.default_rng(seed).choice(len(rows), size=n, replace=len(rows) < n)
    return gather(obs, rows[pick], c.n_obs_steps), gather(action, rows[pick], c.horizon)


def episode_sequences(policy, data: str, split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` observation histories [n, n_obs, obs_dim] as a closed loop meets them: episode after
    episode, one every `n_action_steps` steps from each episode's start (consecutive plans are
    real neighbours), and a flag [n] marking each episode's first."""
    obs, _, ends, episodes = _episodes(policy, data, split)
    c, starts, rows, first = policy.cfg, np.concatenate([[0], ends[:-1]]), [], []
    while len(rows) < n:
        for e in episodes:
            a, b = int(starts[e]), int(ends[e])
            for k, step in enumerate(range(0, b - a, c.n_action_steps)):
                rows.append((a, b, a + step - (c.n_obs_steps - 1)))
                first.append(k == 0)
    rows = np.asarray(rows[:n], dtype=np.int64)
    return gather(obs, rows, c.n_obs_steps), np.asarray(first[:n])


def decision_histories(policy, data: str, split: str = "val") -> np.ndarray:
    """The observation histories [n, n_obs, obs_dim] at which the strategies of a mixed-proficiency
    store's `split` episodes diverge (`meta/decision_step`), one per episode that reached it; none
    [0, n_obs, obs_dim] for a store that records no decisions."""
    from envs.store import open_store

    with open_store(data, task=policy.meta.get("task")) as store:
        steps = store.episode_meta.get("decision_step")
    obs, _, ends, episodes = _episodes(policy, data, split)
    c = policy.cfg
    if steps is None:
        return np.zeros((0, c.n_obs_steps, obs.dim), np.float32)
    starts = np.concatenate([[0], ends[:-1]])
    rows = [(starts[e], ends[e], starts[e] + steps[e] - (c.n_obs_steps - 1))
            for e in episodes if steps[e] >= 0]
    return gather(obs, np.asarray(rows, dtype=np.int64).reshape(-1, 3), c.n_obs_steps)
