"""What the real-time control loop needs of a robot, and the simulator behind that interface.

A `Robot` has a control period, gives timestamped observations and takes timestamped actions.
A real robot's driver implements it; `SimRobot` puts a robosuite task behind it, paced to the
wall clock, so the whole real-time path (server, network, asynchronous loop) runs here.
Timestamps are `time.perf_counter()` seconds, the loop's clock.
"""

from __future__ import annotations

import time
from typing import Callable, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Robot(Protocol):
    period: float  # seconds per control step

    def read(self) -> tuple[float, np.ndarray]:
        """The newest observation and the time it was taken."""
        ...

    def send(self, action: np.ndarray, t: float) -> None:
        """Command `action` for the control step that starts at time `t`. A step that gets no
        command is the robot's own business (a real arm holds its pose)."""
        ...


def hold_action(last: np.ndarray | None, action_dim: int) -> np.ndarray:
    """What the arm does in a step with no command: robosuite's OSC_POSE takes pose deltas, so
    zero holds the pose; the gripper keeps its last command."""
    a = np.zeros(action_dim, np.float32)
    if last is not None:
        a[-1] = last[-1]
    return a


class SimRobot:
    """A gymnasium robosuite env as a robot on the wall clock, a zero-order hold like a real arm.

    The first `send` starts the robot's clock at its timestamp; control step `k` then spans
    `[t0 + k period, t0 + (k+1) period)`. The command sent during a step is executed over that
    step; a step that ends without one executes `hold_action`. The simulator catches up with the
    clock on every `read` and `send`, so time the loop loses is time the robot moved without a
    fresh command — latency costs here what it costs a real robot.
    """

    def __init__(self, env, clock: Callable[[], float] = time.perf_counter, period: float | None = None):
        self.env = env
        self.period = period or 1.0 / env.spec_task.control_freq  # the task's rate (20 Hz) by default
        self.clock = clock
        self.action_dim = env.action_space.shape[0]

    def reset(self, seed: int) -> None:
        obs, _ = self.env.reset(seed=seed)
        self.obs, self.t_obs = obs, self.clock()
        self.t0: float | None = None
        self.steps = 0  # control steps executed
        self.held = 0  # of which without a command
        self.pending: np.ndarray | None = None
        self.last: np.ndarray | None = None
        self.success, self.done = False, False
        self.return_, self.max_reward = 0.0, 0.0
        self.error: str | None = None

    def read(self) -> tuple[float, np.ndarray]:
        self._catch_up()
        return self.t_obs, self.obs

    def send(self, action: np.ndarray, t: float) -> None:
        if self.t0 is None:
            self.t0 = t
        self._catch_up()
        self.pending = np.asarray(action, np.float32)

    def _catch_up(self) -> None:
        """Step every control step that has ended by now."""
        if self.t0 is None:
            return
        now = self.clock()
        while not self.done and self.t0 + (self.steps + 1) * self.period <= now:
            action = self.pending
            if action is None:
                action = hold_action(self.last, self.action_dim)
                self.held += 1
            self.pending = None
            self._step(action)

    def _step(self, action: np.ndarray) -> None:
        if not np.all(np.isfinite(action)):
            self.error, self.done = f"non-finite action at step {self.steps}", True
            return
        try:
            obs, reward, terminated, truncated, info = self.env.step(action)
        except Exception as err:  # MuJoCo instability surfaces as an exception from the sim
            self.error, self.done = f"simulator error at step {self.steps}: {err}", True
            return
        self.steps += 1
        self.last = action
        self.obs, self.t_obs = obs, self.t0 + self.steps * self.period
        self.return_ += reward
        self.max_reward = max(self.max_reward, reward)
        self.success = self.success or bool(info["success"])
        self.done = bool(terminated or truncated)
