"""Image observations end to end: real frames from the simulator's cameras, image stores (live,
imported from robomimic HDF5, re-rendered from saved states), a tiny image policy trained and
planning with its encoder run once per plan, and dp-serve answering openpi-style image requests
through the real openpi-client."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from openpi_client.websocket_client_policy import WebsocketClientPolicy

from conftest import SMALL_IMAGES
from envs.store import open_store, write_store
from envs.tasks import PROPRIO_KEYS, ObsConfig, get_task

from commands import dp

pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context "
                                        "manager:DeprecationWarning")


def test_cameras_render_real_frames_top_row_first():
    from envs.robosuite_env import make_env

    env = make_env("lift", obs=ObsConfig(**SMALL_IMAGES))
    try:
        obs, _ = env.reset(seed=0)
        frames = env.images()
        assert set(frames) == {"agentview_image", "robot0_eye_in_hand_image"}
        layout = env.observation_layout
        assert list(layout)[: len(PROPRIO_KEYS)] == list(PROPRIO_KEYS) and "object" not in layout
        assert obs.shape == env.observation_space.shape == (9 + 2 * 32 * 32 * 3,)
        low = env.low_dim_obs()
        state_layout = get_task("lift").obs_layout
        for key in PROPRIO_KEYS:  # proprioception as the state vector has it
            np.testing.assert_array_equal(obs[slice(*layout[key])], low[slice(*state_layout[key])])
        for key, frame in frames.items():
            # a real picture
            assert frame.dtype == np.uint8 and frame.shape == (32, 32, 3) and frame.std() > 10
            np.testing.assert_array_equal(obs[slice(*layout[key])].reshape(32, 32, 3), frame)
        fifth = 32 // 5
        # top row first: the scene camera has the far wall above the table, the wrist camera its
        # gripper's fingers at the bottom of the frame
        assert frames["agentview_image"][:fifth].mean() < frames["agentview_image"][-fifth:].mean()
        assert (frames["robot0_eye_in_hand_image"][-fifth:].mean()
                < frames["robot0_eye_in_hand_image"][:fifth].mean())
        before = frames["robot0_eye_in_hand_image"]
        for _ in range(5):
            # up: the wrist camera sees the table shrink
            obs, *_ = env.step(np.array([0, 0, 0.8, 0, 0, 0, -1.0]))
        assert not np.array_equal(env.images()["robot0_eye_in_hand_image"], before)
    finally:
        env.close()


def test_image_store_round_trips_one_frame_per_chunk(image_store):
    from envs.robosuite_env import make_env

    with open_store(image_store) as store:
        assert store.attrs["cameras"] == SMALL_IMAGES
        for key in ("agentview_image", "robot0_eye_in_hand_image"):
            frames = store[key]
            assert frames.dtype == np.uint8 and frames.shape == (store.n_steps, 32, 32, 3)
            assert store._arrays[key].chunks == (1, 32, 32, 3)  # one frame per chunk
        first = store.episode(0)
    env = make_env("lift", obs=ObsConfig(**SMALL_IMAGES))
    try:
        env.reset(seed=0)  # the first demonstration's seed: its first frames again
        for key, frame in env.images().items():
            np.testing.assert_array_equal(first[key][0], frame)
    finally:
        env.close()


def test_a_low_dim_store_renders_into_an_image_store(image_store, tmp_path):
    from envs.importers import render_store

    with open_store(image_store) as store:
        live = [store.episode(i) for i in range(store.n_episodes)]
        attrs = {k: v for k, v in store.attrs.items() if k not in ("format", "format_version", "cameras")}
    low = write_store(tmp_path / "low.zarr",
                      [{k: v for k, v in e.items() if not k.endswith("_image")} for e in live], attrs)
    out = render_store(low, tmp_path / "rendered.zarr", ObsConfig(**SMALL_IMAGES), progress=False)
    with open_store(out) as rendered:
        assert rendered.attrs["cameras"] == SMALL_IMAGES and set(rendered.keys) == set(live[0])
        for i, ep in enumerate(live):
            again = rendered.episode(i)
            for key in ("obs", "action", "state"):
                np.testing.assert_array_equal(again[key], ep[key])
            for key in ("agentview_image", "robot0_eye_in_hand_image"):
                # at a reset both render the same state
                np.testing.assert_array_equal(again[key][0], ep[key][0])
                # later frames: robosuite observes after mj_step, whose body poses are one physics
                # substep old; set_state recomputes them, so edges move by a pixel here and there
                assert (again[key] == ep[key]).all(-1).mean() > 0.9


def test_robomimic_image_hdf5_imports_its_frames(tmp_path):
    from test_importers import write_robomimic

    src = tmp_path / "image.hdf5"
    demos = write_robomimic(src, demos=(0, 1))
    rng = np.random.default_rng(0)
    frames = {}
    with h5py.File(src, "a") as f:
        for name, demo in demos.items():
            n = len(demo["actions"])
            frames[name] = {k: rng.integers(0, 256, (n, 24, 24, 3), dtype=np.uint8)
                            for k in ("agentview_image", "robot0_eye_in_hand_image")}
            for key, value in frames[name].items():
                f[f"data/{name}"].create_dataset(f"obs/{key}", data=value)
    result = dp("dp-import", f"in={src}", f"out={tmp_path / 'out.zarr'}")
    assert result.returncode == 0, result.stderr
    assert "MB per demo" in result.stdout
    with open_store(tmp_path / "out.zarr") as store:
        assert store.attrs["cameras"] == {"mode": "image", "cameras": ["agentview", "robot0_eye_in_hand"],
                                          "size": 24, "render": "full"}
        for i, name in enumerate(("demo_0", "demo_1")):
            ep = store.episode(i)
            for key, value in frames[name].items():
                np.testing.assert_array_equal(ep[key], value)
    # a robomimic frame that is not uint8 HWC is named
    with h5py.File(src, "a") as f:
        del f["data/demo_1/obs/agentview_image"]
        f["data/demo_1"].create_dataset("obs/agentview_image", data=np.zeros((5, 24, 24), np.float32))
    result = dp("dp-import", f"in={src}", f"out={tmp_path / 'bad.zarr'}")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "demo_1/obs/agentview_image: float32 (5, 24, 24), expected uint8 [T, H, W, 3]" in result.stderr


def test_training_an_image_policy_needs_an_image_store(tmp_path, image_store):
    with open_store(image_store) as store:
        eps = [{k: v for k, v in store.episode(i).items() if not k.endswith("_image")}
               for i in range(store.n_episodes)]
        attrs = {k: v for k, v in store.attrs.items() if k not in ("format", "format_version", "cameras")}
    low = write_store(tmp_path / "low.zarr", eps, attrs)
    result = dp("dp-train", f"data={low}", f"out={tmp_path / 'run'}", "obs=image",
                "steps=1", "progress=false")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "data/agentview_image: missing" in result.stderr and "obs=image" in result.stderr


@pytest.mark.parametrize("sampler",
                         [dict(name="ddpm", steps=10), dict(name="paraddim", steps=10, window=4, tol=0.0)])
def test_image_policy_plans_with_its_encoder_once_per_plan(image_checkpoint, sampler):
    """Every denoiser call of a plan, ParaDiGMS's window rows included, reuses one encoding."""
    from policy.checkpoint import load_policy
    from policy.samplers import SamplerConfig
    from rollouts.runner import make_policy_env

    pol = load_policy(image_checkpoint)
    assert pol.encoder is not None and pol.obs_config.to_dict() == SMALL_IMAGES
    assert sum(p.numel() for p in pol.encoder.parameters()) > 0
    pol.sampler = SamplerConfig(**sampler)
    calls = []
    pol.encoder.register_forward_hook(lambda *a: calls.append(1))
    env = make_policy_env(pol)  # the env observes what the policy was trained on (layouts checked)
    try:
        obs, _ = env.reset(seed=5)
        pol.seed(5)
        plans = [pol.plan(np.stack([obs, obs])) for _ in range(2)]
    finally:
        env.close()
    assert len(calls) == 2
    for plan in plans:
        assert plan.actions.shape == (pol.cfg.n_action_steps, 7) and np.isfinite(plan.actions).all()
        assert plan.model_evals >= 10 and 0 < plan.encode_ms < plan.latency_ms
    # eval mode uses the centre crop: the same history gives the same condition
    x = torch.as_tensor(np.stack([obs, obs]))[None]
    torch.testing.assert_close(pol.condition(x), pol.condition(x), rtol=0, atol=0)


def test_dp_serve_answers_openpi_image_requests(start_server, image_checkpoint):
    from rollouts.serve import resize

    service, port = start_server(path=image_checkpoint)
    client = WebsocketClientPolicy(host="127.0.0.1", port=port)
    meta = client.get_server_metadata()
    assert meta["image_keys"] == {"observation/image": "agentview_image",
                                  "observation/wrist_image": "robot0_eye_in_hand_image"}
    assert (meta["image_shape"] == [32, 32, 3] and meta["state_dim"] == 9
            and meta["state_key"] == "observation/state")
    rng = np.random.default_rng(0)
    big = {k: rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
           for k in ("observation/image", "observation/wrist_image")}
    state = rng.normal(size=9).astype(np.float32)
    p = service.policy
    p.seed(11)
    out = client.infer({**big, "observation/state": state})
    assert out["actions"].shape == (p.cfg.n_action_steps, 7) and out["policy_timing"]["encode_ms"] > 0
    # the same plan from the flat history built by hand: frames resized to the policy's size, one
    # frame standing for the whole history
    flat = np.concatenate([state, *(resize(big[k][None], 32)[0].reshape(-1).astype(np.float32) for k in big)])
    p.seed(11)
    again = p.plan(np.stack([flat] * p.cfg.n_obs_steps))
    np.testing.assert_allclose(out["actions"], again.actions, rtol=0, atol=1e-6)
    # a history of frames is taken as it is
    hist = {k: np.stack([v, v]) for k, v in big.items()}
    assert (client.infer({**hist, "observation/state": np.stack([state, state])})["actions"].shape[0]
            == p.cfg.n_action_steps)
    with pytest.raises(RuntimeError, match="request: missing key 'observation/state'"):
        client.infer(big)
    with pytest.raises(RuntimeError, match="observation/wrist_image: expected a uint8 array, got float32"):
        client.infer({**big, "observation/wrist_image": np.zeros((32, 32, 3), np.float32),
                      "observation/state": state})
    with pytest.raises(RuntimeError, match=r"observation/state: shape \(7,\), expected \[9\]"):
        client.infer({**big, "observation/state": np.zeros(7, np.float32)})
    # both forms of the observation: neither is dropped unseen
    with pytest.raises(RuntimeError, match="request: sends both 'obs_history' and the features "
                                           "observation/image"):
        client.infer({**big, "observation/state": state, "obs_history": np.stack([flat] * p.cfg.n_obs_steps)})
    # still serving
    assert client.infer({**big, "observation/state": state})["actions"].shape[0] == p.cfg.n_action_steps


def test_random_crops_in_training_centre_crops_in_planning():
    from policy.vision import crop

    frames = torch.arange(2 * 8 * 8 * 3, dtype=torch.float32).reshape(2, 8, 8, 3)
    centre = crop(frames, 6)
    torch.testing.assert_close(centre, frames[:, 1:7, 1:7])
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(20):
        out = crop(frames, 6, g, random=True)
        assert out.shape == (2, 6, 6, 3)
        for i in range(2):  # each crop is a window of its own frame
            top, left = (int(out[i, 0, 0, 0] - frames[i, 0, 0, 0]) // 24,
                         int(out[i, 0, 0, 0] - frames[i, 0, 0, 0]) % 24 // 3)
            torch.testing.assert_close(out[i], frames[i, top:top + 6, left:left + 6])
            seen.add((top, left))
    assert len(seen) > 3


def test_dp_align_and_dp_bench_take_an_image_policy(image_checkpoint, tmp_path):
    """The aligner learns on the store's image windows; the benchmark reports the encoder's share."""
    import json

    r = dp("dp-align", f"checkpoint={image_checkpoint}", "sampler=ddim", "steps=3",
           "spacing=uniform", "chunks=8",
           "batch_size=4", "max_iters=4", "min_iters=2", "eval_samples=4", "threads=1", "progress=false")
    assert r.returncode == 0, r.stderr
    doc = json.loads((image_checkpoint / "aligner" / "ddim-3-trailing.json").read_text())
    assert len(doc["taus"]) == 3 and doc["data"]["chunks"] == 8
    out = tmp_path / "bench"
    r = dp("dp-bench", f"checkpoint={image_checkpoint}", "plans=2", "threads=1", f"out={out}", "warmup=1",
           "overhead_plans=1", "batch_sizes=[1]", "samplers=[ddim3]")
    assert r.returncode == 0, r.stderr
    (row,) = [e for e in json.loads((out / "results.json").read_text()) if e["name"] == "ddim3"]
    assert 0 < row["encode_ms_p50"] < row["latency_ms_p50"] and "encode" in r.stdout


def test_the_real_time_loop_plans_from_the_cameras(image_checkpoint):
    """SimRobot renders at every control step; each plan sees the newest frames in its history."""
    from policy.checkpoint import load_policy
    from policy.samplers import SamplerConfig
    from rollouts.realtime import LocalPlanner, LoopConfig, run_loop
    from rollouts.robot import SimRobot
    from rollouts.runner import make_policy_env

    pol = load_policy(image_checkpoint)
    pol.sampler = SamplerConfig(name="ddim", steps=3)
    pol.seed(3)
    env = make_policy_env(pol)
    try:
        robot = SimRobot(env, period=0.05)
        robot.reset(seed=3)
        seen, frames = [], []
        planner = LocalPlanner(pol)
        plan, read = planner.plan, robot.read

        def reading():
            t, obs = read()
            frames.append(env.images()["robot0_eye_in_hand_image"].copy())
            return t, obs

        robot.read = reading
        planner.plan = lambda obs, n, advance=None, *rest: (seen.append(obs.copy())
                                                            or plan(obs, n, advance, *rest))
        stats = run_loop(robot, planner, LoopConfig(replan_every=4), max_steps=24)
    finally:
        env.close()
    assert stats.steps >= 24 and stats.steps == stats.commanded + stats.no_fresh and len(seen) >= 2
    layout = env.observation_layout
    wrist = slice(*layout["robot0_eye_in_hand_image"])
    newest = [o[-1, wrist].reshape(32, 32, 3) for o in seen]
    assert all(any(np.array_equal(f, frame) for frame in frames) for f in newest)  # frames the robot read
    assert not np.array_equal(newest[0], newest[-1])  # the arm moved: the wrist camera saw it
