"""ToolHang (`task=toolhang`): robomimic's long-horizon task as a gymnasium env, and its scripted
expert's stages in the real simulator: the frame stood in its base and turned so that its hook
points to the robot's right, then the tool's ring lowered over the hook's raised end and tipped
round the bar. (tests/test_experts.py tests whole episodes, as for every task.)"""

import math

import numpy as np
import pytest

import envs
from envs.expert_toolhang import DOWN, RIGHT, hand_frame, pitch_back
from envs.experts import expert_rng, make_expert
from envs.tasks import TASKS


@pytest.fixture(scope="module")
def env():
    e = envs.make_env("toolhang")
    yield e
    e.close()


def test_toolhang_is_robomimics_task_with_its_horizon_and_state(env):
    obs, info = env.reset(seed=0)
    spec = TASKS["toolhang"]
    assert spec.env_name == "ToolHang" and spec.horizon == 700 and spec.object_dim == 44
    assert obs.shape == (44 + 3 + 4 + 2,) and not info["success"]
    assert obs[42] == 0.0 and obs[43] == 0.0  # robosuite's flags: frame assembled, tool on frame


def run_until(env, expert, phase: str, most: int = 700) -> int:
    """Step `expert` until its phase log records `phase` as finished; returns the steps taken."""
    for step in range(most):
        env.step(expert.act(env))
        if any(name == phase for name, _ in expert.phase_log):
            return step + 1
    raise AssertionError(f"phase {phase!r} not reached in {most} steps: {expert.phase_log}")


@pytest.mark.parametrize("seed", [0, 1])
def test_the_expert_stands_the_frame_turns_its_hook_right_and_lowers_the_ring_over_its_end(env, seed):
    env.reset(seed=seed)
    expert = make_expert("toolhang", expert_rng(seed))
    expert.reset(env)
    rs = env.unwrapped_robosuite
    run_until(env, expert, "back")  # let go of the frame, standing in the mount
    assert rs._check_frame_assembled() and env.low_dim_obs()[42] == 1.0
    end, along = expert.hook()
    assert along[0] > 0.9  # the hook as the frame went in: away from the robot
    run_until(env, expert, "retreat")  # took the bar, turned the frame a quarter turn, let go
    end, along = expert.hook()
    assert rs._check_frame_assembled() and along[1] < -0.9  # still standing, the hook to the right
    assert not rs._check_tool_on_frame()
    run_until(env, expert, "lower")  # the ring, flat, lowered over the raised end onto the bar
    ring, post = expert.site_pos("tool_hole1_center"), expert.geom_pos("frame_hook_frame")
    post_top = post[2] + rs.sim.model.geom_size[rs.sim.model.geom_name2id("frame_hook_frame")][2]
    assert np.linalg.norm((ring - post)[:2]) < 0.0097 and ring[2] < post_top  # the raised end in the hole
    assert abs(expert._ring()[1][2]) > 0.99 and not rs._check_tool_on_frame()  # flat, not yet hung


def test_hand_frames_are_rotations_and_pitch_back_points_the_hand_down():
    rng = np.random.default_rng(0)
    for _ in range(20):
        z = rng.normal(size=3)
        y = np.cross(z, rng.normal(size=3))
        r = hand_frame(y, z)
        np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
        assert math.isclose(np.linalg.det(r), 1.0) and np.allclose(r[:, 2], z / np.linalg.norm(z))
        down = pitch_back(r)
        np.testing.assert_allclose(down[:, 2], DOWN, atol=1e-9)  # pointing down
        axis = np.cross(r[:, 2], DOWN)  # turned only about the horizontal axis the tilt is about
        np.testing.assert_allclose(down @ r.T @ axis, axis, atol=1e-9)


def test_full_orientation_targets_turn_the_hand_to_them(env):
    """The expert's phase machine takes a 3x3 orientation as a target as well as a heading."""
    from envs.experts import GRIP_OPEN, Move, ScriptedExpert

    goal = hand_frame(DOWN, np.array([0.0, -1.0, 0.0]))  # pointing right, the site's y axis down

    class Turn(ScriptedExpert):
        def script(self):
            here = self.eef_pos()
            yield Move("turn", lambda: (here, goal), GRIP_OPEN, pos_tol=0.01, rot_tol=0.05, max_steps=150)

    env.reset(seed=0)
    expert = Turn(np.random.default_rng(0))
    expert.reset(env)
    start = expert._rot_error(goal)
    for _ in range(150):
        env.step(expert.act(env))
        if expert.phase_log:
            break
    assert start > 1.0 and expert._rot_error(goal) < 0.05 and expert.phase_log[0][0] == "turn"


def test_a_part_at_a_heading_no_grasp_fits_still_gets_the_grasp_that_leaves_the_wrist_least(env):
    env.reset(seed=0)
    expert = make_expert("toolhang", expert_rng(0))
    expert.reset(env)
    ends = ("tool_hole1_center", "tool_hole2_center")
    finals = (hand_frame(RIGHT, DOWN), hand_frame(-RIGHT, DOWN))
    lo, hi = expert.wrist_room()
    grasp, before_pitch, _ = expert._plan("tool_grip_g0", ends, finals)
    assert lo <= grasp <= hi and lo <= before_pitch <= hi
    expert.wrist_room = lambda: (hi + 10.0, hi + 10.5)  # no heading fits: the nearest to that range
    grasp, before_pitch, _ = expert._plan("tool_grip_g0", ends, finals)
    assert grasp > hi + 5.0 and before_pitch > hi + 5.0
