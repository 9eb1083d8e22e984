"""A robosuite manipulation task behind the gymnasium API.

This is the only module that imports robosuite, and only when an env is built.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import gymnasium as gym
import numpy as np

from envs.tasks import ACTION_DIM, OBS_KEYS, ObsConfig, TaskSpec, get_task

# Offscreen rendering through EGL works on the CPU (Mesa) here; set before mujoco is imported.
os.environ.setdefault("MUJOCO_GL", "egl")


# What robosuite logs at import on every machine, whatever the task: its macro file is optional
# (we set what we need in code), and the robots and IK it cannot find are ones no task here uses.
STARTUP_NOISE = (
    "No private macro file found",
    "It is recommended to use a private macro file",
    "To setup, run:",
    "Could not import robosuite_models",
    "Could not load the mink-based whole-body IK",
    "Loading controller configuration from",
)
SINGLE_ARM_PARTS = ("right",)


def _load_triton_first() -> None:
    """Load triton now if it is installed (torch brings it): its libtriton.so carries an LLVM of
    its own, and loaded into a process after Mesa's software renderer (EGL on the CPU, which
    carries another) it crashes the process with a segmentation fault: a rollout that renders,
    then imports diffusers (which imports triton), would die. Loaded first, both work."""
    import importlib.util

    if importlib.util.find_spec("triton") is not None:
        import triton  # noqa: F401


class _StartupNoise:
    """A filter on robosuite's own logger that drops exactly its start-up notices above; every
    other message of robosuite, warnings included, still shows."""

    def filter(self, record) -> bool:
        return not str(record.msg).startswith(STARTUP_NOISE)


def _quiet_robosuite() -> None:
    import logging

    logger = logging.getLogger("robosuite_logs")  # robosuite's logger (robosuite.utils.log_utils)
    if not any(isinstance(f, _StartupNoise) for f in logger.filters):
        logger.addFilter(_StartupNoise())


class RobosuiteEnv(gym.Env):
    """One robosuite task with robomimic's observation as a float32 vector.

    - `obs` (`envs.tasks.ObsConfig`): `state` (default), the low-dim vector with object poses;
      `image`, the proprioceptive keys then each camera's frame (uint8 values, HWC, top row
      first) flattened, rendered offscreen (EGL) at every step. `images()` gives the frames of
      the last observation as robomimic's `<camera>_image` uint8 arrays, `low_dim_obs()` the
      state vector (privileged, for demonstrations) in either mode.
    - `observation_layout`: key -> (start, stop) slice of the observation vector.
    - `info["success"]`: the task's own success check after the step.
    - `reset(seed=s)`: the same `s` gives the same model (object sizes) and the same initial
      MuJoCo state, bit for bit. `reset()` without a seed keeps the model and draws the next
      initial state from the running stream.
    - `get_state()` / `set_state()`: the complete dynamic state, for replaying recorded episodes:
      `reset(seed=episode_seed)`, then `set_state(first_state)`, then the episode's actions.
    - Episodes are truncated at the task's horizon; `terminate_on_success` ends them at success.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(
        self,
        task: str | TaskSpec,
        seed: int | None = None,
        render: bool = False,
        terminate_on_success: bool = True,
        camera: str = "agentview",
        render_size: tuple[int, int] = (256, 256),
        obs: ObsConfig | dict | None = None,
    ):
        self.spec_task = task if isinstance(task, TaskSpec) else get_task(task)
        self.obs = ObsConfig.from_dict(obs)
        self.obs.check_cameras(self.spec_task)  # robosuite's own refusal is a traceback, in every worker
        self.render_mode = "rgb_array" if render else None
        self.terminate_on_success = terminate_on_success
        self.camera = camera
        self.render_size = render_size
        self._default_seed = seed
        self._seeded = False
        self._t = 0

        if render or self.obs.image:
            _load_triton_first()
        _quiet_robosuite()  # before the import, which logs them
        import robosuite
        from robosuite.controllers import load_composite_controller_config

        t = self.spec_task
        if t.scene:
            import envs.scenes  # noqa: F401  (registers the scenes' environments with robosuite)
        controller = load_composite_controller_config(controller=t.controller)
        # The BASIC config has a part for every robot robosuite knows (left arm, torso, head,
        # base, legs); a single arm has only its right one, and robosuite warns about each other.
        controller["body_parts"] = {k: v for k, v in controller["body_parts"].items()
                                    if k in SINGLE_ARM_PARTS}
        self._env = robosuite.make(
            t.env_name,
            robots=t.robot,
            controller_configs=controller,
            has_renderer=False,
            has_offscreen_renderer=render or self.obs.image,
            use_camera_obs=self.obs.image,
            **(dict(camera_names=list(self.obs.cameras), camera_heights=self.obs.size,
                    camera_widths=self.obs.size)
               if self.obs.image else {}),
            use_object_obs=True,
            control_freq=t.control_freq,
            horizon=t.horizon,
            ignore_done=True,  # the horizon is enforced here, as gymnasium truncation
            reward_shaping=False,
            hard_reset=False,  # only seeded resets rebuild the model (see reset)
            seed=seed,
            **t.env_kwargs,
        )
        self.observation_layout = t.layout(self.obs)
        dim = max(b for _, b in self.observation_layout.values())
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (dim,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (ACTION_DIM,), np.float32)
        self._last_obs: dict[str, np.ndarray] | None = None

    # -- gymnasium API -------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is None and not self._seeded:
            seed = self._default_seed
        if seed is not None:
            # robosuite draws object sizes (Lift's cube), placements and joint noise from env.rng,
            # an object shared with its placement samplers: re-seed it in place, and rebuild the
            # model (a hard reset, ~0.2 s) so that the seed determines the sizes too.
            self._env.rng.bit_generator.state = np.random.default_rng(seed).bit_generator.state
            self._seeded = True
        self._env.hard_reset = seed is not None
        if self._env.hard_reset:
            self._free_render_context()
        raw = self._env.reset()
        self._render_quality()
        self._zero_gripper_commands()
        # robosuite builds the controllers before its last forward pass, so their first step uses
        # a stale mass matrix; anchoring them here, as set_state does, makes a replay from the
        # first recorded state take exactly the steps the episode took.
        self._anchor_controllers()
        raw = self._fresh_observations()
        self._t = 0
        self._last_obs = raw
        return self._flatten(raw), {"success": False}

    def step(self, action):
        action = np.asarray(action, dtype=np.float64).reshape(ACTION_DIM)
        if not np.all(np.isfinite(action)):
            raise ValueError(f"action must be finite, got {action}")
        raw, reward, _, _ = self._env.step(np.clip(action, -1.0, 1.0))
        self._t += 1
        self._last_obs = raw
        success = bool(self._env._check_success())
        terminated = success and self.terminate_on_success
        truncated = self._t >= self.spec_task.horizon
        return self._flatten(raw), float(reward), terminated, truncated, {"success": success}

    def render(self):
        if self.render_mode != "rgb_array":
            raise RuntimeError("this env was made without render=True")
        w, h = self.render_size
        frame = self._env.sim.render(camera_name=self.camera, width=w, height=h)
        return np.ascontiguousarray(frame[::-1])  # MuJoCo's image origin is bottom-left

    def close(self):
        self._free_render_context()
        self._env.close()

    # -- state for replay ------------------------------------------------------------------
    # The state is MuJoCo's full integration state (time, qpos, qvel, actuator activations,
    # warm-start accelerations, ctrl, mocap, ...) followed by each gripper's commanded position,
    # which robosuite keeps in Python between steps. With less than that (robosuite's own
    # time/qpos/qvel flattening) a replay drifts by ~1e-3 within a few steps.
    def get_state(self) -> np.ndarray:
        """The simulator's complete dynamic state as a float64 vector (see `set_state`)."""
        import mujoco

        m, d = self._mj
        full = np.empty(mujoco.mj_stateSize(m, mujoco.mjtState.mjSTATE_INTEGRATION))
        mujoco.mj_getState(m, d, full, mujoco.mjtState.mjSTATE_INTEGRATION)
        return np.concatenate([full, *[g.current_action for g in self._grippers()]])

    def set_state(self, state: np.ndarray) -> np.ndarray:
        """Restore a state from `get_state()`, or robosuite's (time, qpos, qvel) flattening as
        robomimic stores it; returns the observation there. Controllers are re-anchored at the
        restored pose, as at the start of an episode."""
        import mujoco

        state = np.asarray(state, dtype=np.float64).ravel()
        m, d = self._mj
        n_full = mujoco.mj_stateSize(m, mujoco.mjtState.mjSTATE_INTEGRATION)
        grippers = self._grippers()
        n_grip = sum(g.current_action.size for g in grippers)
        if state.size == n_full + n_grip:
            mujoco.mj_setState(m, d, state[:n_full], mujoco.mjtState.mjSTATE_INTEGRATION)
            offset = n_full
            for g in grippers:
                g.current_action = state[offset : offset + g.current_action.size].copy()
                offset += g.current_action.size
        elif state.size == 1 + m.nq + m.nv:
            self._env.sim.set_state_from_flattened(state)
            self._zero_gripper_commands()
        else:
            raise ValueError(
                f"state has {state.size} values; {self.spec_task.name} expects {n_full + n_grip} "
                f"(get_state) or {1 + m.nq + m.nv} (time, qpos, qvel)"
            )
        mujoco.mj_forward(m, d)
        self._anchor_controllers()
        raw = self._fresh_observations()
        self._last_obs = raw
        return self._flatten(raw)

    @property
    def _mj(self):
        sim = self._env.sim
        return sim.model._model, sim.data._data

    def _grippers(self) -> list:
        return [g for robot in self._env.robots for g in robot.gripper.values()]

    def _free_render_context(self) -> None:
        # A hard reset drops the simulator but robosuite never frees its offscreen GL context:
        # ~100 MB leak per episode. Free the MuJoCo and EGL contexts ourselves first.
        ctx = getattr(self._env.sim, "_render_context_offscreen", None)
        if ctx is not None:
            ctx.con.free()
            ctx.gl_ctx.free()
            self._env.sim._render_context_offscreen = None

    def _render_quality(self) -> None:
        """Apply `obs.render` to a freshly built render context (robosuite makes one per model)."""
        ctx = getattr(self._env.sim, "_render_context_offscreen", None)
        if ctx is None or self.obs.render != "fast" or getattr(ctx, "_parapolicy_fast", False):
            return
        import mujoco
        from robosuite.utils.binding_utils import MjRenderContextOffscreen

        # Multisampling is set when the context's buffers are made: rebuild it without.
        self._env.sim.model._model.vis.quality.offsamples = 0
        self._free_render_context()
        # registers itself
        ctx = MjRenderContextOffscreen(self._env.sim, device_id=self._env.render_gpu_device_id)
        ctx.vopt.geomgroup[0] = 1 if self._env.render_collision_mesh else 0
        ctx.vopt.geomgroup[1] = 1 if self._env.render_visual_mesh else 0
        ctx.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        ctx._parapolicy_fast = True

    def _zero_gripper_commands(self) -> None:
        # Without hard resets robosuite keeps each gripper's commanded position from the previous
        # episode; a new episode starts from zero, as a freshly built env does. The command is
        # created with one value per gripper DOF but holds one per finger after the first step;
        # formatting a zero action gives it that final shape now, so every state has one length.
        for g in self._grippers():
            g.current_action = np.zeros(g.dof)
            g.format_action(np.zeros(g.dof))

    def _fresh_observations(self) -> dict[str, np.ndarray]:
        # Each robosuite observable samples on its own timer, which runs on across episodes; the
        # phase decides which physics substep a step's observation comes from. Restarting the
        # timers here makes the observations a function of the state alone.
        env = self._env
        env._obs_cache = {}
        for observable in env._observables.values():
            observable.reset()
        # Object-to-gripper sensors read the gripper pose from the cache that the robot's own
        # sensors fill during the same pass, after them: a second pass sees it (else zeros).
        env._get_observations(force_update=True)
        return env._get_observations(force_update=True)

    def _anchor_controllers(self) -> None:
        for robot in self._env.robots:
            for ctrl in robot.composite_controller.part_controllers.values():
                ctrl.update(force=True)
                if hasattr(ctrl, "update_initial_joints"):
                    ctrl.update_initial_joints(ctrl.joint_pos)  # also resets the goal to here
                else:
                    ctrl.reset_goal()

    # -- privileged access for scripted experts ------------------------------------------------
    @property
    def unwrapped_robosuite(self):
        """The underlying robosuite environment (privileged state for scripted experts)."""
        return self._env

    @property
    def raw_obs(self) -> dict[str, np.ndarray]:
        """robosuite's observation dict from the last reset/step."""
        return self._last_obs

    @property
    def elapsed_steps(self) -> int:
        return self._t

    def low_dim_obs(self) -> np.ndarray:
        """The low-dim (state-mode) observation vector of the last reset/step/set_state."""
        raw = self._last_obs
        return np.concatenate([raw["object-state"] if key == "object" else raw[key]
                               for key in OBS_KEYS]).astype(np.float32)

    def images(self) -> dict[str, np.ndarray]:
        """The camera frames of the last observation: `<camera>_image` -> uint8 [H, W, 3], top
        row first (robosuite renders bottom row first; robomimic flips them the same way)."""
        return {key: np.ascontiguousarray(self._last_obs[key][::-1]) for key in self.obs.image_keys}

    def _flatten(self, raw: dict[str, np.ndarray]) -> np.ndarray:
        if not self.obs.image:
            return self.low_dim_obs()
        parts = [raw[key].astype(np.float32) for key in self.observation_layout
                 if key not in self.obs.image_keys]
        parts += [frame.reshape(-1).astype(np.float32) for frame in self.images().values()]
        return np.concatenate(parts)


def make_env(task: str, seed: int | None = None, render: bool = False, scene: str | None = None,
             horizon: int | None = None, **kwargs: Any) -> RobosuiteEnv:
    """A gymnasium env for `task` (lift, can or square), in `scene` if given (can: `divider`, the
    scene of its mh demonstrations), its episodes truncated at `horizon` control steps if given
    (default: the task's); see `RobosuiteEnv`."""
    spec = get_task(task).in_scene(scene)
    if horizon is not None:
        spec = replace(spec, horizon=horizon)
    return RobosuiteEnv(spec, seed=seed, render=render, **kwargs)
