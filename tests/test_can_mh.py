"""Can's mixed-proficiency demonstrations: the divider scene they are made in, the two ways round
it, and a policy trained on them acting in that scene."""

import numpy as np
import pytest

from common.errors import UserError
from envs.modes import BETWEEN, CAN_STRATEGIES, CanModes
from envs.store import open_store, select_episodes
from envs.tasks import DIVIDER, demo_scene, get_task

LAYOUT = {k: list(v) for k, v in get_task("can").obs_layout.items()}


def _divider_contacts(env) -> set[str]:
    sim = env.unwrapped_robosuite.sim
    divider = sim.model.geom_name2id("divider")
    touching = set()
    for i in range(sim.data.ncon):
        pair = tuple(sim.data.contact[i].geom)
        if divider in pair:
            touching.add(sim.model.geom_id2name(pair[1] if pair[0] == divider else pair[0]))
    return touching


def test_only_can_mh_has_a_scene_and_an_unknown_scene_is_refused():
    assert demo_scene("can", "mh") == "divider"
    assert demo_scene("can", "ph") == demo_scene("square", "mh") == ""
    spec = get_task("can").in_scene("divider")
    assert spec.env_name == "PickPlaceCanDivider" and spec.env_settings()["scene"] == "divider"
    assert "scene" not in get_task("can").env_settings()
    with pytest.raises(UserError, match="scene: task 'lift' has no scene 'divider'; known: none"):
        get_task("lift").in_scene("divider")


def test_the_straight_carry_runs_into_the_divider():
    """The proficient expert carries the can straight across: in the divider scene it is stopped
    there (the average of the two ways round is this path); in the task's own scene it succeeds."""
    from envs import make_env
    from envs.experts import expert_rng, make_expert

    env = make_env("can", scene="divider")
    expert = make_expert("can", expert_rng(0))
    env.reset(seed=0)
    expert.reset(env)
    touching, success = set(), False
    for _ in range(150):
        _, _, done, _, info = env.step(expert.act(env))
        touching |= _divider_contacts(env)
        success = success or info["success"]
    assert expert.strategy is None and not success
    assert touching and all(name.startswith(("gripper0", "Can")) for name in touching)  # the can, the hand
    rs = env.unwrapped_robosuite
    assert expert.body_pos(rs.obj_body_id[rs.obj_to_use])[1] < DIVIDER.y  # held up short of it
    env.close()


def test_the_divider_is_drawn_and_a_plain_can_scene_has_none():
    from envs import make_env

    env = make_env("can", scene="divider")
    env.reset(seed=0)
    model = env.unwrapped_robosuite.sim.model
    drawn = model.geom_name2id("divider_visual")
    assert model.geom_group[drawn] == 1 and model.geom_contype[drawn] == model.geom_conaffinity[drawn] == 0
    assert model.geom_group[model.geom_name2id("divider")] == 0  # the one that collides
    env.close()
    plain = make_env("can")
    plain.reset(seed=0)
    model = plain.unwrapped_robosuite.sim.model
    assert not {"divider", "divider_visual"} & {model.geom(i).name for i in range(model.ngeom)}
    plain.close()


def test_a_can_mh_store_carries_the_can_round_the_divider_each_way_without_touching_it(can_mh_store):
    from envs import make_env

    with open_store(can_mh_store, task="can") as store:
        assert store.attrs["scene"] == "divider" and store.attrs["env"]["env_name"] == "PickPlaceCanDivider"
        assert store.attrs["episode_meta"]["strategy"] == list(CAN_STRATEGIES)
        strategy = store.episode_meta["strategy"]
        assert sorted(strategy) == [0, 1]  # seed 0 near, seed 1 far
        assert list(select_episodes(store, "far")) == [int(np.flatnonzero(strategy == 1)[0])]
        env = make_env("can", scene="divider")
        modes = CanModes()
        for i in range(store.n_episodes):
            ep, step = store.episode(i), store.episode_meta["decision_step"][i]
            history = ep["obs"][:step + 1]
            assert modes.decisive(history, LAYOUT)
            assert modes.classify(ep["action"][step:step + 16][None], history, LAYOUT)[0] == strategy[i]
            # where the can crossed the divider's line: beyond the end its strategy names
            can_xy = ep["obs"][:, 7:9]  # the object block: the can relative to the hand, then in the world
            k = int(np.argmax(can_xy[:, 1] >= DIVIDER.y))
            near, far = DIVIDER.ends
            assert (can_xy[k, 0] < near) if strategy[i] == 0 else (can_xy[k, 0] > far)
            # replayed in the scene, the can never touches the divider. (The hand or forearm may
            # brush its top edge in passing, a few millimetres deep: seeds 1, 7 and 15 of 0-23 on one
            # machine, while seed 1 did not on another: which seeds do depends on the floating point.)
            env.reset(seed=int(store.attrs["episode_seeds"][i]))
            env.set_state(ep["state"][0])
            for action in ep["action"]:
                env.step(action)
                assert not {name for name in _divider_contacts(env) if name.startswith("Can")}
        env.close()


def test_chunks_are_read_as_near_far_or_into_the_divider():
    obs = np.zeros((1, 23), np.float32)
    obs[0, LAYOUT["robot0_eef_pos"][0]:][:2] = (DIVIDER.x, -0.25)  # over the first bin, behind the divider
    chunks = np.zeros((4, 16, 7))
    chunks[:, :, 1] = 0.6  # across, towards the goal bin
    chunks[0, :, 0], chunks[1, :, 0] = -0.35, 0.35  # veering to the near end, to the far end
    chunks[3, :, 1] = 0.0  # not moving across at all
    assert list(CanModes().classify(chunks, obs, LAYOUT)) == [0, 1, BETWEEN, BETWEEN]
    obs[0, LAYOUT["robot0_eef_pos"][0] + 1] = DIVIDER.y - 0.05  # at the divider already: no choice left
    assert not CanModes().decisive(obs, LAYOUT)


def test_a_policy_trained_on_can_mh_acts_in_the_divider_scene(can_mh_store, tmp_path):
    from envs.tasks import TaskConfig
    from policy.diffusion import PolicyConfig
    from policy.checkpoint import load_policy
    from policy.network import UNetConfig
    from policy.train import TrainConfig, train
    from rollouts.runner import make_policy_env

    cfg = TrainConfig(task=TaskConfig(name="can"), data=str(can_mh_store), out=str(tmp_path / "run"), steps=2,
                      batch_size=4, val_fraction=0.5, progress=False, threads=1, checkpoint_every=2,
                      policy=PolicyConfig(unet=UNetConfig(down_dims=[16, 32], step_embed_dim=16, n_groups=4)))
    policy = load_policy(train(cfg))
    assert policy.meta["scene"] == "divider"
    env = make_policy_env(policy)
    assert env.spec_task.scene == "divider"
    env.unwrapped_robosuite.sim.model.geom_name2id("divider")  # raises if the scene lacks it
    env.close()
