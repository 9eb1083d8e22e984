"""Scripted experts: demonstrations for every task from privileged simulator state.

An expert reads object, peg and bin poses from the robosuite simulation but acts only through
`env.step` with the same 7-D OSC action a learner outputs, so its episodes are valid
demonstrations. Each expert is a short script of phases (move the grip site to a pose with the
gripper open or closed, close or open and wait, ...) written as a Python generator, so a script
reads like the task it performs and can branch on what happened (grasp again after a miss).

Demonstrations are varied, not one trajectory replayed: gains, speed limits, approach heights,
grasp offsets, wrist angles, goal positions and short pauses are drawn from the expert's
generator. The convention used here (and by collection) is one generator per episode, seeded from
the episode's env seed: `expert_rng(seed) == np.random.default_rng([seed, 1])`. The env seed fixes
the scene; the `1` gives the expert a stream of its own, independent of the env's; the same seed
gives the same actions, bit for bit.

Measure success from the command line: `python -m envs.experts --task square --seeds 100`.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

from envs.modes import square_turns
from envs.tasks import ACTION_DIM, DEMO_SETS, DIVIDER, POS_SCALE, ROT_SCALE, TASKS, demo_scene, get_task

GRIP_OPEN, GRIP_CLOSE = -1.0, 1.0
EXPERT_STREAM = 1  # the second word of the expert generator's seed (see expert_rng)
MAX_YAW_STEP = 1.0  # rad: how far ahead of the hand a yaw target is put (keeps axis-angle < pi)

# A target for the grip site: position (3,) in the world and either the heading of the finger axis,
# with the gripper pointing straight down, or a full orientation (a 3x3 rotation of the grip site,
# for tasks that turn what they hold on its side). Headings are unwrapped (not reduced mod 2 pi)
# so that a script says which way round the wrist turns: joint 7 has less than one turn of travel.
Target = tuple[np.ndarray, "float | np.ndarray"]


@dataclass(frozen=True)
class Operator:
    """A demonstrator of a mixed-proficiency ("mh") set, as robomimic's: 6 operators, two of each
    proficiency. Worse ones are slower, hesitate longer and more often, overshoot a target and
    come back, sometimes close the fingers too early (above the handle) and grasp again, and
    their hand shakes. `ccw` is how often this operator takes the counter-clockwise strategy where a task
    offers two (each operator has a habit; over the six it is even)."""

    index: int
    proficiency: str
    speed: float  # scales the speed limit
    most_pause: int  # steps of a hesitation, at most
    hesitate: float  # probability of a hesitation between two phases
    overshoot: float  # probability of overshooting a free-space target (m: 2-4 cm past it)
    miss: float  # probability of closing the fingers too early before the grasp that holds
    shake: float  # standard deviation of the noise on each translation/rotation command
    ccw: float


PROFICIENCIES = ("better", "okay", "worse")
OPERATORS: tuple[Operator, ...] = (
    Operator(0, "better", 1.0, 3, 0.1, 0.0, 0.0, 0.0, 0.4),
    Operator(1, "better", 1.0, 3, 0.1, 0.0, 0.0, 0.0, 0.6),
    Operator(2, "okay", 0.8, 6, 0.3, 0.15, 0.05, 0.03, 0.3),
    Operator(3, "okay", 0.8, 6, 0.3, 0.15, 0.05, 0.03, 0.7),
    Operator(4, "worse", 0.6, 12, 0.5, 0.4, 0.2, 0.06, 0.45),
    Operator(5, "worse", 0.6, 12, 0.5, 0.4, 0.2, 0.06, 0.55),
)


def operator_of(seed: int) -> Operator:
    """The operator of an mh episode: seeds take the six in turn, so any run of seeds is
    balanced across operators and proficiencies."""
    return OPERATORS[seed % len(OPERATORS)]


def expert_rng(seed: int) -> np.random.Generator:
    """The expert's generator for the episode whose env seed is `seed`."""
    return np.random.default_rng([seed, EXPERT_STREAM])


# -- geometry ------------------------------------------------------------------------------------
def top_down(yaw: float) -> np.ndarray:
    """Rotation of a gripper pointing straight down whose fingers close along the horizontal
    direction at angle `yaw` from world x (the grip site's x axis is the finger axis)."""
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, s, 0.0], [s, -c, 0.0], [0.0, 0.0, -1.0]])


def heading(rot: np.ndarray, axis: int = 0) -> float:
    """Heading in the world xy plane of column `axis` of rotation `rot`, in (-pi, pi]."""
    return math.atan2(rot[1, axis], rot[0, axis])


def wrap_near(angle: float, period: float, reference: float) -> float:
    """The angle equal to `angle` modulo `period` that is closest to `reference`."""
    return reference + (angle - reference + period / 2) % period - period / 2


# -- the phase machine ---------------------------------------------------------------------------
@dataclass
class Move:
    """One phase: drive the grip site to `target` while commanding `gripper`.

    `target` is called every step when `track` (the phase follows a moving object), else once
    when the phase begins; None holds the previous phase's last target. The phase ends once it
    has run `min_steps` steps and, for `settle` steps in a row, the site has been within
    `pos_tol` (m) and `rot_tol` (rad, heading and tilt together) of the target and `until()`
    (if given) has held; or after `max_steps` steps, whatever the error. `speed` scales the
    expert's speed limit for this phase.
    """

    name: str
    target: Callable[[], Target] | None
    gripper: float
    pos_tol: float = 0.01
    rot_tol: float = 0.1
    min_steps: int = 0
    max_steps: int = 100
    speed: float = 1.0
    track: bool = True
    settle: int = 1
    until: Callable[[], bool] | None = None
    free: bool = False  # a move through free space, which a worse operator may overshoot


class ScriptedExpert:
    """A task script of `Move` phases, turned into OSC actions by proportional control.

    Subclasses implement `script()`, a generator of phases. It is advanced when the current
    phase ends, so code between two `yield`s runs at that moment and may read the simulator.
    `reset(env)` starts an episode (call it right after `env.reset`); `act(env)` returns the next
    action, float32 (7,) in [-1, 1]. All randomness comes from the generator given at
    construction, so the same generator state and scene give the same actions. Given an
    `operator` (mixed-proficiency demonstrations) the expert acts as that operator does and, on a
    task with two strategies, draws one per episode (`strategy`, an index into STRATEGIES).
    """

    DECISION_PHASE: str | None = None  # the phase at whose start the strategies diverge

    def __init__(self, rng: np.random.Generator, operator: Operator | None = None):
        self.rng = rng
        self.operator = operator

    # -- episode life cycle ----------------------------------------------------------------
    def reset(self, env) -> None:
        """Start an episode in `env`, which has just been reset; draws this episode's style."""
        self.env = env
        self.rs = env.unwrapped_robosuite
        self.sim = self.rs.sim
        robot = self.rs.robots[0]
        self._site = robot.eef_site_id[robot.arms[0]]
        base = self.sim.model.body_name2id(robot.robot_model.root_body)
        self.base_pos = np.array(self.sim.data.body_xpos[base])
        # The controller takes deltas in the robot base frame; targets here are in the world.
        self._world_to_base = np.array(self.sim.data.body_xmat[base]).reshape(3, 3).T
        wrist = self.sim.model.joint_name2id(robot.robot_joints[-1])
        self._wrist_qpos = self.sim.model.jnt_qposadr[wrist]
        self._wrist_range = np.array(self.sim.model.jnt_range[wrist])
        self._yaw = heading(self.eef_rot())
        self.home_yaw = self._yaw
        # Per-episode style: how firmly and how fast this demonstrator drives the arm.
        self.gain = self.rng.uniform(0.9, 1.5)
        self.rot_gain = self.rng.uniform(0.8, 1.3)
        self.max_action = self.rng.uniform(0.7, 1.0)
        self.strategy: int | None = None
        self.decision_step: int | None = None  # steps taken when DECISION_PHASE began
        if self.operator is not None:
            self.max_action *= self.operator.speed
            if self.offers_strategies(env):
                self.strategy = int(self.rng.random() < self.operator.ccw)
        self._pending: Move | None = None  # the phase a hesitation or an overshoot put off
        self._taken = 0
        self.phase_log: list[tuple[str, int]] = []  # (phase, steps it took), for inspection
        self._script: Iterator[Move] | None = self.script()
        self._phase: Move | None = None
        self._frozen: Target | None = None
        self._last_target: Target | None = None
        self._steps = 0
        self._settled = 0

    def act(self, env) -> np.ndarray:
        """The next action for the current state of `env` (the env given to `reset`)."""
        self._yaw = wrap_near(heading(self.eef_rot()), 2 * math.pi, self._yaw)
        target = self._target()
        for _ in range(1000):  # a script whose phases all end at once is a bug, not a hang
            if not self._phase_done(target):
                break
            self._advance()
            target = self._target()
        else:
            raise RuntimeError(f"{type(self).__name__}: 1000 phases ended without taking a step")
        self._steps += 1
        self._taken += 1
        self._last_target = target
        return self._command(target, self._phase.gripper, self._phase.speed)

    def script(self) -> Iterator[Move | None]:
        raise NotImplementedError

    def offers_strategies(self, env) -> bool:
        """Whether an operator chooses between two strategies in `env` (at DECISION_PHASE)."""
        return self.DECISION_PHASE is not None

    # -- privileged state --------------------------------------------------------------------
    def eef_pos(self) -> np.ndarray:
        """Position of the grip site (between the finger pads) in the world."""
        return np.array(self.sim.data.site_xpos[self._site])

    def eef_rot(self) -> np.ndarray:
        return np.array(self.sim.data.site_xmat[self._site]).reshape(3, 3)

    def eef_yaw(self) -> float:
        """Heading of the finger axis, unwrapped since the episode began."""
        return self._yaw

    def body_pos(self, body_id: int) -> np.ndarray:
        return np.array(self.sim.data.body_xpos[body_id])

    def body_yaw(self, body_id: int, axis: int = 0) -> float:
        return heading(np.array(self.sim.data.body_xmat[body_id]).reshape(3, 3), axis)

    def top_of(self, body_id: int) -> float:
        """Height of the highest point of a body's geoms (their bounding boxes, as placed now)."""
        m, d = self.sim.model, self.sim.data
        geoms = np.flatnonzero(m.geom_bodyid == body_id)
        tops = []
        for g in geoms:
            row = d.geom_xmat[g].reshape(3, 3)[2]  # how the geom's local axes project on world z
            centre, half = m.geom_aabb[g][:3], m.geom_aabb[g][3:]
            tops.append(d.geom_xpos[g][2] + row @ centre + np.abs(row) @ half)
        return float(max(tops))

    def site_pos(self, name: str) -> np.ndarray:
        return np.array(self.sim.data.site_xpos[self.sim.model.site_name2id(name)])

    def grip_width(self) -> float:
        """Opening of the fingers (about 0.08 open, under 0.005 closed on nothing)."""
        q = self.env.raw_obs["robot0_gripper_qpos"]
        return float(q[0] - q[1])

    def holding(self, point: np.ndarray, radius: float) -> bool:
        """Whether the closed fingers hold something at `point`: they stopped apart, and the
        point is still within `radius` of the grip site."""
        return self.grip_width() > 0.006 and np.linalg.norm(point - self.eef_pos()) < radius

    def wrist_room(self, margin: float = 0.4) -> tuple[float, float]:
        """The finger headings the wrist can turn to from here without reaching the limits of
        its last joint (less `margin`, for what the other joints add on the way)."""
        q = float(self.sim.data.qpos[self._wrist_qpos])
        lo, hi = self._wrist_range
        # Joint 7 turns about the gripper's axis, which points down: raising q lowers the heading.
        return self._yaw + q - hi + margin, self._yaw + q - lo - margin

    # -- phase helpers ------------------------------------------------------------------------
    def grip(self, gripper: float) -> Move:
        """Hold the previous target while the fingers close or open, with a random margin."""
        steps = int(self.rng.integers(7, 11))
        name = "close" if gripper > 0 else "open"
        return Move(name, None, gripper, pos_tol=np.inf, rot_tol=np.inf, min_steps=steps, max_steps=steps)

    def pause(self, gripper: float, most: int = 3) -> Move | None:
        """Sometimes hold still for a few steps, as a human demonstrator does."""
        steps = int(self.rng.integers(0, most + 1))
        if steps == 0:
            return None
        return Move("pause", None, gripper, pos_tol=np.inf, rot_tol=np.inf, min_steps=steps, max_steps=steps)

    def carry_to(
        self,
        body_id: int,
        goal_pos: Callable[[], np.ndarray],
        hand_yaw: float | None = None,
        body_yaw: float | None = None,
    ) -> Callable[[], Target]:
        """A target that brings a body held in the hand to `goal_pos`. The hand turns to heading
        `hand_yaw` (default: as it is); given `body_yaw`, the hand turns instead to bring the
        body's x axis to that heading, by the turn nearest `hand_yaw`. The site is moved by the
        body's current error, so slips in the grasp are corrected as they happen."""

        def target() -> Target:
            pos, yaw = self.eef_pos(), self.eef_yaw()
            goal_yaw = yaw if hand_yaw is None else hand_yaw
            if body_yaw is not None:
                goal_yaw = wrap_near(yaw + body_yaw - self.body_yaw(body_id), 2 * math.pi, goal_yaw)
            # Turning the hand also swings the body about the site: aim at where it will be.
            swing = top_down(goal_yaw) @ self.eef_rot().T @ (self.body_pos(body_id) - pos)
            return goal_pos() - swing, goal_yaw

        return target

    def rise(self, gripper: float, height: float, name: str = "retreat", pos_tol: float = 0.01) -> Move:
        """Straight up by `height` from where the phase begins, keeping the heading."""
        return Move(name, lambda: (self.eef_pos() + [0, 0, height], self.eef_yaw()), gripper,
                    pos_tol=pos_tol, rot_tol=np.inf, max_steps=60, track=False)

    # -- internals -------------------------------------------------------------------------------
    def _advance(self) -> None:
        if self._phase is not None:
            self.phase_log.append((self._phase.name, self._steps))
        previous = self._last_target if self._last_target is not None else (self.eef_pos(), self.eef_yaw())
        phase, self._pending = self._pending, None
        while phase is None and self._script is not None:  # helpers may yield None (no pause)
            try:
                phase = next(self._script)
            except StopIteration:
                self._script = None
            else:
                if phase is not None and self.operator is not None:
                    phase = self._as_operator(phase)
        if phase is None:
            # The script is over: hold the last pose and gripper command until the episode ends.
            gripper = self._phase.gripper if self._phase is not None else GRIP_OPEN
            phase = Move("hold", None, gripper, pos_tol=0.0, rot_tol=0.0, max_steps=10**9)
        self._phase, self._steps, self._settled = phase, 0, 0
        self._frozen = previous if phase.target is None else (None if phase.track else phase.target())

    def _as_operator(self, phase: Move) -> Move:
        """The phase the operator runs first in place of the script's `phase`: a hesitation or an
        overshoot past its target (then `phase` is pending), or `phase` itself."""
        op, rng = self.operator, self.rng
        if phase.name == self.DECISION_PHASE and self.decision_step is None:
            self.decision_step = self._taken
        gripper = self._phase.gripper if self._phase is not None else GRIP_OPEN
        if rng.random() < op.hesitate:
            self._pending = phase
            steps = int(rng.integers(1, op.most_pause + 1))
            return Move("hesitate", None, gripper, pos_tol=np.inf, rot_tol=np.inf, min_steps=steps,
                        max_steps=steps)
        if phase.free and rng.random() < op.overshoot:
            self._pending = phase
            goal, yaw = phase.target()
            way = goal - self.eef_pos()
            way[2] = 0.0
            past = goal + way / max(np.linalg.norm(way), 1e-6) * rng.uniform(0.02, 0.04)
            return Move("overshoot", lambda: (past, yaw), phase.gripper, pos_tol=0.015, rot_tol=np.inf,
                        max_steps=40, speed=phase.speed, track=False)
        return phase

    def _target(self) -> Target | None:
        if self._phase is None:
            return None
        return self._frozen if self._frozen is not None else self._phase.target()

    def _phase_done(self, target: Target | None) -> bool:
        p = self._phase
        if p is None or self._steps >= p.max_steps:
            return True
        if self._steps < p.min_steps:
            return False
        pos_err = np.linalg.norm(target[0] - self.eef_pos())
        within = pos_err <= p.pos_tol and self._rot_error(target[1]) <= p.rot_tol
        within = within and (p.until is None or p.until())
        self._settled = self._settled + 1 if within else 0
        return self._settled >= p.settle

    def _rot_error(self, goal: float | np.ndarray) -> float:
        """Angle (rad) between the hand and `goal`: a full orientation, or a heading (its error
        and the hand's tilt from pointing down, together)."""
        if np.ndim(goal) == 2:
            return float(Rotation.from_matrix(goal @ self.eef_rot().T).magnitude())
        tilt = math.acos(np.clip(-self.eef_rot()[2, 2], -1.0, 1.0))
        return math.hypot(goal - self._yaw, tilt)

    def _command(self, target: Target, gripper: float, speed: float) -> np.ndarray:
        limit = self.max_action * speed
        move = self.gain * (target[0] - self.eef_pos()) / POS_SCALE
        move *= min(1.0, limit / max(np.linalg.norm(move), 1e-12))
        goal = target[1]
        if np.ndim(goal) != 2:
            # Aim the rotation at most MAX_YAW_STEP ahead, so its axis-angle never wraps past pi and
            # the wrist turns the way the unwrapped target says; this also levels any tilt.
            goal = top_down(self._yaw + np.clip(goal - self._yaw, -MAX_YAW_STEP, MAX_YAW_STEP))
        turn = Rotation.from_matrix(goal @ self.eef_rot().T).as_rotvec()
        turn *= self.rot_gain / ROT_SCALE
        turn *= min(1.0, limit / max(np.linalg.norm(turn), 1e-12))
        action = np.empty(ACTION_DIM)
        action[:3] = self._world_to_base @ move
        action[3:6] = self._world_to_base @ turn
        action[6] = gripper
        if self.operator is not None and self.operator.shake > 0:
            action[:6] += self.rng.normal(0.0, self.operator.shake, 6)  # an unsteady hand
        return np.clip(action, -1.0, 1.0).astype(np.float32)


# -- the tasks -----------------------------------------------------------------------------------
class LiftExpert(ScriptedExpert):
    """Lift: grasp the cube from above, fingers square to its faces, and raise it."""

    def script(self) -> Iterator[Move | None]:
        cube = self.rs.cube_body_id
        for _attempt in range(3):
            yield from self._grasp_and_lift(cube)
            if self.holding(self.body_pos(cube), radius=0.03):
                return
            yield self.grip(GRIP_OPEN)  # missed: let go and try again from above

    def _grasp_and_lift(self, cube: int) -> Iterator[Move | None]:
        rng = self.rng
        hover = rng.uniform(0.05, 0.10)
        offset = np.array([*rng.uniform(-0.004, 0.004, 2), rng.uniform(-0.006, 0.004)])
        # A cube looks the same every quarter turn: take the grasp nearest the wrist's home.
        yaw = wrap_near(self.body_yaw(cube) + rng.uniform(-0.08, 0.08), math.pi / 2, self.home_yaw)
        yield Move("approach", lambda: (self.body_pos(cube) + [*offset[:2], hover], yaw), GRIP_OPEN,
                   pos_tol=0.015, rot_tol=0.1)
        yield Move("descend", lambda: (self.body_pos(cube) + offset, yaw), GRIP_OPEN,
                   pos_tol=0.005, rot_tol=0.06, speed=rng.uniform(0.5, 0.8))
        yield self.grip(GRIP_CLOSE)
        yield self.rise(GRIP_CLOSE, rng.uniform(0.08, 0.14), name="lift")


class CanExpert(ScriptedExpert):
    """PickPlaceCan: grasp the can from above, carry it over the bin walls, set it down in its
    compartment of the target bin, let go and back off.

    In the divider scene (the mh set) an operator carries the can round the divider between the
    bins, past its near end or its far end (its strategy), and only then on to the goal. The two
    waypoints are the same distance either side of the divider's middle, so their average is in
    the divider.
    """

    HALF_HEIGHT = 0.04  # of the can
    FINGER_REACH = 0.05  # from the grip site to the outside of an open finger
    DECISION_PHASE = "around"
    CLEARANCE = 0.075  # from the divider's end to the can's centre at the waypoint (radius 3.3 cm)
    HAND_HALF = (0.103, 0.032)  # the hand's half-extent along the finger axis and across it
    HAND_ROOM = 0.125  # from the divider's line to the can, for the hand to turn freely

    def offers_strategies(self, env) -> bool:
        return env.spec_task.scene == "divider"  # elsewhere nothing to go round: one way to the goal

    def reset(self, env) -> None:
        self.divider = env.spec_task.scene == "divider"
        super().reset(env)

    def script(self) -> Iterator[Move | None]:
        can = self.rs.obj_body_id[self.rs.obj_to_use]
        for _attempt in range(3):
            carry_z = yield from self._pick(can)
            if self.holding(self.body_pos(can), radius=0.04):
                break
            yield self.grip(GRIP_OPEN)  # missed: let go and try again from above
        yield from self._place(can, carry_z)

    def _pick(self, can: int) -> Iterator[Move | None]:
        """Grasp the can and lift it clear of the walls; returns the height it is carried at."""
        rng = self.rng
        yaw = self._finger_yaw(can)
        hover = rng.uniform(0.06, 0.10)
        # The palm is only ~3.3 cm above the grip site: grasp the upper half of the can so that
        # the palm stays clear of its top.
        offset = np.array([*rng.uniform(-0.004, 0.004, 2), rng.uniform(0.013, 0.022)])
        yield Move("approach", lambda: (self.body_pos(can) + [*offset[:2], self.HALF_HEIGHT + hover], yaw),
                   GRIP_OPEN, pos_tol=0.015, rot_tol=0.1)
        yield Move("descend", lambda: (self.body_pos(can) + offset, yaw), GRIP_OPEN,
                   pos_tol=0.005, rot_tol=0.06, max_steps=60, speed=rng.uniform(0.5, 0.8))
        yield self.grip(GRIP_CLOSE)
        # Straight up before going sideways; the loose tolerance rounds the corner.
        walls_top = self.rs.bin2_pos[2] + 0.1
        carry_z = walls_top + self.HALF_HEIGHT + rng.uniform(0.05, 0.10)
        start = self.body_pos(can)
        yield Move("lift", self.carry_to(can, lambda: np.array([*start[:2], carry_z])), GRIP_CLOSE,
                   pos_tol=0.03, rot_tol=np.inf, max_steps=60)
        if self.divider and start[1] > DIVIDER.y - self.HAND_ROOM:
            # Lifted close to the divider: back off from it before the hand turns for the way round.
            back = np.array([start[0], DIVIDER.y - self.HAND_ROOM, carry_z])
            yield Move("clear", self.carry_to(can, lambda: back), GRIP_CLOSE, pos_tol=0.015, rot_tol=np.inf,
                       max_steps=60)
        return carry_z

    def _place(self, can: int, carry_z: float) -> Iterator[Move | None]:
        rng = self.rng
        goal = self._drop_xy()
        hand_yaw = self.home_yaw + rng.uniform(-0.3, 0.3)  # a cylinder: bring the wrist home
        if self.strategy is not None:
            outwards = (2 * self.strategy - 1) * (self.CLEARANCE + rng.uniform(0.0, 0.02))  # near: -x
            past = np.array([DIVIDER.ends[self.strategy] + outwards, DIVIDER.y, carry_z])
            yield Move("around", self.carry_to(can, lambda: past, hand_yaw), GRIP_CLOSE,
                       pos_tol=0.02, rot_tol=0.4, max_steps=120, free=True)
        yield Move("carry", self.carry_to(can, lambda: np.array([*goal, carry_z]), hand_yaw), GRIP_CLOSE,
                   pos_tol=0.03, rot_tol=0.3, max_steps=120)
        # Let go with the can's bottom below the top of the walls, so it cannot bounce out.
        floor = self.rs.bin2_pos[2] + 0.02  # top of the bin's floor slab
        drop_z = floor + self.HALF_HEIGHT + rng.uniform(0.04, 0.07)
        yield Move("lower", self.carry_to(can, lambda: np.array([*goal, drop_z]), hand_yaw), GRIP_CLOSE,
                   pos_tol=0.01, rot_tol=0.2, max_steps=60, speed=rng.uniform(0.6, 0.9))
        yield self.pause(GRIP_CLOSE)
        yield self.grip(GRIP_OPEN)
        # The task counts the can as placed only once the hand is 4.3 cm or more from it.
        yield self.rise(GRIP_OPEN, rng.uniform(0.08, 0.12))

    def _drop_xy(self) -> np.ndarray:
        """Where to set the can down: in its compartment of the target bin, near the corner
        closest to the robot and clear of the walls there (wall half-width 1 cm, can radius
        2.5 cm). The compartment's far side is at the edge of the arm's reach."""
        rs = self.rs
        centre = np.asarray(rs.target_bin_placements[rs.object_id][:2])
        half = np.asarray(rs.bin_size[:2]) / 4  # the bin is split into 2 x 2 compartments
        towards_robot = np.sign(self.base_pos[:2] - centre)
        corner = centre + half * towards_robot
        return corner - towards_robot * self.rng.uniform([0.05, 0.055], [0.08, 0.085])

    def _finger_yaw(self, can: int) -> float:
        """A finger axis near the wrist's home along which the open fingers keep clear of the
        walls of the bin the can stands in (near a wall, the fingers go along the wall)."""
        rs = self.rs
        inner = np.asarray(rs.bin_size[:2]) / 2 - 0.005  # the walls' inner faces about the centre
        from_centre = self.body_pos(can)[:2] - np.asarray(rs.bin1_pos[:2])
        candidates = self.home_yaw + np.array([0.0, -0.4, 0.4, -0.8, 0.8, -1.2, 1.2, -math.pi / 2])
        candidates += self.rng.uniform(-0.1, 0.1, candidates.size)

        def clearance(yaw: float) -> float:
            tips = from_centre + np.outer([1, -1], [math.cos(yaw), math.sin(yaw)]) * self.FINGER_REACH
            room = float(np.min(inner - np.abs(tips)))
            if self.divider:  # the hand, wider than the fingers, must not reach over the divider
                along, across = self.HAND_HALF
                reach = self.body_pos(can)[1] + along * abs(math.sin(yaw)) + across * abs(math.cos(yaw))
                room = min(room, DIVIDER.y - DIVIDER.half_thickness - reach)
            return room

        scores = np.array([clearance(y) for y in candidates])
        # Prefer the wrist's home unless it leaves less than 1.5 cm to a wall.
        good = np.flatnonzero(scores >= min(0.015, scores.max()))
        return float(candidates[good[0]])


class SquareExpert(ScriptedExpert):
    """NutAssemblySquare: grasp the square nut by its handle, lift it, turn it square to the peg
    on the way there, lower it over the peg and let it drop.

    The proficient expert always brings the handle round to point at the robot. An mh operator
    turns the nut, once it is lifted, to the nearest of the peg's square alignments clockwise or
    counter-clockwise (its strategy): the handle then points at the robot or to one side. The two
    alignments are a quarter turn apart, so their average is 45 degrees off and cannot go over
    the peg. (With the handle pointing away the hand would be out of reach: that alignment is
    skipped.)
    """

    DECISION_PHASE = "transfer"

    def script(self) -> Iterator[Move | None]:
        rs = self.rs
        nut_model = rs.nuts[rs.nut_id]
        nut, handle = rs.obj_body_id[nut_model.name], nut_model.important_sites["handle"]
        peg = (rs.peg1_body_id, rs.peg2_body_id)[rs.nut_id]
        for attempt in range(3):
            miss = self.operator is not None and attempt == 0 and self.rng.random() < self.operator.miss
            final_yaw, carry_z = yield from self._pick(nut, handle, self.top_of(peg), miss)
            if self.holding(self.site_pos(handle), radius=0.03):
                break
            yield self.grip(GRIP_OPEN)  # missed: let go and try again from above
        yield from self._place(nut, peg, final_yaw, carry_z)

    def _pick(self, nut: int, handle: str, peg_top: float, miss: bool = False) -> Iterator[Move | None]:
        """Grasp the handle and lift the nut above the peg; returns the hand's heading for over
        the peg and the height the nut is carried at. `miss`: the fingers close too early, above
        the handle."""
        rng = self.rng
        along = rng.uniform(-0.002, 0.006)  # outwards along the handle from its site
        hover = rng.uniform(0.05, 0.09)
        dz = rng.uniform(0.001, 0.005) + (rng.uniform(0.03, 0.045) if miss else 0.0)
        yaw, final_yaw = self._plan_wrist(nut)

        def grasp_point() -> np.ndarray:
            nut_x = np.array(self.sim.data.body_xmat[nut]).reshape(3, 3)[:, 0]
            return self.site_pos(handle) + along * nut_x

        yield Move("approach", lambda: (grasp_point() + [0, 0, hover], yaw), GRIP_OPEN, pos_tol=0.012,
                   rot_tol=0.08, free=True)
        yield Move("descend", lambda: (grasp_point() + [0, 0, dz], yaw), GRIP_OPEN,
                   pos_tol=0.004, rot_tol=0.05, max_steps=60, speed=rng.uniform(0.4, 0.7))
        yield self.grip(GRIP_CLOSE)
        # Straight up first: the nut starts close to the robot, where the arm is folded and turns
        # badly; the wrist turns on the way to the peg. The nut's bottom ends 3-7 cm above the peg.
        carry_z = peg_top + 0.01 + rng.uniform(0.03, 0.07)
        yield self.rise(GRIP_CLOSE, carry_z - self.body_pos(nut)[2], name="lift", pos_tol=0.03)
        return final_yaw, carry_z

    def _place(self, nut: int, peg: int, final_yaw: float, carry_z: float) -> Iterator[Move | None]:
        rng = self.rng
        peg_xy = self.body_pos(peg)[:2]
        # The proficient expert brings the handle round to point at the robot (nut heading pi), where
        # the hand over the peg is well within reach; an operator to its strategy's alignment.
        goal = self.nut_goal
        above = self.carry_to(nut, lambda: np.array([*peg_xy, carry_z]), final_yaw, goal)
        yield Move("transfer", above, GRIP_CLOSE, pos_tol=0.02, rot_tol=0.2, max_steps=120, free=True)
        # The nut swings on its handle when the hand stops: settle over the peg slowly.
        yield Move("align", above, GRIP_CLOSE, pos_tol=0.003, rot_tol=0.03, settle=3, max_steps=80,
                   speed=rng.uniform(0.3, 0.5))
        yield self.pause(GRIP_CLOSE)

        def aligned() -> bool:
            return np.linalg.norm(self.body_pos(nut)[:2] - peg_xy) < 0.004

        # Down until the nut is well around the peg (from there it drops to the table by itself),
        # holding height whenever the nut is off the peg's axis so it never lands on the peg's top.
        low = self.top_of(peg) - 0.06 + rng.uniform(0.0, 0.02)
        down = self.carry_to(nut, lambda: np.array([*peg_xy, low if aligned() else self.body_pos(nut)[2]]),
                             final_yaw, goal)
        yield Move("insert", down, GRIP_CLOSE, pos_tol=0.006, rot_tol=0.05, max_steps=80,
                   speed=rng.uniform(0.4, 0.7), until=lambda: self.body_pos(nut)[2] < low + 0.01)
        yield self.grip(GRIP_OPEN)
        yield self.rise(GRIP_OPEN, rng.uniform(0.06, 0.1))

    def _plan_wrist(self, nut: int) -> tuple[float, float]:
        """Finger headings at the grasp and over the peg, both within the wrist's travel.

        The fingers close across the handle (along the nut's y axis), either way round. Over the
        peg the nut must point its handle at the robot (heading pi), which fixes the hand's final
        heading modulo 2 pi; of the ways to get there, take the one that turns the wrist least.
        """
        across = self.body_yaw(nut, axis=1) + self.rng.uniform(-0.05, 0.05)
        lo, hi = self.wrist_room()
        if self.strategy is not None:
            return self._plan_strategy(nut, across, lo, hi)
        self.nut_goal = math.pi
        turn = wrap_near(math.pi - self.body_yaw(nut), 2 * math.pi, 0.0)  # the nut's, either way
        plans = []
        for k in range(-3, 4):
            grasp = across + k * math.pi
            for final in (grasp + turn - 2 * math.pi, grasp + turn, grasp + turn + 2 * math.pi):
                if lo <= grasp <= hi and lo <= final <= hi:
                    plans.append((abs(grasp - self.eef_yaw()) + abs(final - grasp), grasp, final))
        if not plans:  # cannot happen with the Panda's 5.8 rad of wrist travel
            raise RuntimeError("no wrist plan within joint 7's range")
        _, grasp, final = min(plans)
        return grasp, final

    def _plan_strategy(self, nut: int, across: float, lo: float, hi: float) -> tuple[float, float]:
        """An mh operator's plan: the grasp does not depend on the strategy (so nothing before the
        decision tells the two apart), the turn over the peg does."""
        turns = square_turns(self.body_yaw(nut))
        grasps = [across + k * math.pi for k in range(-3, 4)]
        fits = [g for g in grasps if lo <= g <= hi and all(lo <= g + t <= hi for t in turns)]
        if not fits:
            # Rarely no grasp leaves room for both turns: then one that leaves room for this one,
            # or else the other (the wrist cannot turn this way: the operator turns the other).
            for strategy in (self.strategy, 1 - self.strategy):
                fits = [g for g in grasps if lo <= g <= hi and lo <= g + turns[strategy] <= hi]
                if fits:
                    self.strategy = strategy
                    break
            else:
                raise RuntimeError("no wrist plan within joint 7's range")
        turn = turns[self.strategy]
        grasp = min(fits, key=lambda g: abs(g - self.eef_yaw()))
        self.nut_goal = self.body_yaw(nut) + turn
        return grasp, grasp + turn




# A class, or "module:Class" for an expert in a module of its own (built on this one, so imported
# when first asked for).
EXPERTS: dict[str, type[ScriptedExpert] | str] = {
    "lift": LiftExpert, "can": CanExpert, "square": SquareExpert,
    "toolhang": "envs.expert_toolhang:ToolHangExpert",
}


def make_expert(task: str, rng: np.random.Generator, operator: Operator | None = None) -> ScriptedExpert:
    """The scripted expert for `task`, drawing its randomness from `rng`, acting as `operator`
    (mixed-proficiency demonstrations) if given."""
    cls = EXPERTS[get_task(task).name]
    if isinstance(cls, str):
        import importlib

        module, name = cls.split(":")
        cls = getattr(importlib.import_module(module), name)
    return cls(rng, operator)


# -- episodes ------------------------------------------------------------------------------------
def run_expert_episode(env, expert: ScriptedExpert, seed: int) -> dict:
    """Reset `env` with `seed` and let `expert` act until success (the env terminates there) or
    the horizon. Returns per-step arrays: `obs` float32 [T, obs_dim] (the low-dim observation the
    action was chosen at), `action` float32 [T, 7], `reward` float64 [T], `success` bool [T]
    (after the step), `state` float64 [T, state_dim] (`env.get_state()` before the step), and for
    an env with image observations each camera's frames `<camera>_image` uint8 [T, H, W, 3]; and
    `seed`, `succeeded`, `length` (= T). An operator's episode adds `operator`, `proficiency`
    (an index into PROFICIENCIES), `strategy` (into STRATEGIES; -1 where the task has none) and
    `decision_step` (the step at which the strategies diverge; -1 if never reached)."""
    env.reset(seed=seed)
    expert.reset(env)
    rows: dict[str, list] = {"obs": [], "action": [], "reward": [], "success": [], "state": []}
    done = False
    while not done:
        rows["state"].append(env.get_state())
        rows["obs"].append(env.low_dim_obs())
        for key, frame in env.images().items():
            rows.setdefault(key, []).append(frame)
        action = expert.act(env)
        _, reward, terminated, truncated, info = env.step(action)
        rows["action"].append(action)
        rows["reward"].append(reward)
        rows["success"].append(info["success"])
        done = terminated or truncated
    episode = {
        "obs": np.asarray(rows["obs"], dtype=np.float32),
        "action": np.asarray(rows["action"], dtype=np.float32),
        "reward": np.asarray(rows["reward"], dtype=np.float64),
        "success": np.asarray(rows["success"], dtype=bool),
        "state": np.asarray(rows["state"], dtype=np.float64),
        **{key: np.asarray(frames, dtype=np.uint8) for key, frames in rows.items() if key.endswith("_image")},
    }
    episode.update(seed=seed, succeeded=bool(episode["success"][-1]), length=len(rows["action"]))
    op = expert.operator
    if op is not None:
        episode.update(operator=op.index, proficiency=PROFICIENCIES.index(op.proficiency),
                       strategy=-1 if expert.strategy is None else expert.strategy,
                       decision_step=-1 if expert.decision_step is None else expert.decision_step)
    return episode


def expert_episode(env, task: str, seed: int, demos: str = "ph") -> dict:
    """`run_expert_episode` with the task's expert drawing from `expert_rng(seed)`: the episode
    that env seed `seed` stands for in collection and measurement. `demos="mh"`: the episode of
    operator `operator_of(seed)`."""
    operator = operator_of(seed) if demos == "mh" else None
    return run_expert_episode(env, make_expert(task, expert_rng(seed), operator), seed)


# -- measurement ---------------------------------------------------------------------------------
_worker_envs: dict = {}  # (task, demos) -> env, built once per process


def _episode_summary(job: tuple[str, int, str]) -> tuple[int, bool, int]:
    task, seed, demos = job
    if (task, demos) not in _worker_envs:
        from envs.robosuite_env import make_env

        _worker_envs[task, demos] = make_env(task, scene=demo_scene(task, demos))
    ep = expert_episode(_worker_envs[task, demos], task, seed, demos)
    return seed, ep["succeeded"], ep["length"]


def measure(task: str, seeds: list[int], workers: int = 2, progress: bool = True, demos: str = "ph") -> dict:
    """Success of `task`'s expert on env seeds `seeds` (expert generator `expert_rng(seed)`;
    `demos="mh"`: as each seed's operator), with `workers` processes (0: in this one). Returns
    `success_rate`, `mean_length` (over all episodes), `failed` (seeds), `lengths` (seed -> steps)
    and `seconds`."""
    from tqdm import tqdm

    jobs = [(task, s, demos) for s in seeds]
    start = time.perf_counter()
    results = []
    bar = tqdm(total=len(jobs), desc=task, disable=not progress)
    if workers <= 0:
        for job in jobs:
            results.append(_episode_summary(job))
            bar.update()
    else:
        import multiprocessing as mp

        # A fresh interpreter per worker: no simulator state is shared through fork.
        with mp.get_context("spawn").Pool(workers) as pool:
            for r in pool.imap_unordered(_episode_summary, jobs):
                results.append(r)
                bar.update()
    bar.close()
    results.sort()
    lengths = {s: n for s, _, n in results}
    return {
        "task": task,
        "success_rate": float(np.mean([ok for _, ok, _ in results])),
        "mean_length": float(np.mean(list(lengths.values()))),
        "failed": [s for s, ok, _ in results if not ok],
        "lengths": lengths,
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Measure a scripted expert's success rate.")
    parser.add_argument("--task", required=True, choices=sorted(TASKS))
    parser.add_argument("--seeds", type=int, default=100, help="env seeds first, first+1, ...")
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--demos", choices=DEMO_SETS, default="ph", help="mh: mixed-proficiency operators")
    args = parser.parse_args(argv)
    r = measure(args.task, list(range(args.first, args.first + args.seeds)), args.workers, demos=args.demos)
    lengths = list(r["lengths"].values())
    print(f"{args.task}: success {r['success_rate']:.1%} over {args.seeds} seeds from {args.first}; "
          f"episode length mean {r['mean_length']:.1f} (min {min(lengths)}, max {max(lengths)}) steps; "
          f"{r['seconds']:.0f} s with {args.workers} workers")
    print(f"failed seeds: {r['failed']}")


if __name__ == "__main__":
    main()
