"""Mixed-proficiency ("mh") demonstrations: operators, strategies, their records in the store,
training on a selection of them, and telling the strategies apart in a chunk."""

import json
import math

import numpy as np
import pytest

from common.errors import UserError
from envs.experts import OPERATORS, PROFICIENCIES, operator_of
from envs.modes import BETWEEN, STRATEGIES, SquareModes, nut_yaw, square_turns
from envs.store import open_store, select_episodes, write_store

from commands import dp


def test_the_six_operators_take_turns_by_seed_two_of_each_proficiency():
    assert [operator_of(s).index for s in range(12)] == [0, 1, 2, 3, 4, 5] * 2
    kinds = [op.proficiency for op in OPERATORS]
    assert kinds.count("better") == kinds.count("okay") == kinds.count("worse") == 2
    worse, better = OPERATORS[4], OPERATORS[0]
    assert worse.speed < better.speed and worse.most_pause > better.most_pause and worse.miss > better.miss
    assert np.mean([op.ccw for op in OPERATORS]) == pytest.approx(0.5)


def test_an_mh_store_records_who_demonstrated_each_episode_and_how(mh_store):
    with open_store(mh_store, task="square") as store:
        meta = store.episode_meta
        assert store.n_episodes == 2 and store.attrs["demos"] == "mh"
        assert list(meta["operator"]) == [0, 1]
        assert [PROFICIENCIES[p] for p in meta["proficiency"]] == ["better", "better"]
        assert store.attrs["episode_meta"] == {"proficiency": list(PROFICIENCIES),
                                               "strategy": list(STRATEGIES)}
        assert set(meta["strategy"]) <= {0, 1} and (meta["decision_step"] > 0).all()
        assert len(store.attrs["operators"]) == 6


def test_the_chunk_the_operator_ran_at_the_decision_state_shows_its_strategy(mh_store):
    modes = SquareModes()
    with open_store(mh_store) as store:
        layout = store.attrs["obs_layout"]
        for i in range(store.n_episodes):
            ep, step = store.episode(i), store.episode_meta["decision_step"][i]
            chunk = ep["action"][step:step + 16]
            way = modes.classify(chunk[None], ep["obs"][:step + 1], layout)[0]
            assert way == store.episode_meta["strategy"][i]
            # the nut ends on the alignment that strategy turns to: a quarter-turn symmetry of the peg
            cw, ccw = square_turns(nut_yaw(ep["obs"][step], layout))
            goal = nut_yaw(ep["obs"][step], layout) + (cw, ccw)[store.episode_meta["strategy"][i]]
            end = nut_yaw(ep["obs"][-1], layout)
            assert abs((end - goal + math.pi / 4) % (math.pi / 2) - math.pi / 4) < 0.15


def test_square_turns_go_each_way_to_the_nearest_reachable_alignment():
    cw, ccw = square_turns(math.pi - 0.3)  # a little short of the handle pointing at the robot
    assert cw == pytest.approx(-(math.pi / 2 - 0.3)) and ccw == pytest.approx(0.3)
    cw, ccw = square_turns(0.2)  # the handle away from the robot: the way through 0 is skipped
    assert cw == pytest.approx(-math.pi / 2 - 0.2) and ccw == pytest.approx(math.pi / 2 - 0.2)
    chunks = np.zeros((3, 16, 7))
    chunks[0, :, 5], chunks[1, :, 5] = -0.5, 0.5  # turning each way; the third not at all (averaged)
    assert list(SquareModes().classify(chunks, np.zeros((2, 23)), {})) == [0, 1, BETWEEN]


def test_episodes_are_selected_by_proficiency_operator_and_strategy(mh_store):
    with open_store(mh_store) as store:
        strategy = store.episode_meta["strategy"]
        assert list(select_episodes(store, "all")) == [0, 1]
        assert list(select_episodes(store, "better")) == [0, 1]
        assert list(select_episodes(store, "operator1")) == [1]
        same_way = list(np.flatnonzero(strategy == strategy[0]))
        assert list(select_episodes(store, STRATEGIES[strategy[0]])) == same_way
        with pytest.raises(UserError, match="episodes: 'worse' selects none of the 2 episodes"):
            select_episodes(store, "worse")
        with pytest.raises(UserError, match="cannot select 'bogus'; it offers all, better, clockwise"):
            select_episodes(store, "better+bogus")


def test_training_on_a_selection_uses_only_its_episodes(mh_store, tmp_path):
    from envs.tasks import TaskConfig
    from policy.train import TrainConfig, load_data

    square = TaskConfig(name="square")
    cfg = TrainConfig(task=square, data=str(mh_store), episodes="operator0+operator1", val_fraction=0.5)
    train_set, val_set, _, meta = load_data(cfg)
    assert meta["episodes"] == "operator0+operator1" and len(meta["val_episodes"]) == 1
    with pytest.raises(UserError, match="episodes: 'operator1' selects 1 episodes .* at least 2"):
        load_data(TrainConfig(task=square, data=str(mh_store), episodes="operator1"))
    r = dp("dp-train", "task=square", f"data={mh_store}", "episodes=worse", f"out={tmp_path}/run", "steps=1")
    assert r.returncode == 2 and "episodes: 'worse' selects none" in r.stderr


def test_per_episode_records_of_the_wrong_length_are_refused(tmp_path):
    episode = {"obs": np.zeros((2, 23), np.float32), "action": np.zeros((2, 7), np.float32),
               "state": np.zeros((2, 3)), "reward": np.zeros(2), "success": np.ones(2, bool)}
    with pytest.raises(ValueError, match="meta/operator: expected 1 integers"):
        write_store(tmp_path / "a.zarr", [episode], {"task": "square"}, episode_meta={"operator": [0, 1]})
    assert not (tmp_path / "a.zarr").exists()


def test_plain_collection_stays_the_proficient_expert():
    from envs.collect import CollectConfig

    assert CollectConfig().demos == "ph"
    with pytest.raises(UserError, match="demos: 'xh' is not one of ph, mh"):
        CollectConfig(demos="xh")


def test_a_shipped_mh_policy_carries_its_decision_states_and_says_it_is_mh(mh_store, tmp_path):
    from envs.tasks import TaskConfig
    from policy.diffusion import PolicyConfig
    from policy.network import UNetConfig
    from policy.train import TrainConfig, train
    from policy.zoo import DECISIONS, export

    cfg = TrainConfig(task=TaskConfig(name="square"), data=str(mh_store), out=str(tmp_path / "run"), steps=2,
                      batch_size=4, val_fraction=0.5, progress=False, threads=1, checkpoint_every=2,
                      policy=PolicyConfig(unet=UNetConfig(down_dims=[16, 32], step_embed_dim=16, n_groups=4)))
    zoo = export(train(cfg), tmp_path / "square_mh", command="test")
    meta = json.loads((zoo / "policy.json").read_text())["meta"]
    assert meta["demos"] == "mh" and meta["seeds_used"] == [0, 1]
    with np.load(zoo / DECISIONS) as f:
        decisions = f["obs"]
    assert decisions.shape == (1, 2, 23)  # the one validation episode's decision state
    with open_store(mh_store) as store:
        e = meta["val_episodes"][0]
        step = store.episode_meta["decision_step"][e]
        assert np.array_equal(decisions[0, -1], store.episode(e)["obs"][step])
