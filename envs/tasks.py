"""The task registry: which robosuite environment each task name builds, and with what settings.

Adding a task means adding a `TaskSpec` here (plus its expert and `conf/task/<name>.yaml`).
Nothing in this module imports robosuite.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from common.errors import UserError

# robomimic's low-dim observation keys, in the order they are concatenated into the vector.
OBS_KEYS: tuple[str, ...] = ("object", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")
# What a real robot measures of itself (robomimic's image datasets pair these with the cameras).
PROPRIO_KEYS: tuple[str, ...] = OBS_KEYS[1:]
KEY_SIZES = {"robot0_eef_pos": 3, "robot0_eef_quat": 4, "robot0_gripper_qpos": 2}
OBS_MODES = ("state", "image")
DEMO_SETS = ("ph", "mh")  # proficient (one scripted operator) and mixed-proficiency (six operators)

CONTROL_FREQ = 20  # Hz, robomimic's PH protocol
HORIZON = 400  # control steps per episode, robomimic's PH protocol
ACTION_DIM = 7  # OSC_POSE delta: dx dy dz, axis-angle drx dry drz, gripper (-1 open, +1 close)
# The OSC controller's output at action 1.0 (robosuite's BASIC composite config for the Panda).
POS_SCALE = 0.05  # m per step
ROT_SCALE = 0.5  # rad per step


@dataclass(frozen=True)
class Divider:
    """Can mh's divider (envs/scenes.py): a wall across the straight carry path, in the gap
    between the bins (world frame, m). The can is carried round one end or the other."""

    x: float = 0.13  # centre, along the gap
    y: float = 0.015  # the middle of the 4 cm gap between the bins' walls
    half_length: float = 0.07  # along x: covers where the straight carry crosses the gap
    half_thickness: float = 0.008
    bottom: float = 0.8  # the table top
    height: float = 0.23  # its top 13 cm above the walls: above every carried can's bottom, below the forearm

    @property
    def ends(self) -> tuple[float, float]:
        """x of its near end (towards the robot) and its far end."""
        return self.x - self.half_length, self.x + self.half_length


DIVIDER = Divider()


# The task of a store imported from outside the simulator (a LeRobotDataset): it says itself what
# is observed and acted on; no env runs it.
EXTERNAL = "external"


@dataclass
class TaskConfig:
    """The `task` config group of every command (conf/task/<name>.yaml)."""

    name: str = "lift"


@dataclass
class ObsConfig:
    """The `obs` config group (conf/obs/<mode>.yaml): what a policy observes.

    - state: robomimic's low-dim vector, object poses read out of the simulator (privileged).
    - image: RGB cameras (robomimic's `<camera>_image` keys, uint8 [size, size, 3], top row
      first) plus the proprioceptive keys (`PROPRIO_KEYS`): what a real robot has.
    """

    mode: str = "state"
    cameras: list[str] = field(default_factory=lambda: ["agentview", "robot0_eye_in_hand"])
    size: int = 84  # square frames, as robomimic's image datasets
    # fast: no multisampling and no reflections, 3.3x cheaper on a software (CPU) renderer;
    # full: MuJoCo's defaults, as robomimic's image datasets were rendered.
    render: str = "fast"

    def __post_init__(self):
        if self.mode not in OBS_MODES:
            raise UserError(f"obs.mode: {self.mode!r} is not one of {', '.join(OBS_MODES)}")
        if self.render not in ("fast", "full"):
            raise UserError(f"obs.render: {self.render!r} is not one of fast, full")
        if self.mode == "image":
            if not self.cameras:
                raise UserError("obs.cameras: an image observation needs at least one camera")
            seen = set()
            for camera in self.cameras:
                if camera in seen:  # one store key per camera: a second would overwrite the first
                    raise UserError(f"obs.cameras: {camera!r} is listed twice")
                seen.add(camera)
            if not 16 <= int(self.size) <= 512:
                raise UserError(f"obs.size: {self.size} is not in 16..512 pixels")

    @property
    def image(self) -> bool:
        return self.mode == "image"

    @property
    def image_keys(self) -> list[str]:
        """The store and request keys of the cameras (`agentview` -> `agentview_image`)."""
        return [f"{c}_image" for c in self.cameras] if self.image else []

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (int(self.size), int(self.size), 3)

    def check_cameras(self, task: TaskSpec) -> None:
        """UserError naming `obs.cameras` and the task's cameras if an image observation lists a
        camera that `task`'s simulator does not have (robosuite would refuse it only while
        building the environment, in every worker)."""
        if not self.image:
            return
        for camera in self.cameras:
            if camera not in task.cameras:
                raise UserError(f"obs.cameras: {camera!r} is not a camera of task {task.name!r}; "
                                f"known: {', '.join(task.cameras)}")

    def to_dict(self) -> dict:
        return {"mode": self.mode, "cameras": list(self.cameras), "size": int(self.size),
                "render": self.render}

    @classmethod
    def from_dict(cls, d) -> ObsConfig:
        """An ObsConfig from itself, a config node or what a checkpoint or store records (None
        or empty: a state observation, as before images)."""
        if isinstance(d, cls):
            return d
        if not d:
            return cls()
        d = dict(d)
        if "cameras" in d:
            d["cameras"] = [str(c) for c in d["cameras"]]
        return cls(**d)


# The cameras robosuite models for these tasks: the arena's (TableArena for lift, BinsArena for can,
# PegsArena for square) and the robot's (Panda). A test compares them with the simulator's.
ARENA_CAMERAS = ("frontview", "birdview", "agentview", "sideview")
ROBOT_CAMERAS = ("robot0_robotview", "robot0_eye_in_hand")


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
    cameras: tuple[str, ...] = ARENA_CAMERAS + ROBOT_CAMERAS  # what obs.cameras may name
    scenes: dict = field(default_factory=dict)  # scene name -> its robosuite environment (envs/scenes.py)
    scene: str = ""  # which of them this spec builds ("": the task's own)

    def in_scene(self, scene: str | None) -> TaskSpec:
        """This task in `scene` (None or "": its own); UserError naming `scene` if it has none such."""
        if not scene or scene == self.scene:
            return self
        if scene not in self.scenes:
            raise UserError(f"scene: task {self.name!r} has no scene {scene!r}; "
                            f"known: {', '.join(self.scenes) or 'none'}")
        return replace(self, env_name=self.scenes[scene], scene=scene)

    @property
    def obs_layout(self) -> dict[str, tuple[int, int]]:
        """Key -> (start, stop) slice of the flat low-dim (state) observation vector."""
        return self.layout(ObsConfig())

    def layout(self, obs: ObsConfig) -> dict[str, tuple[int, int]]:
        """Key -> (start, stop) slice of the flat observation vector of `obs`: for images, the
        proprioceptive keys, then each camera's pixels (HWC order, values 0..255 as float32)."""
        sizes = {"object": self.object_dim, **KEY_SIZES} if not obs.image else dict(KEY_SIZES)
        for key in obs.image_keys:
            sizes[key] = obs.image_shape[0] * obs.image_shape[1] * obs.image_shape[2]
        layout, start = {}, 0
        for key, size in sizes.items():
            layout[key] = (start, start + size)
            start += size
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
            **({"scene": self.scene} if self.scene else {}),
            **self.env_kwargs,
        }


TASKS: dict[str, TaskSpec] = {
    "lift": TaskSpec("lift", "Lift", object_dim=10),
    "can": TaskSpec("can", "PickPlaceCan", object_dim=14,
                    cameras=("frontview", "birdview", "agentview") + ROBOT_CAMERAS,  # bins: no sideview
                    scenes={"divider": "PickPlaceCanDivider"}),
    "square": TaskSpec("square", "NutAssemblySquare", object_dim=14),
    # Stand the frame in its base, then hang the tool on its hook: robomimic's long-horizon task,
    # with its 700-step horizon; object: stand base, frame and tool poses, 14 each, then two flags
    # (frame assembled, tool on frame).
    "toolhang": TaskSpec("toolhang", "ToolHang", object_dim=44, horizon=700),
}


# The scene each task's demonstration sets are collected in, and their policies evaluated in,
# where it is not the task's own: can's mh set needs an obstacle to go round one way or the other.
DEMO_SCENES = {("can", "mh"): "divider"}


def demo_scene(task: str, demos: str) -> str:
    """The scene of `task`'s `demos` set ("" for the task's own)."""
    return DEMO_SCENES.get((task, demos), "")


def get_task(name: str) -> TaskSpec:
    """The spec of task `name`; raises UnknownTaskError naming the known tasks."""
    try:
        return TASKS[name]
    except KeyError:
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None
