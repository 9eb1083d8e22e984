"""Action chunks on the control clock: which action to execute at each control step when chunks
arrive late and overlap.

A chunk planned from the observation read at control step `k` holds the actions for steps
`k, k+1, ...`. It arrives some steps later; the actions whose step has already passed are skipped
(diffusion_policy's real-robot runner drops them the same way). Where several chunks cover a step,
their actions are merged by one rule:

- `latest`: the newest chunk's action only;
- `average`: folded in arrival order, `a = (1 - alpha) a_older + alpha a_newer` (LeRobot's
  weighted-average aggregation of an arriving chunk with the queue);
- `act`: ACT's temporal ensembling, weights `exp(-m i)` with `i = 0` for the oldest chunk
  covering the step, normalised.

Written here rather than taken from LeRobot or ACT: both keep this logic inside their policy
classes, tied to their own queues and tensors, with no standalone API.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# the loop's rtc merges as latest, its plans inpainted (rollouts.realtime)
MERGES = ("latest", "average", "act")


@dataclass
class Chunk:
    start: int  # the control step of actions[0]
    actions: np.ndarray  # [n, action_dim]
    t_obs: float  # timestamp of the newest observation it was planned from

    @property
    def end(self) -> int:  # the first step after it
        return self.start + len(self.actions)


@dataclass
class Scheduled:
    action: np.ndarray
    t_obs: float  # the observation time behind the action (weighted like the action when merged)
    chunks: int  # how many chunks were merged into it


class ActionSchedule:
    def __init__(self, merge: str = "latest", alpha: float = 0.5, act_m: float = 0.01):
        if merge not in MERGES:
            raise ValueError(f"merge: {merge!r} is not one of {', '.join(MERGES)}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"merge_alpha: {alpha} is not in (0, 1]")
        self.merge, self.alpha, self.act_m = merge, alpha, act_m
        self.chunks: list[Chunk] = []  # in arrival order

    def add(self, actions: np.ndarray, start: int, now: int, t_obs: float) -> int:
        """Take a chunk planned for steps `start...` arriving at step `now`; returns how many of its
        actions were skipped because their step had passed."""
        skipped = min(max(now - start, 0), len(actions))
        if skipped < len(actions):
            self.chunks.append(Chunk(start + skipped, np.asarray(actions[skipped:]), t_obs))
        return skipped

    def remaining(self, step: int) -> int:
        """Steps from `step` on that some chunk covers (0: the robot would have nothing to execute)."""
        return max([c.end - step for c in self.chunks] + [0])

    def upcoming(self, step: int, n: int) -> np.ndarray:
        """The actions [m <= n, action_dim] that will be sent from `step` on as things stand (no
        new chunk), up to the first step no chunk covers."""
        out = []
        for s in range(step, step + n):
            merged = self._merged(s)
            if merged is None:
                break
            out.append(merged.action)
        if not out:
            return np.zeros((0, self.chunks[0].actions.shape[1] if self.chunks else 0), np.float32)
        return np.stack(out).astype(np.float32)

    def pop(self, step: int) -> Scheduled | None:
        """The action for `step` (None if no chunk covers it); chunks that end by then are dropped."""
        self.chunks = [c for c in self.chunks if c.end > step]
        return self._merged(step)

    def _merged(self, step: int) -> Scheduled | None:
        """The chunks covering `step`, merged by the rule (None if none covers it)."""
        covering = [c for c in self.chunks if c.start <= step < c.end]
        if not covering:
            return None
        acts = np.stack([c.actions[step - c.start] for c in covering])
        times = np.array([c.t_obs for c in covering])
        w = self._weights(len(covering))
        return Scheduled(w @ acts, float(w @ times), len(covering))

    def _weights(self, n: int) -> np.ndarray:
        """Weights of `n` covering chunks, oldest first, summing to 1."""
        if self.merge == "latest":
            w = np.zeros(n)
            w[-1] = 1.0
        elif self.merge == "average":  # (1-a)^(n-1), ..., (1-a) a, a: the arrival-order fold
            w = np.array([self.alpha * (1 - self.alpha) ** (n - 1 - i) for i in range(n)])
            w[0] = (1 - self.alpha) ** (n - 1)
        else:
            w = np.exp(-self.act_m * np.arange(n))
        return w / w.sum()
