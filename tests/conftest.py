import os

import pytest

os.environ.setdefault("MUJOCO_GL", "egl")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    # Tests count and compare; they time nothing. One thread keeps tiny models from paying
    # thread hand-offs (and from fighting a training job for the cores).
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A tiny policy trained for a few steps on 3 real expert demonstrations of lift."""
    from envs.collect import collect, store_attrs
    from envs.store import write_store
    from policy.diffusion import PolicyConfig
    from policy.network import UNetConfig
    from policy.train import TrainConfig, train

    root = tmp_path_factory.mktemp("rollout")
    episodes, failed = collect("lift", n_demos=3, seed=0, workers=1, progress=False)
    keys = ("obs", "action", "state", "reward", "success")
    store = write_store(root / "lift.zarr", [{k: e[k] for k in keys} for e in episodes],
                        store_attrs("lift", episodes, failed, 0))
    cfg = TrainConfig(data=str(store), out=str(root / "run"), steps=20, batch_size=16, val_fraction=0.0,
                      progress=False, threads=1, checkpoint_every=20,
                      policy=PolicyConfig(unet=UNetConfig(down_dims=[16, 32], step_embed_dim=16, n_groups=4)))
    return train(cfg)
