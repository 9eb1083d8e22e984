"""Training, checkpoints and loading, on small real stores (issue 3 groundwork)."""

import numpy as np
import pytest
import torch

import policy
from envs.errors import UserError
from envs.store import write_store
from envs.tasks import get_task
from policy.checkpoint import check_matches
from policy.diffusion import PolicyConfig
from policy.network import UNetConfig
from policy.train import TrainConfig, train

SPEC = get_task("lift")


def _episodes(n: int, seed: int = 0):
    """Episodes whose actions are a smooth function of a drifting observation."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        T = int(rng.integers(20, 30))
        obs = np.cumsum(rng.normal(0, 0.05, (T, SPEC.obs_dim)), axis=0).astype(np.float32)
        action = np.tanh(obs[:, :7] * 3).astype(np.float32)
        out.append({"obs": obs, "action": action, "state": np.zeros((T, 4)), "reward": np.zeros(T, np.float32),
                    "success": np.arange(T) == T - 1})
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "lift.zarr"
    layout = {k: list(v) for k, v in SPEC.obs_layout.items()}
    return write_store(path, _episodes(6), {"task": "lift", "obs_layout": layout})


def _cfg(store, out, **kw) -> TrainConfig:
    cfg = TrainConfig(data=str(store), out=str(out), batch_size=32, warmup_steps=5, log_every=5, val_every=10,
                      checkpoint_every=10, val_fraction=0.2, progress=False, threads=1,
                      policy=PolicyConfig(unet=UNetConfig(down_dims=[16, 32], step_embed_dim=16, n_groups=4)))
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def _val_loss_at(ckpt, store):
    from policy.train import load_data, validation_loss

    pol = policy.load(ckpt, ema=False)  # the EMA lags by design; the raw weights show learning
    _, val, _, _ = load_data(_cfg(store, "unused"))
    return validation_loss(pol, pol.net, val, torch.device("cpu"), seed=0)


def test_short_training_run_lowers_the_loss(store, tmp_path):
    first = train(_cfg(store, tmp_path / "a", steps=10, lr=3e-3))
    before = _val_loss_at(first, store)
    last = train(_cfg(store, tmp_path / "a", steps=200, lr=3e-3))  # resumes at 10
    after = _val_loss_at(last, store)
    assert after < 0.85 * before, (before, after)


def test_checkpoint_round_trip_gives_identical_plans(store, tmp_path):
    ckpt = train(_cfg(store, tmp_path / "b", steps=10))
    p1, p2 = policy.load(ckpt), policy.load(tmp_path / "b")  # a checkpoint, and a run's latest
    hist = np.random.default_rng(0).normal(size=(2, SPEC.obs_dim)).astype(np.float32)
    p1.seed(3), p2.seed(3)
    a1, a2 = p1.plan(hist), p2.plan(hist)
    assert a1.actions.shape == (8, 7)
    np.testing.assert_array_equal(a1.actions, a2.actions)
    assert a1.model_evals == 100 and a1.parallel_iters == 100
    raw = policy.load(ckpt, ema=False)
    assert any(not torch.equal(a, b) for a, b in zip(raw.net.parameters(), p1.net.parameters()))


def test_resume_after_interruption_continues_the_same_run(store, tmp_path):
    whole = train(_cfg(store, tmp_path / "whole", steps=20))
    train(_cfg(store, tmp_path / "cut", steps=20, stop_at=10))  # interrupted at step 10
    resumed = train(_cfg(store, tmp_path / "cut", steps=20))
    assert resumed.name == "step-0000020"
    for a, b in zip(policy.load(whole).net.parameters(), policy.load(resumed).net.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_same_seed_same_run(store, tmp_path):
    a = policy.load(train(_cfg(store, tmp_path / "s1", steps=5)))
    b = policy.load(train(_cfg(store, tmp_path / "s2", steps=5)))
    assert all(torch.equal(x, y) for x, y in zip(a.net.parameters(), b.net.parameters()))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(store, tmp_path):
    train(_cfg(store, tmp_path / "nan", steps=50, stop_at=2))
    with pytest.raises(UserError, match=r"loss: became (nan|inf) at step \d+; .* last good checkpoint is .*step-0000002"):
        train(_cfg(store, tmp_path / "nan", steps=50, lr=1e30, warmup_steps=1, checkpoint_every=1000))
    assert policy.load(tmp_path / "nan").meta["step"] == 2


def test_store_with_too_few_episodes_is_refused(store, tmp_path):
    with pytest.raises(UserError, match="has 6 episodes; training needs at least 10"):
        train(_cfg(store, tmp_path / "few", steps=5, min_episodes=10))


def test_checkpoint_of_another_task_is_refused(store, tmp_path):
    pol = policy.load(train(_cfg(store, tmp_path / "t", steps=2)))
    with pytest.raises(UserError, match="trained on task 'lift', not 'can'"):
        check_matches(pol, "can", get_task("can").obs_layout)
    check_matches(pol, "lift", SPEC.obs_layout)


def test_missing_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such checkpoint"):
        policy.load(tmp_path / "nothing")
