"""Which ways the Panda's hand can point at ToolHang's hook (measurement script, not product code):
for each hand position, the empty hand goes there pointing down, then turns (yaw, then pitch, as
the ToolHang expert turns) to point away from the robot (+x) or to either side (+y, -y), with its
y axis up or down; prints whether it got there and the joint angles it ended at. Pointing away
from the robot every turn ends at a joint's limit (joint 6 at 3.75 rad, or joint 5 at 2.9);
pointing sideways it gets there with one of the two rolls (the other ends at joint 7's limit,
which the expert's grasp planning avoids).

    uv run python experiments/toolhang_reach.py 0.02,0.045,1.125 -0.08,0.045,1.2
"""

import sys

import numpy as np

from envs.expert_toolhang import hand_frame, pitch_back
from envs.experts import GRIP_OPEN, Move, ScriptedExpert
from envs.robosuite_env import make_env

AXES = {"+x": (1, 0, 0), "+y": (0, 1, 0), "-y": (0, -1, 0), "+z": (0, 0, 1), "-z": (0, 0, -1)}


class Reach(ScriptedExpert):
    """Go to `where` pointing down, then turn to `final` there."""

    def __init__(self, where: np.ndarray, final: np.ndarray):
        super().__init__(np.random.default_rng(0))
        self.where, self.final = where, final

    def script(self):
        down = self.eef_rot()
        yield Move("go", lambda: (self.where, down), GRIP_OPEN, pos_tol=0.01, rot_tol=0.05, max_steps=80)
        yield Move("yaw", lambda: (self.where, pitch_back(self.final)), GRIP_OPEN, pos_tol=0.01,
                   rot_tol=0.05, max_steps=80)
        yield Move("pitch", lambda: (self.where, self.final), GRIP_OPEN, pos_tol=0.005, rot_tol=0.03,
                   max_steps=120)


def main(points: list[str]) -> None:
    env = make_env("toolhang")
    print("| hand at | points | site y axis | reached | joints (rad) |")
    print("|---|---|---|---|---|")
    for text in points:
        where = np.array([float(v) for v in text.split(",")])
        for z in ("+x", "+y", "-y"):
            for y in ("-z", "+z"):
                env.reset(seed=0)
                expert = Reach(where, hand_frame(np.array(AXES[y], float), np.array(AXES[z], float)))
                expert.reset(env)
                for _ in range(280):
                    env.step(expert.act(env))
                    if len(expert.phase_log) == 3:
                        break
                near = np.linalg.norm(expert.eef_pos() - where) < 0.01
                ok = near and expert._rot_error(expert.final) < 0.05
                m, d = expert.sim.model, expert.sim.data
                q = [d.qpos[m.jnt_qposadr[m.joint_name2id(j)]] for j in expert.rs.robots[0].robot_joints]
                print(f"| {text} | {z} | {y} | {'yes' if ok else 'no'} | {np.round(q, 2).tolist()} |")


if __name__ == "__main__":
    main(sys.argv[1:] or ["0.02,0.045,1.125", "-0.08,0.045,1.2"])
