"""The strategies of a task's mixed-proficiency demonstrations, and which one an action chunk takes.

Where a task's mh operators choose between two strategies at a decision state (square: turn the
nut clockwise or counter-clockwise to the nearest alignment that fits the peg; can: carry it past
the near or the far end of the divider between the bins), the chunk a
policy plans there shows which one it follows, or that it follows neither (it averages them).
The offline fidelity table counts these. Nothing here imports the simulator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

from envs.tasks import DIVIDER, POS_SCALE, ROT_SCALE

STRATEGIES = ("clockwise", "counterclockwise")  # square's
CAN_STRATEGIES = ("near", "far")  # past the divider's end towards the robot, or its far end
BETWEEN = -1  # a chunk that takes neither strategy

# Square: nut headings that fit the peg with the hand in reach (the handle towards the robot or to
# either side; pointing away, the hand is out of reach).
SQUARE_ALIGNMENTS = (math.pi / 2, math.pi, 3 * math.pi / 2)
# A chunk whose commanded turn stays under this (rad, over the chunk) turns neither way.
SQUARE_DEAD_ZONE = 1.0
# Decision states whose two turns are both at least this far (rad) tell the strategies apart.
SQUARE_DECISIVE = 0.35
CAN_RADIUS = 0.033  # m: a chunk passing the divider's end by less takes the can into it


def square_turns(nut_yaw: float) -> tuple[float, float]:
    """How far the nut turns from heading `nut_yaw` under each strategy: (clockwise <= 0,
    counter-clockwise > 0), to the nearest alignment either way."""
    ahead = sorted((a - nut_yaw) % (2 * math.pi) for a in SQUARE_ALIGNMENTS)
    return ahead[-1] - 2 * math.pi, ahead[0] if ahead[0] > 0 else ahead[1]


def nut_yaw(obs: np.ndarray, layout: dict) -> float:
    """The square nut's heading (its x axis in the world xy plane) in a low-dim observation: the
    `object` block of NutAssemblySquare holds the nut's pose relative to the hand (position,
    quaternion), then its pose in the world (position, quaternion x, y, z, w)."""
    start = layout["object"][0] + 10
    rot = Rotation.from_quat(np.asarray(obs[start:start + 4], dtype=np.float64)).as_matrix()
    return math.atan2(rot[1, 0], rot[0, 0])


@dataclass(frozen=True)
class SquareModes:
    """Square's two strategies told apart by the wrist turn a chunk commands."""

    names: tuple[str, ...] = STRATEGIES

    def decisive(self, obs_history: np.ndarray, layout: dict) -> bool:
        """Whether both strategies would turn the nut clearly from this state."""
        return min(abs(t) for t in square_turns(nut_yaw(obs_history[-1], layout))) >= SQUARE_DECISIVE

    def classify(self, actions: np.ndarray, obs_history: np.ndarray, layout: dict) -> np.ndarray:
        """Each raw chunk's strategy [M] (an index into `names`, or BETWEEN) from chunks [M, H, 7]
        planned at `obs_history`: the sign of the yaw turn it commands (the base frame's z is the
        world's)."""
        turn = np.asarray(actions)[..., 5].sum(axis=-1) * ROT_SCALE
        return np.where(turn <= -SQUARE_DEAD_ZONE, 0, np.where(turn >= SQUARE_DEAD_ZONE, 1, BETWEEN))


def eef_xy(obs: np.ndarray, layout: dict) -> np.ndarray:
    """The grip site's world x, y in a low-dim observation."""
    start = layout["robot0_eef_pos"][0]
    return np.asarray(obs[start:start + 2], dtype=np.float64)


@dataclass(frozen=True)
class CanModes:
    """Can mh's two ways round the divider, told apart by where a chunk's planned path crosses
    the divider's line: beyond its near end, beyond its far end, or through it (between)."""

    names: tuple[str, ...] = CAN_STRATEGIES
    before: float = 0.12  # m short of the divider's line: far enough for either way to be open

    def decisive(self, obs_history: np.ndarray, layout: dict) -> bool:
        """Whether the hand is still well short of the divider, with both ways round open."""
        return bool(eef_xy(obs_history[-1], layout)[1] <= DIVIDER.y - self.before)

    def classify(self, actions: np.ndarray, obs_history: np.ndarray, layout: dict) -> np.ndarray:
        """Each raw chunk's way round [M] (index into `names`, or BETWEEN) from chunks [M, H, 7]:
        the hand's path the chunk commands (the base frame's axes are the world's), from where the
        hand is, crosses the divider's line (y) at some x; a chunk that stops short of the line
        is extended along the way it went. Past an end by the can's radius counts as that way."""
        start = eef_xy(obs_history[-1], layout)
        path = start + np.cumsum(np.asarray(actions, np.float64)[..., :2], axis=-2) * POS_SCALE  # [M, H, 2]
        path = np.concatenate([np.broadcast_to(start, (*path.shape[:-2], 1, 2)), path], axis=-2)
        crossed = path[..., 1] >= DIVIDER.y
        reaches = crossed.any(-1)
        # the step across the line, or (a chunk short of it) the whole chunk from start to end
        k = np.argmax(crossed, -1).clip(1)

        def point(i: np.ndarray) -> np.ndarray:
            return np.take_along_axis(path, i[..., None, None].repeat(2, -1), -2)[..., 0, :]

        a = np.where(reaches[..., None], point(k - 1), path[..., 0, :])
        b = np.where(reaches[..., None], point(k), path[..., -1, :])
        dy = b[..., 1] - a[..., 1]
        heading_across = (dy > 1e-6) & (path[..., -1, 1] - start[1] > 0.02)
        x = a[..., 0] + (b[..., 0] - a[..., 0]) * (DIVIDER.y - a[..., 1]) / np.where(heading_across, dy, 1.0)
        near, far = DIVIDER.ends
        label = np.where(x < near - CAN_RADIUS, 0, np.where(x > far + CAN_RADIUS, 1, BETWEEN))
        return np.where(heading_across, label, BETWEEN)


MODES = {"square": SquareModes(), "can": CanModes()}


def task_modes(task: str | None):
    """The task's strategies (`names`, `decisive`, `classify`), or None where it defines none."""
    return MODES.get(task or "")
