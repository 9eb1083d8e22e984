"""The strategies of a task's mixed-proficiency demonstrations, and which one an action chunk takes.

Where a task's mh operators choose between two strategies at a decision state (square: turn the
nut clockwise or counter-clockwise to the nearest alignment that fits the peg), the chunk a
policy plans there shows which one it follows, or that it follows neither (it averages them).
The offline fidelity table counts these. Nothing here imports the simulator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

STRATEGIES = ("clockwise", "counterclockwise")
BETWEEN = -1  # a chunk that takes neither strategy

# Square: nut headings that fit the peg with the hand in reach (the handle towards the robot or to
# either side; pointing away, the hand is out of reach).
SQUARE_ALIGNMENTS = (math.pi / 2, math.pi, 3 * math.pi / 2)
ROT_SCALE = 0.5  # rad per step at action 1.0 (the OSC controller's output limit)
# A chunk whose commanded turn stays under this (rad, over the chunk) turns neither way.
SQUARE_DEAD_ZONE = 1.0
# Decision states whose two turns are both at least this far (rad) tell the strategies apart.
SQUARE_DECISIVE = 0.35


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

    def classify(self, actions: np.ndarray) -> np.ndarray:
        """Each raw chunk's strategy [M] (an index into `names`, or BETWEEN) from chunks [M, H, 7]:
        the sign of the yaw turn it commands (the base frame's z is the world's)."""
        turn = np.asarray(actions)[..., 5].sum(axis=-1) * ROT_SCALE
        return np.where(turn <= -SQUARE_DEAD_ZONE, 0, np.where(turn >= SQUARE_DEAD_ZONE, 1, BETWEEN))


MODES = {"square": SquareModes()}


def task_modes(task: str | None):
    """The task's strategies (`names`, `decisive`, `classify`), or None where it defines none."""
    return MODES.get(task or "")
