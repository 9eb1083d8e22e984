"""The task registry: which robosuite environment each task name builds, and with what settings.

Adding a task means adding a `TaskSpec` here (plus its expert and `conf/task/<name>.yaml`).
Nothing in this module imports robosuite.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from envs.errors import UserError

# robomimic's low-dim observation keys, in the order they are concatenated into the vector.
OBS_KEYS: tuple[str, ...] = ("object", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")

CONTROL_FREQ = 20  # Hz, robomimic's PH protocol
HORIZON = 400  # control steps per episode, robomimic's PH protocol
ACTION_DIM = 7  # OSC_POSE delta: dx dy dz, axis-angle drx dry drz, gripper (-1 open, +1 close)


@dataclass
class TaskConfig:
    """The `task` config group of every command (conf/task/<name>.yaml)."""

    name: str = "lift"


class UnknownTaskError(UserError, ValueError):
    """A task name that is not in the registry."""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    env_name: str  # robosuite environment class
    object_dim: int  # size of robosuite's "object-state" vector for this task
    robot: str = "Panda"
    controller: str = "BASIC"  # robosuite composite controller; its arm part is OSC_POSE (delta)
    control_freq: int = CONTROL_FREQ
    horizon: int = HORIZON
    env_kwargs: dict = field(default_factory=dict)

    @property
    def obs_layout(self) -> dict[str, tuple[int, int]]:
        """Key -> (start, stop) slice of the flat observation vector."""
        sizes = {"object": self.object_dim, "robot0_eef_pos": 3, "robot0_eef_quat": 4, "robot0_gripper_qpos": 2}
        layout, start = {}, 0
        for key in OBS_KEYS:
            layout[key] = (start, start + sizes[key])
            start += sizes[key]
        return layout

    @property
    def obs_dim(self) -> int:
        return sum(b - a for a, b in self.obs_layout.values())

    def env_settings(self) -> dict:
        """Everything that determines the simulated task, as plain data (recorded in stores)."""
        return {
            "task": self.name,
            "env_name": self.env_name,
            "robots": self.robot,
            "controller": self.controller,
            "control_freq": self.control_freq,
            "horizon": self.horizon,
            "reward_shaping": False,
            **self.env_kwargs,
        }


TASKS: dict[str, TaskSpec] = {
    "lift": TaskSpec("lift", "Lift", object_dim=10),
    "can": TaskSpec("can", "PickPlaceCan", object_dim=14),
    "square": TaskSpec("square", "NutAssemblySquare", object_dim=14),
}


def get_task(name: str) -> TaskSpec:
    """The spec of task `name`; raises UnknownTaskError naming the known tasks."""
    try:
        return TASKS[name]
    except KeyError:
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None
