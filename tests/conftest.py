import asyncio
import os
import threading

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
def _window_cache_of_this_run(tmp_path_factory):
    # window=auto caches its measurements per machine; a test run keeps its own, away from the user's
    os.environ["PARAPOLICY_CACHE"] = str(tmp_path_factory.mktemp("cache") / "window-auto.json")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    # Tests count and compare; they time nothing. One thread keeps tiny models from paying
    # thread hand-offs (and from fighting a training job for the cores).
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def lift_demos(tmp_path_factory):
    """3 real expert demonstrations of lift in a zarr store."""
    from envs.collect import collect, store_attrs
    from envs.store import write_store

    root = tmp_path_factory.mktemp("lift")
    episodes, failed = collect("lift", n_demos=3, seed=0, workers=1, progress=False)
    keys = ("obs", "action", "state", "reward", "success")
    return write_store(root / "lift.zarr", [{k: e[k] for k in keys} for e in episodes],
                       store_attrs("lift", episodes, failed, 0))


def _tiny_run(store, out, policy):
    from policy.train import TrainConfig, train

    cfg = TrainConfig(data=str(store), out=str(out), steps=20, batch_size=16, val_fraction=0.0,
                      progress=False, threads=1, checkpoint_every=20, policy=policy)
    return train(cfg)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, lift_demos):
    """A tiny policy trained for a few steps on 3 real expert demonstrations of lift."""
    from policy.diffusion import PolicyConfig
    from policy.network import UNetConfig

    return _tiny_run(lift_demos, tmp_path_factory.mktemp("rollout") / "run",
                     PolicyConfig(unet=UNetConfig(down_dims=[16, 32], step_embed_dim=16, n_groups=4)))


@pytest.fixture(scope="session")
def transformer_checkpoint(tmp_path_factory, lift_demos):
    """The same, with Diffusion Policy's transformer denoiser (2 layers, 2 heads, 16 wide)."""
    from policy.diffusion import PolicyConfig
    from policy.transformer import TransformerConfig

    return _tiny_run(lift_demos, tmp_path_factory.mktemp("transformer") / "run",
                     PolicyConfig(net="transformer",
                                  transformer=TransformerConfig(n_layer=2, n_head=2, n_emb=16)))


@pytest.fixture(scope="session")
def mh_store(tmp_path_factory):
    """Two real mixed-proficiency square demonstrations by dp-collect (seeds 0 and 1: two better
    operators, one each way round)."""
    from commands import dp

    out = tmp_path_factory.mktemp("mh") / "square_mh.zarr"
    r = dp("dp-collect", "task=square", "demos=mh", "n_demos=2", "seed=0", "workers=2", f"out={out}")
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="session")
def can_mh_store(tmp_path_factory):
    """Two real mixed-proficiency can demonstrations by dp-collect in the divider scene (seeds 0
    and 1: two better operators, past the divider's near end and its far end)."""
    from commands import dp

    out = tmp_path_factory.mktemp("can_mh") / "can_mh.zarr"
    r = dp("dp-collect", "task=can", "demos=mh", "n_demos=2", "seed=0", "workers=2", f"out={out}")
    assert r.returncode == 0, r.stderr
    return out


SMALL_IMAGES = {"mode": "image", "cameras": ["agentview", "robot0_eye_in_hand"], "size": 32, "render": "fast"}


@pytest.fixture(scope="session")
def image_store(tmp_path_factory):
    """Two real lift expert demonstrations with both cameras rendered at 32x32 (in process)."""
    from envs.collect import store_attrs
    from envs.experts import expert_episode
    from envs.robosuite_env import make_env
    from envs.store import write_store
    from envs.tasks import ObsConfig

    obs = ObsConfig(**SMALL_IMAGES)
    env = make_env("lift", obs=obs)
    episodes = [expert_episode(env, "lift", seed) for seed in (0, 1)]
    env.close()
    keys = ("obs", "action", "state", "reward", "success", *obs.image_keys)
    return write_store(tmp_path_factory.mktemp("images") / "lift_image.zarr",
                       [{k: e[k] for k in keys} for e in episodes], store_attrs("lift", episodes, [], 0, obs))


@pytest.fixture(scope="session")
def image_checkpoint(image_store, tmp_path_factory):
    """A tiny image policy (ResNet width 8) trained a few steps on `image_store`."""
    from envs.tasks import ObsConfig
    from policy.diffusion import PolicyConfig
    from policy.network import UNetConfig
    from policy.train import TrainConfig, train
    from policy.vision import VisionConfig

    cfg = TrainConfig(data=str(image_store), out=str(tmp_path_factory.mktemp("image-run") / "run"), steps=4,
                      batch_size=4, val_fraction=0.0, progress=False, threads=1, checkpoint_every=4,
                      obs=ObsConfig(**SMALL_IMAGES),
                      policy=PolicyConfig(unet=UNetConfig(down_dims=[16, 32], step_embed_dim=16, n_groups=4),
                                          vision=VisionConfig(width=8, keypoints=8, feature_dim=16, crop=28)))
    return train(cfg)


@pytest.fixture
def start_server(checkpoint):
    """Start a server (in a thread, on a free port) for the tiny policy (or the checkpoint at
    `path`); stopped after the test."""
    stops = []

    def start(max_message_mb: float = 8.0, path=None):
        from policy.checkpoint import load_policy
        from policy.samplers import SamplerConfig
        from rollouts.serve import PolicyService, serve

        pol = load_policy(path or checkpoint)
        pol.sampler = SamplerConfig(name="ddim", steps=5)
        pol.seed(0)
        service = PolicyService(pol)
        loop = asyncio.new_event_loop()
        ready, bound, box = threading.Event(), [], {}

        def run():
            asyncio.set_event_loop(loop)
            box["stop"] = asyncio.Event()
            loop.run_until_complete(serve(service, "127.0.0.1", 0, max_message_mb, ready, box["stop"], bound))

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        assert ready.wait(20), "server did not start"
        stops.append((loop, box, thread))
        return service, bound[0][1]

    yield start
    for loop, box, thread in stops:
        loop.call_soon_threadsafe(box["stop"].set)
        thread.join(10)


@pytest.fixture(scope="module")
def sched():
    """The training schedule the sampler tests run on."""
    from policy.schedule import ScheduleConfig, make_scheduler

    return make_scheduler(ScheduleConfig())


@pytest.fixture(scope="module")
def net(sched):
    """The samplers' stand-in denoiser (`test_samplers.Denoiser`)."""
    from test_samplers import Denoiser

    return Denoiser(sched)

