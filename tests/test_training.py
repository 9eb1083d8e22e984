"""Training, checkpoints and loading, on small real stores (issue 3 groundwork)."""

import json
import numpy as np
import pytest
import torch

from common.errors import UserError
import policy
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
        out.append({"obs": obs, "action": action, "state": np.zeros((T, 4)),
                    "reward": np.zeros(T, np.float32), "success": np.arange(T) == T - 1})
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


def test_a_fresh_run_starts_from_another_policys_weights(store, tmp_path):
    """init= fine-tunes: the new run's first weights are the given policy's EMA weights (a run
    at lr ~0 keeps them); a resumed run ignores it; another network is one line."""
    source = policy.load(train(_cfg(store, tmp_path / "src", steps=10)))
    tuned = policy.load(train(_cfg(store, tmp_path / "ft", steps=1, lr=1e-30, init=str(tmp_path / "src"))),
                        ema=False)
    for a, b in zip(source.net.parameters(), tuned.net.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    fresh = policy.load(train(_cfg(store, tmp_path / "scratch", steps=1, lr=1e-30)), ema=False)
    assert any(not torch.allclose(a, b) for a, b in zip(source.net.parameters(), fresh.net.parameters()))
    wide = PolicyConfig(unet=UNetConfig(down_dims=[16, 64], step_embed_dim=16, n_groups=4))
    with pytest.raises(UserError, match=r"init: .*src.* has policy.unet.down_dims=\[16, 32\], "
                                        r"this run \[16, 64\]"):
        train(_cfg(store, tmp_path / "bad", steps=1, init=str(tmp_path / "src"), policy=wide))


def test_init_from_a_policy_of_another_observation_size_names_both_sizes(store, tmp_path):
    """A lift policy (19 observation dims) as the start of a run on a can store (23): the refusal
    names obs_dim and both sizes, not the source policy's files."""
    train(_cfg(store, tmp_path / "lift", steps=1))
    rng = np.random.default_rng(0)
    can = get_task("can")
    episodes = [{"obs": rng.normal(size=(24, can.obs_dim)).astype(np.float32),
                 "action": rng.uniform(-1, 1, (24, 7)).astype(np.float32), "state": np.zeros((24, 4)),
                 "reward": np.zeros(24, np.float32), "success": np.arange(24) == 23} for _ in range(4)]
    layout = {k: list(v) for k, v in can.obs_layout.items()}
    can_store = write_store(tmp_path / "can.zarr", episodes, {"task": "can", "obs_layout": layout})
    cfg = _cfg(can_store, tmp_path / "can", steps=1, init=str(tmp_path / "lift"), val_fraction=0.0)
    cfg.task.name = "can"
    with pytest.raises(UserError, match=r"^init: .*lift.* has obs_dim 19 \(task lift\), this run 23 "
                                        r"\(task can"):
        train(cfg)


# What the UNet and the schedule need of `policy.*`: each refused in one line naming the key,
# before dp-train writes anything to out= (no .lock, no tensorboard/).
@pytest.mark.parametrize("setting, says", [
    ("policy.n_obs_steps=0", "policy.n_obs_steps: 0 must be at least 1"),
    ("policy.n_obs_steps=-1", "policy.n_obs_steps: -1 must be at least 1"),
    ("policy.schedule.num_train_timesteps=0", "policy.schedule.num_train_timesteps: 0 must be at least 1"),
    ("policy.schedule.num_train_timesteps=1000000000", "num_train_timesteps: 1000000000 must be <= 10000"),
    ("policy.unet.down_dims=[]", "policy.unet.down_dims: [] must list at least one"),
    ("policy.unet.down_dims=[16,0]", "policy.unet.down_dims[1]: 0 must be at least 1"),
    ("policy.unet.kernel_size=0", "policy.unet.kernel_size: 0 must be at least 1"),
    ("policy.unet.kernel_size=4", "policy.unet.kernel_size: 4 must be odd"),
    ("policy.unet.n_groups=0", "policy.unet.n_groups: 0 must be at least 1"),
    ("policy.unet.n_groups=7", "policy.unet.n_groups: 7 does not divide the channel count 16"),
    ("policy.unet.step_embed_dim=1", "policy.unet.step_embed_dim: 1 must be >= 4"),
    ("policy.unet.step_embed_dim=18", None),  # even: fine
    ("policy.unet.step_embed_dim=17", "policy.unet.step_embed_dim: 17 must be even"),
    ("policy.schedule.beta_schedule=bogus", "policy.schedule.beta_schedule: 'bogus' is not one of linear"),
    ("policy.horizon=1000000", "policy.horizon: 1000000 is more than 1024 actions a plan"),
    ("policy.horizon=18", "policy.horizon: 18 is not a positive multiple of 4"),
])
def test_dp_train_refuses_a_policy_number_the_network_cannot_take_before_writing(store, tmp_path, setting,
                                                                                  says):
    from commands import dp, one_line_error

    out = tmp_path / "run"
    r = dp("dp-train", f"data={store}", f"out={out}", "steps=1", "batch_size=8", "val_fraction=0",
           "threads=1", "progress=false", "policy.unet.down_dims=[16,32,64]", "policy.unet.step_embed_dim=16",
           "policy.unet.n_groups=4", setting)
    if says is None:
        assert r.returncode == 0, r.stderr[-2000:]
        return
    one_line_error(r, "dp-train", says)
    assert not out.exists()


TINY = ["steps=1", "batch_size=8", "val_fraction=0", "threads=1", "progress=false", "checkpoint_every=1",
        "policy.unet.down_dims=[16,32]", "policy.unet.step_embed_dim=16", "policy.unet.n_groups=4"]


# A full disk (simulated by a file-size limit: each weights file is 333 kB, trainer.pt 1 MB):
# safetensors raises SafetensorError and torch.save a RuntimeError ("unexpected pos"); both are
# one line naming the file, and the partial checkpoint is gone.
@pytest.mark.parametrize("limit, file", [(100_000, "weights.safetensors"), (600_000, "trainer.pt")])
def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_no_partial_checkpoint(store, tmp_path, limit,
                                                                                       file):
    from commands import dp, file_size_limit, one_line_error

    out = tmp_path / "run"
    with file_size_limit(limit):
        r = dp("dp-train", f"data={store}", f"out={out}", *TINY)
    one_line_error(r, "dp-train", f"checkpoints/step-0000001/{file}: ", "file-size limit")
    assert list((out / "checkpoints").iterdir()) == []  # no partial directory, no `latest`


def test_a_full_disk_under_tensorboard_is_one_line_naming_its_folder(store, tmp_path, monkeypatch):
    """TensorBoard's writer thread raises the OSError of a failed write, naming no file, at the next call."""
    import errno
    import os

    from torch.utils.tensorboard import SummaryWriter

    from commands import dp, one_line_error

    def full(self, *args, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(SummaryWriter, "add_scalar", full)
    out = tmp_path / "run"
    r = dp("dp-train", f"data={store}", f"out={out}", *TINY, "log_every=1")
    one_line_error(r, "dp-train", f"{out / 'tensorboard'}: No space left on device (the disk is full")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(store, tmp_path):
    train(_cfg(store, tmp_path / "nan", steps=50, stop_at=2))
    with pytest.raises(UserError, match=r"loss: became (nan|inf) at step \d+; .* last good checkpoint is "
                                        r".*step-0000002"):
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


def test_data_parallel_training_under_torchrun_takes_the_steps_one_process_takes(lift_demos, tmp_path):
    """2 gloo processes (torchrun) on the same global batch end at the weights of one process, to
    float tolerance; a run checkpointed by 2 processes resumes in 1 and still agrees."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from commands import dp

    store = lift_demos  # the tiny policy's three demonstrations
    args = [f"data={store}", "batch_size=8", "val_fraction=0", "threads=1", "progress=false",
            "checkpoint_every=3", "warmup_steps=1", "policy.unet.down_dims=[16,32]",
            "policy.unet.step_embed_dim=16", "policy.unet.n_groups=4"]
    one = dp("dp-train", *args, "steps=6", "stop_at=3", f"out={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "policy.train", *args, "steps=6", "stop_at=3", f"out={tmp_path / 'two'}"],
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]

    def weights(run):
        ckpt = run / "checkpoints" / "latest"
        return {k: v for name in ("weights", "weights_ema") for k, v in
                {f"{name}.{k}": v for k, v in load_file(ckpt / f"{name}.safetensors").items()}.items()}

    def agree(a, b):
        wa, wb = weights(a), weights(b)
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)

    agree(tmp_path / "one", tmp_path / "two")
    assert json.loads((tmp_path / "two" / "checkpoints" / "latest" / "policy.json").read_text())["step"] == 3
    # resume: the 2-process run continues in one process, the 1-process run likewise
    for run in ("one", "two"):
        r = dp("dp-train", *args, "steps=6", f"out={tmp_path / run}")
        assert r.returncode == 0 and "resuming" in r.stdout, r.stderr
    agree(tmp_path / "one", tmp_path / "two")


def test_each_process_takes_its_share_of_the_batch_one_process_draws(checkpoint):
    """The data-parallel split: the shares' losses average to the whole batch's loss (same noise
    and steps), each share is a different half, and a batch that does not split is refused."""
    from policy.distributed import World

    pol = policy.load(checkpoint)
    rng = np.random.default_rng(0)
    obs = torch.as_tensor(rng.normal(size=(8, pol.cfg.n_obs_steps, pol.obs_dim)), dtype=torch.float32)
    act = torch.as_tensor(rng.uniform(-1, 1, size=(8, pol.cfg.horizon, pol.action_dim)), dtype=torch.float32)
    full = pol.loss(obs, act, torch.Generator().manual_seed(0))
    shares = [World(r, 2).share(8) for r in (0, 1)]
    assert shares == [(0, 4), (4, 8)]
    parts = [pol.loss(obs[a:b], act[a:b], torch.Generator().manual_seed(0), part=(a, 8)) for a, b in shares]
    torch.testing.assert_close((parts[0] + parts[1]) / 2, full, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(parts[0], parts[1])
    with pytest.raises(UserError, match="batch_size: 9 does not split over 2 processes"):
        World(0, 2).share(9)
