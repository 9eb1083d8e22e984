"""Scenes a demonstration set needs beyond its task's own robosuite environment.

Can's mixed-proficiency set ("mh") stands a divider in the gap between the two bins, across the
straight carry path, so the can must be carried round it: past its near end (towards the robot)
or its far end. Both arcs are valid; their average, the straight path, runs into the divider.
The divider's size and place are in `envs.tasks.DIVIDER`, which the expert and the mode reader
share without importing the simulator. Importing this module registers the environment with
robosuite (its environments register themselves when their class is made).
"""

from __future__ import annotations

from robosuite.environments.manipulation.pick_place import PickPlaceCan
from robosuite.utils.mjcf_utils import new_body, new_geom

from envs.tasks import DIVIDER


class PickPlaceCanDivider(PickPlaceCan):
    """PickPlaceCan with a fixed divider (a thin wall, no joint) standing between the bins."""

    def _load_model(self):
        super()._load_model()
        d = DIVIDER
        size = (d.half_length, d.half_thickness, d.height / 2)
        body = new_body(name="divider", pos=(d.x, d.y, d.bottom + d.height / 2))
        # robosuite's convention: a collision geom (group 0, not drawn) and a visual twin (group 1,
        # drawn by every camera, image observations included, and touching nothing)
        body.append(new_geom(name="divider", type="box", size=size, group=0, rgba=(0.5, 0.5, 0.5, 1.0),
                             friction=(1.0, 0.005, 0.0001)))
        body.append(new_geom(name="divider_visual", type="box", size=size, group=1, contype=0, conaffinity=0,
                             rgba=(0.2, 0.35, 0.75, 1.0)))  # blue: the bins are wood
        self.model.worldbody.append(body)
