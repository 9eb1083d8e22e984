"""ToolHang's scripted expert: stand the frame in its base, then hang the tool on the frame's hook.

The frame starts lying on the table and must be stood on its end in the hand, so unlike the
other experts this one drives full orientations of the grip site. Each grasp is top-down with the
fingers across the part (the frame's rod, the tool's handle) and the grip site's y axis towards
one of its ends; the frame is then turned so that this axis points up or down:

- the frame is carried with the hand pointing to the robot's right (-y), its rod upright, and
  lowered tip first into the stand's mount, closed-loop on where the tip is and how the rod leans
  (it pivots a little in the fingers);
- that leaves the hook pointing away from the robot (+x), where the hand cannot point along it
  (the wrist runs into its limits). So the hand takes the hook's bar near the corner and turns the
  frame a quarter turn in its mount, until the hook points to the right;
- the tool stays flat, grasped top-down across its handle and turned so that the handle points
  along the hook, away from the frame: its ring is lowered over the hook's raised end until it
  rests on the bar, then the handle is tipped down about that resting point, so that the ring
  swings round the bar past the raised end, slid on a little, and let go, to hang.

A turn goes in two stages, the yaw first (pointing down) and then the pitch: the one-stage turn
along the shortest rotation often runs the Panda's wrist (joint 6) into its limit. The ring cannot
be threaded on from the hook's free end: its octagonal hole is 19.4 mm across its flats and the
raised end with the bar under it 19.45 mm tall. Lowered flat over the raised end (7.5 mm square)
it has 6 mm to spare on every side (docs/tasks-and-data.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
from scipy.spatial.transform import Rotation

from envs.experts import GRIP_CLOSE, GRIP_OPEN, Move, ScriptedExpert, Target, heading, wrap_near

DOWN = np.array([0.0, 0.0, -1.0])
UP = -DOWN
RIGHT = np.array([0.0, -1.0, 0.0])
CARRY_Z = 1.16  # m: above the assembled frame's hook (about 1.03), where the hand turns freely


def hand_frame(y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """The grip site's rotation whose y axis is `y` and z axis (the approach) `z` (orthogonal)."""
    y, z = y / np.linalg.norm(y), z / np.linalg.norm(z)
    return np.stack([np.cross(y, z), y, z], axis=1)


def level(v: np.ndarray) -> np.ndarray:
    """`v` projected on the horizontal plane, unit length."""
    h = np.array([v[0], v[1], 0.0])
    return h / max(np.linalg.norm(h), 1e-9)


def pitch_back(rot: np.ndarray) -> np.ndarray:
    """The pointing-down orientation that `rot` tilts from: `rot` turned about a horizontal axis
    until its approach axis points down (the first stage of a two-stage turn to `rot`)."""
    return turn_onto(rot[:, 2], DOWN) @ rot


def turn_onto(v: np.ndarray, goal: np.ndarray) -> np.ndarray:
    """The smallest rotation that turns unit vector `v` onto unit vector `goal`."""
    return Rotation.align_vectors(goal[None], v[None])[0].as_matrix()


class ToolHangExpert(ScriptedExpert):
    """The ToolHang script: frame into the stand, then tool onto the hook (see the module)."""

    def script(self) -> Iterator[Move | None]:
        rng = self.rng
        # The parts are dropped onto the table at reset: let them come to rest first.
        steps = int(rng.integers(6, 11))
        yield Move("settle", None, GRIP_OPEN, pos_tol=np.inf, rot_tol=np.inf, min_steps=steps,
                   max_steps=steps)
        frame_ends = ("frame_tip_site", "frame_intersection_site")
        plan = self._plan("frame_grip_frame", frame_ends, (hand_frame(DOWN, RIGHT), hand_frame(UP, RIGHT)))
        yield from self._pick("frame_grip_frame", plan, (0.1, 0.15))
        yield from self._stand_frame(plan)
        yield from self._level()
        yield from self._turn_frame()
        along = self.hook()[1]
        tool_ends = ("tool_hole1_center", "tool_hole2_center")
        plan = self._plan("tool_grip_g0", tool_ends, (hand_frame(-along, DOWN), hand_frame(along, DOWN)))
        yield Move("over-tool", lambda: (np.array([*self.geom_pos("tool_grip_g0")[:2], CARRY_Z - 0.06]),
                   plan[0]), GRIP_OPEN, pos_tol=0.02, rot_tol=0.1, max_steps=80, free=True)
        yield from self._pick("tool_grip_g0", plan, (0.12, 0.16))
        yield from self._hang_tool(plan)

    # -- privileged state ---------------------------------------------------------------------
    def geom_pos(self, name: str) -> np.ndarray:
        return np.array(self.sim.data.geom_xpos[self.sim.model.geom_name2id(name)])

    def mount(self) -> np.ndarray:
        """The middle of the stand's mount (between its four walls), at the walls' top."""
        walls = np.array([self.geom_pos(f"stand_wall{i}") for i in range(4)])
        top = self.top_of(self.sim.model.geom_bodyid[self.sim.model.geom_name2id("stand_wall0")])
        return np.array([*walls[:, :2].mean(axis=0), top])

    def rod(self) -> np.ndarray:
        """Unit vector along the frame's rod, from its top corner to its tip."""
        v = self.site_pos("frame_tip_site") - self.site_pos("frame_intersection_site")
        return v / np.linalg.norm(v)

    def hook(self) -> tuple[np.ndarray, np.ndarray]:
        """The hook's free end and its unit direction (from the rod to the free end)."""
        corner, end = self.site_pos("frame_intersection_site"), self.site_pos("frame_hang_site")
        return end, (end - corner) / np.linalg.norm(end - corner)

    def _ring(self) -> tuple[np.ndarray, np.ndarray]:
        """The tool's ring: the unit direction from its centre to its first segment (along the
        handle, away from the grip) and its axis (unit, the right-hand normal of segments 0, 2)."""
        c = self.site_pos("tool_hole1_center")
        first = self.geom_pos("tool_hole1_hc_0") - c
        third = self.geom_pos("tool_hole1_hc_2") - c
        axis = np.cross(first, third)
        return first / np.linalg.norm(first), axis / np.linalg.norm(axis)

    def bring(self, point: Callable[[], np.ndarray], goal: Callable[[], np.ndarray],
              rot: Callable[[], np.ndarray]) -> Callable[[], Target]:
        """A target that moves the hand so that the held `point` reaches `goal` (the hand moved by
        the point's error, so a part that slips in the fingers is still brought there)."""
        return lambda: (self.eef_pos() + goal() - point(), rot())

    # -- planning -------------------------------------------------------------------------------
    def _plan(self, grip: str, ends: tuple[str, str], finals: tuple[np.ndarray, np.ndarray]):
        """How to grasp part `grip` and turn it: (grasp heading, heading before the pitch, final
        orientation), headings unwrapped within the wrist's travel.

        The fingers close across the part with the site's y axis towards `ends[0]` or `ends[1]`;
        `finals[i]` is the orientation the part is carried in after the grasp towards `ends[i]`.
        Of the grasps and turns that keep joint 7 inside its travel, the one that turns it least;
        where none does (a part lying at an awkward heading), the one that leaves it least.
        """
        lo, hi = self.wrist_room()
        plans = []
        for end, final in zip(ends, finals):
            grasp = heading(hand_frame(level(self.site_pos(end) - self.geom_pos(grip)), DOWN))
            turn = wrap_near(heading(pitch_back(final)) - grasp, 2 * math.pi, 0.0)
            for k in range(-2, 3):
                g = wrap_near(grasp, 2 * math.pi, self.eef_yaw()) + 2 * math.pi * k
                for t in (turn - 2 * math.pi, turn, turn + 2 * math.pi):
                    outside = max(0.0, lo - g, g - hi, lo - (g + t), g + t - hi)
                    plans.append((outside, abs(g - self.eef_yaw()) + abs(t), g, g + t, final))
        return min(plans, key=lambda p: p[:2])[2:]

    # -- phases ---------------------------------------------------------------------------------
    def _pick(self, grip: str, plan: tuple, lift: tuple[float, float]) -> Iterator[Move | None]:
        """Grasp part `grip` top-down at the plan's heading and lift it by `lift` (m, drawn from
        the range); grasp again (from above) after a miss."""
        rng = self.rng
        yaw = plan[0]
        for attempt in range(2):
            hover = rng.uniform(0.06, 0.1)
            dz = rng.uniform(-0.002, 0.003)
            along = rng.uniform(-0.004, 0.004) * np.array([-math.sin(yaw), math.cos(yaw), 0.0])

            def point() -> np.ndarray:
                return self.geom_pos(grip) + along

            yield Move("approach", lambda: (point() + [0, 0, hover], yaw), GRIP_OPEN, pos_tol=0.01,
                       rot_tol=0.08, max_steps=120, free=True)
            yield Move("descend", lambda: (point() + [0, 0, dz], yaw), GRIP_OPEN, pos_tol=0.003,
                       rot_tol=0.05, max_steps=60, speed=rng.uniform(0.4, 0.7))
            yield self.grip(GRIP_CLOSE)
            up = rng.uniform(*lift)
            yield Move("lift", lambda: (self.eef_pos() + [0, 0, up], yaw), GRIP_CLOSE, pos_tol=0.02,
                       rot_tol=0.1, max_steps=60, track=False, speed=rng.uniform(0.5, 0.8))
            if self.holding(self.geom_pos(grip), radius=0.04):
                return
            yield self.grip(GRIP_OPEN)
            yield self.rise(GRIP_OPEN, 0.05)

    def _turn(self, pos: Callable[[], np.ndarray], plan: tuple, name: str) -> Iterator[Move | None]:
        """Turn the hand as planned in two stages, the yaw (pointing down), then the pitch to the
        final orientation, while holding it at `pos`."""
        speed = self.rng.uniform(0.55, 0.8)
        _, yaw, final = plan
        yield Move(f"{name}-yaw", lambda: (pos(), yaw), GRIP_CLOSE, pos_tol=0.03, rot_tol=0.1,
                   max_steps=60, speed=speed)
        yield Move(f"{name}-pitch", lambda: (pos(), final), GRIP_CLOSE, pos_tol=0.02, rot_tol=0.06,
                   max_steps=90, speed=speed)

    def _stand_frame(self, plan: tuple) -> Iterator[Move | None]:
        rng = self.rng
        tip = lambda: self.site_pos("frame_tip_site")  # noqa: E731
        mount = self.mount()
        # Turn beside the mount, high enough that the rod, once upright, hangs clear of the stand.
        reach = np.linalg.norm(tip() - self.eef_pos())
        side = np.array([mount[0], mount[1] - rng.uniform(0.06, 0.1),
                         mount[2] + reach + rng.uniform(0.04, 0.07)])
        yield Move("carry", lambda: (side, plan[0]), GRIP_CLOSE, pos_tol=0.03, rot_tol=0.1,
                   max_steps=80, track=False, free=True)
        yield from self._turn(lambda: side, plan, "turn-frame")

        def lean() -> np.ndarray:
            """The hand's orientation that would stand the rod straight up as it is held now."""
            return turn_onto(self.rod(), DOWN) @ self.eef_rot()

        hover = rng.uniform(0.015, 0.03)
        yield Move("over-mount", self.bring(tip, lambda: mount + [0, 0, hover], lean), GRIP_CLOSE,
                   pos_tol=0.002, rot_tol=0.03, settle=2, max_steps=120, speed=rng.uniform(0.3, 0.5))
        yield self.pause(GRIP_CLOSE)

        def down() -> np.ndarray:
            # Down only while the tip is over the mount; off it, hold height and come back over.
            off = np.linalg.norm(tip()[:2] - mount[:2]) > 0.003
            return np.array([*mount[:2], tip()[2] if off else mount[2] - 0.13])

        yield Move("insert", self.bring(tip, down, lean), GRIP_CLOSE, pos_tol=0.004, rot_tol=0.05,
                   max_steps=150, speed=rng.uniform(0.3, 0.45),
                   until=lambda: tip()[2] < mount[2] - 0.1)
        yield self.grip(GRIP_OPEN)
        back = rng.uniform(0.06, 0.1)
        yield Move("back", lambda: (self.eef_pos() - back * self.eef_rot()[:, 2], self.eef_rot()), GRIP_OPEN,
                   pos_tol=0.01, rot_tol=np.inf, max_steps=40, track=False)

    def _level(self) -> Iterator[Move | None]:
        """Up above the frame, then point the hand down again (a pitch, no yaw)."""
        yield Move("up", lambda: (np.array([*self.eef_pos()[:2], CARRY_Z]), self.eef_rot()), GRIP_OPEN,
                   pos_tol=0.02, rot_tol=np.inf, max_steps=40, track=False)
        yield Move("level", lambda: (np.array([*self.eef_pos()[:2], CARRY_Z]), pitch_back(self.eef_rot())),
                   GRIP_OPEN, pos_tol=0.03, rot_tol=0.08, max_steps=60, track=False)

    def _turn_frame(self) -> Iterator[Move | None]:
        """Turn the standing frame a quarter turn about its rod, so that its hook points to the
        robot's right (-y) instead of away from it: the hand can point along the hook there to
        thread the tool, where pointing away from the robot runs the wrist into its limits. The rod
        turns freely in the mount (its diagonal, 1.06 cm, is less than the mount's 1.2 cm)."""
        rng = self.rng
        along = self.hook()[1]
        corner = self.site_pos("frame_intersection_site")
        bar_z = corner[2]
        reach = rng.uniform(0.015, 0.025)  # along the hook from the corner
        grasp = corner + along * reach
        across = heading(np.array([[-along[1]], [along[0]], [0.0]]))  # the fingers across the bar
        lo, hi = self.wrist_room()
        turn = -math.pi / 2  # the hook from +x round to -y: the heading falls by a quarter turn
        yaws = [wrap_near(across, math.pi, self.eef_yaw()) + k * math.pi for k in range(-2, 3)]
        yaws = [y for y in yaws if lo <= y <= hi and lo <= y + turn <= hi] or yaws
        yaw = min(yaws, key=lambda y: abs(y - self.eef_yaw()))
        hover = rng.uniform(0.05, 0.08)
        yield Move("over-bar", lambda: (grasp + [0, 0, hover], yaw), GRIP_OPEN, pos_tol=0.01, rot_tol=0.08,
                   max_steps=100, free=True)
        yield Move("onto-bar", lambda: (np.array([*grasp[:2], bar_z]), yaw), GRIP_OPEN, pos_tol=0.003,
                   rot_tol=0.05, max_steps=60, speed=rng.uniform(0.4, 0.6))
        yield self.grip(GRIP_CLOSE)
        # Round the rod's axis in two steps, the grasp point on a circle about it.
        pivot = np.array([*corner[:2], bar_z])
        for k in (1, 2):
            r = Rotation.from_rotvec([0.0, 0.0, turn * k / 2]).as_matrix()
            point = pivot + r @ (grasp - pivot)
            yield Move("turn-frame", lambda p=point, y=yaw + turn * k / 2: (p, y), GRIP_CLOSE, pos_tol=0.004,
                       rot_tol=0.06, max_steps=40, speed=rng.uniform(0.6, 0.8), track=False)
        yield self.grip(GRIP_OPEN)
        yield self.rise(GRIP_OPEN, rng.uniform(0.06, 0.09))

    def _hang_tool(self, plan: tuple) -> Iterator[Move | None]:
        """Lower the ring over the hook's raised end, flat, until it rests on the bar beside it;
        then tip the handle down about that resting point, so the ring swings round the bar past
        the raised end, and let go: the tool hangs on the bar, the raised end keeping it on."""
        rng = self.rng
        m = self.sim.model
        hole = lambda: self.site_pos("tool_hole1_center")  # noqa: E731
        half = 0.0035  # the ring's half height
        toward = rng.uniform(0.001, 0.003)  # the ring's centre from the raised end's, towards the corner

        def over(height: float, rest_on: str = "frame_hook_frame") -> Callable[[], np.ndarray]:
            """The ring's centre over the raised end (where it stands now: the frame can lean and
            drift in its mount), its underside `height` above the top of geom `rest_on`."""
            def point() -> np.ndarray:
                c = self.geom_pos("frame_hook_frame") - self.hook()[1] * toward
                top = self.geom_pos(rest_on)[2] + m.geom_size[m.geom_name2id(rest_on)][2]
                return np.array([c[0], c[1], top + half + height])
            return point

        yaw = plan[1]  # pointing down: the heading, unwrapped within the wrist's travel
        yield Move("carry", self.bring(hole, over(rng.uniform(0.03, 0.05)), lambda: yaw), GRIP_CLOSE,
                   pos_tol=0.01, rot_tol=0.08, max_steps=100, free=True)
        yield Move("over-post", self.bring(hole, over(0.006), lambda: yaw), GRIP_CLOSE, pos_tol=0.0015,
                   rot_tol=0.03, settle=2, max_steps=80, speed=rng.uniform(0.35, 0.5))
        yield Move("lower", self.bring(hole, over(0.001, "frame_horizontal_frame"), lambda: yaw), GRIP_CLOSE,
                   pos_tol=0.002, rot_tol=0.04, max_steps=60, speed=rng.uniform(0.3, 0.45))
        along = self.hook()[1]
        # Tip the handle down about the ring's inner edge on the bar, beyond the raised end.
        pivot = hole() - along * 0.0097 - np.array([0, 0, half])
        axis = np.cross(along, DOWN)
        axis /= np.linalg.norm(axis)
        start_pos, start_rot = self.eef_pos(), self.eef_rot()
        tip = rng.uniform(0.9, 1.1)
        for k in range(1, 4):
            r = Rotation.from_rotvec(axis * tip * k / 3).as_matrix()
            yield Move("tip", lambda r=r: (pivot + r @ (start_pos - pivot), r @ start_rot), GRIP_CLOSE,
                       pos_tol=0.004, rot_tol=0.06, max_steps=40, speed=rng.uniform(0.4, 0.6), track=False)
        # On along the bar, so that the ring clears the raised end, then let go.
        slide = rng.uniform(0.01, 0.015)
        yield Move("slide-on", lambda: (self.eef_pos() - along * slide, self.eef_rot()), GRIP_CLOSE,
                   pos_tol=0.003, rot_tol=0.06, max_steps=30, speed=rng.uniform(0.3, 0.45), track=False)
        yield self.grip(GRIP_OPEN)
        back = rng.uniform(0.05, 0.08)
        yield Move("back", lambda: (self.eef_pos() - back * self.eef_rot()[:, 2], self.eef_rot()), GRIP_OPEN,
                   pos_tol=0.01, rot_tol=np.inf, max_steps=40, track=False)
