"""The probes of a hostile but fair new user (issue 14), kept as tests: each numbered defect the
probe found, driven through the real commands, server and files, and the safety rule that no
non-finite action leaves the policy. Item numbers refer to the issue."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.sync.client import connect

from common.errors import UserError
from common.files import make_partial, remove_stale_partials
import policy
from envs.errors import StoreError
from envs.store import write_store
from policy.safety import NonFiniteActions, ObservationOutOfRange
from rollouts import wire
from rollouts.realtime import LoopConfig, run_loop

from commands import dp, one_line_error
from rollouts.report import read_rows

BIN = Path(sys.executable).parent


def cli(*args, cwd=None):
    """A dp-* command, run in this process (`commands.dp`); the kill tests start real processes."""
    return dp(*args, cwd=cwd)


def dead_pid() -> int:
    """The pid of a process that has exited (for a partial directory whose owner was killed)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture
def ckpt_copy(checkpoint, tmp_path):
    """A copy of the tiny policy's checkpoint directory, to damage."""
    dst = tmp_path / "ckpt"
    shutil.copytree(checkpoint, dst)
    return dst


# --- 1: the Wilson interval at 0 % and 100 % ---------------------------------------------------

def test_wilson_interval_holds_the_rate_at_every_count_from_1_to_100():
    from rollouts.stats import wilson

    for n in range(1, 101):
        for k in range(n + 1):
            lo, hi = wilson(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0, (k, n, lo, hi)
        assert wilson(n, n)[1] == 1.0 and wilson(0, n)[0] == 0.0


@pytest.mark.parametrize("n, wins", [(6, 6), (100, 100), (11, 0), (44, 0)])
def test_report_of_an_all_or_nothing_sampler_is_written(tmp_path, n, wins):
    """The counts the probe saw fail: dp-eval's report (table, results.json, pareto.png)."""
    from rollouts.report import summarize, table, write_report

    plan = {"latency_ms": 20.0, "model_evals": 5, "parallel_iters": 5, "converged": True}
    records = [{"sampler": "ddim5", "seed": s, "success": s < wins, "max_reward": float(s < wins),
                "return_": 1.0, "length": 40, "plans": [plan], "error": None} for s in range(n)]
    summary = summarize(records, ["ddim5"])
    write_report(tmp_path, summary)
    assert summary[0]["success_rate"] == wins / n and "ddim5" in table(summary)
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"


# --- 2: non-finite actions never leave the policy ------------------------------------------------

HUGE = np.full((2, 19), 1e20, np.float32)


def poisoned(pol):
    """`pol` whose chains end in NaN (a diverged network), until `del pol.sample`."""
    real = pol.sample

    def sample(*args, **kwargs):
        chunk, result = real(*args, **kwargs)
        return chunk * np.nan, result

    pol.sample = sample
    return pol


def test_plan_refuses_a_non_finite_chunk_and_a_non_finite_observation(checkpoint):
    pol = poisoned(policy.load(checkpoint))
    pol.seed(0)
    with pytest.raises(NonFiniteActions, match="actions: non-finite"):
        pol.plan(np.zeros((2, 19)))
    del pol.sample
    with pytest.raises(ValueError, match="obs_history: contains NaN or inf"):
        pol.plan(np.full((2, 19), 1e300, np.float64))  # inf once cast to float32
    assert np.isfinite(pol.plan(np.zeros((2, 19))).actions).all()  # the policy still plans


@pytest.mark.parametrize("backend", ["torch", "openvino"])
def test_an_observation_far_outside_the_trained_range_is_refused_alike_on_every_backend(checkpoint, backend):
    """1e20 overflowed torch into a NaN plan and gave OpenVINO a finite one: refused before the
    network runs, on both, with the value and the room named."""
    from policy.samplers import SamplerConfig

    pol = policy.load(checkpoint)
    pol.sampler = SamplerConfig(name="ddim", steps=5, backend=backend)
    ok = pol.neutral_obs()[0].numpy()
    lo, hi = pol.obs_bounds
    calls, real = [], pol.sample
    pol.sample = lambda *a, **k: calls.append(1) or real(*a, **k)
    for value in (1e30, 1e20, 1e10, 1e6, -1e6):
        obs = ok.copy()
        obs[1, 4] = value
        want = re.escape(f"obs_history: far outside the trained range (history step 1: dimension 4 is "
                         f"{value:.4g},")
        with pytest.raises(ObservationOutOfRange, match=f"^{want}"):
            pol.plan(obs)
    assert calls == [] and np.all(hi - lo >= 20)  # nothing sampled; ten times at least 1 on each side
    edge = np.where(np.arange(19) % 2 == 0, hi, lo)  # the last value allowed on every dimension plans
    assert np.isfinite(pol.plan(np.stack([edge, edge])).actions).all() and calls == [1]


def test_server_replies_an_error_not_nan_actions_and_keeps_serving(start_server):
    service, port = start_server()
    with connect(f"ws://127.0.0.1:{port}") as ws:
        ws.recv()
        ws.send(wire.packb({"obs_history": HUGE}))
        assert ws.recv().startswith("obs_history: far outside the trained range (history step 0: dimension 0")
        poisoned(service.policy)
        ws.send(wire.packb({"obs_history": np.zeros((2, 19), np.float32)}))
        reply = ws.recv()
        assert isinstance(reply, str) and reply.startswith("actions: non-finite")
        del service.policy.sample
        ws.send(wire.packb({"obs_history": np.full((2, 19), 1e300)}))
        assert ws.recv().startswith("obs_history: contains NaN or inf")
        ws.send(wire.packb({"obs_history": np.zeros((2, 19), np.float32)}))
        ok = wire.unpackb(ws.recv())
        assert np.isfinite(ok["actions"]).all() and ok["actions"].shape == (8, 7)


def test_the_real_time_loop_holds_on_a_refused_plan():
    """Plan 1 is refused: nothing of it is sent, the loop goes on with the first chunk, then
    holds, and asks again at once."""
    from test_realtime import CountingRobot, SleepyPlanner

    class Refuses(SleepyPlanner):
        def plan(self, obs_history, n_actions, advance=None, committed=None, frozen=0):
            actions, info = super().plan(obs_history, n_actions, advance, committed, frozen)
            if self.count == 2:
                raise NonFiniteActions("actions: non-finite values")
            return actions, info

    robot, planner = CountingRobot(0.02), Refuses(0.0)
    stats = run_loop(robot, planner, LoopConfig(replan_every=4), max_steps=30)
    assert stats.refused == 1 and "non-finite" in stats.refusal
    assert all(np.isfinite(a).all() and a[0] != 1 for a in robot.sent.values())  # chunk 1 never went out
    assert stats.plans[1]["step"] < 8  # the request after the one refused at step 4 went out at once
    assert stats.steps == stats.commanded + stats.no_fresh == 30


def test_remote_refusal_reaches_the_robot_side_as_non_finite_actions(start_server):
    from rollouts.client import PolicyClient
    from rollouts.realtime import RemotePlanner

    service, port = start_server()
    with PolicyClient("127.0.0.1", port) as client:
        with pytest.raises(ObservationOutOfRange):
            RemotePlanner(client).plan(HUGE, 4)
        poisoned(service.policy)
        with pytest.raises(NonFiniteActions):
            RemotePlanner(client).plan(np.zeros((2, 19)), 4)
        del service.policy.sample
        assert client.plan(np.zeros((2, 19))).shape == (8, 7)


# --- 3: no stale reply after a timeout -------------------------------------------------------------

def test_client_never_returns_the_reply_to_an_earlier_request(start_server):
    from rollouts.client import PolicyClient

    service, port = start_server()
    real_plan = service.policy.plan
    calls = []

    def slow_first(*args, **kw):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(1.5)
        return real_plan(*args, **kw)

    service.policy.plan = slow_first
    client = PolicyClient("127.0.0.1", port, timeout=0.5)
    obs = np.zeros((2, 19), np.float32)
    with pytest.raises(TimeoutError, match="connection was closed"):
        client.infer({"obs_history": obs})
    client.timeout = 30.0  # the next request queues behind the slow one on the server
    reply = client.infer({"obs_history": obs, "n_actions": 1})  # reconnects
    assert reply["actions"].shape == (1, 7)
    client.close()


# --- 4: unreadable checkpoints -------------------------------------------------------------------

def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


@pytest.mark.parametrize("command, args", [
    ("dp-rollout", ["episodes=1"]),
    ("dp-eval", ["episodes=1", "workers=1"]),
    ("dp-serve", ["port=0"]),
    ("dp-bench", ["plans=2"]),
])
def test_a_truncated_weights_file_is_one_line(ckpt_copy, tmp_path, command, args):
    _truncate(ckpt_copy / "weights_ema.safetensors")
    r = cli(command, f"checkpoint={ckpt_copy}", *args,
            f"out={tmp_path / 'out'}" if command in ("dp-eval", "dp-bench") else "seed=1")
    one_line_error(r, command, "weights_ema.safetensors", "unreadable")


def test_damaged_checkpoint_files_name_themselves(ckpt_copy):
    (ckpt_copy / "normalizer.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match=r"normalizer.safetensors: unreadable"):
        policy.load(ckpt_copy)
    (ckpt_copy / "policy.json").write_text('{"step": 3')
    with pytest.raises(UserError, match=r"policy.json: unreadable"):
        policy.load(ckpt_copy)


@pytest.fixture(scope="module")
def lift_store(tmp_path_factory):
    from test_training import SPEC, _episodes

    path = tmp_path_factory.mktemp("data") / "lift.zarr"
    return write_store(path, _episodes(6),
                       {"task": "lift", "obs_layout": {k: list(v) for k, v in SPEC.obs_layout.items()}})


TINY = ["policy.unet.down_dims=[16,32]", "policy.unet.step_embed_dim=16", "policy.unet.n_groups=4",
        "batch_size=8", "warmup_steps=1", "val_fraction=0.2", "progress=false", "threads=1"]


def test_resume_from_a_truncated_trainer_state_is_one_line(lift_store, tmp_path):
    out = tmp_path / "run"
    r = cli("dp-train", f"data={lift_store}", f"out={out}", "steps=4", "checkpoint_every=2", *TINY)
    assert r.returncode == 0, r.stderr
    _truncate(out / "checkpoints" / "latest" / "trainer.pt")
    r = cli("dp-train", f"data={lift_store}", f"out={out}", "steps=6", "checkpoint_every=2", *TINY)
    one_line_error(r, "dp-train", "trainer.pt: unreadable")


# --- 5: dp-train checks its numbers --------------------------------------------------------------

@pytest.mark.parametrize("arg, message", [
    ("steps=0", "steps: 0 must be at least 1"),
    ("batch_size=0", "batch_size: 0 must be at least 1"),
    ("batch_size=-4", "batch_size: -4 must be at least 1"),
    ("lr=-1", "lr: -1.0 must be a positive number"),
])
def test_dp_train_refuses_bad_numbers_and_leaves_nothing(lift_store, tmp_path, arg, message):
    out = tmp_path / "run"
    r = cli("dp-train", f"data={lift_store}", f"out={out}", *TINY, arg)
    one_line_error(r, "dp-train", message)
    assert not out.exists()  # not even a tensorboard folder


@pytest.mark.parametrize("field, value", [("val_every", 0), ("val_fraction", 1.0), ("weight_decay", -1e-3),
                                          ("lr", float("nan")), ("ema_max_decay", 1.5), ("stop_at", 0)])
def test_train_config_refuses_numbers_that_cannot_run(field, value):
    from policy.train import TrainConfig

    with pytest.raises(UserError, match=f"^{field}: "):
        TrainConfig(**{field: value})


# --- 6: dp-collect into a folder it cannot write -------------------------------------------------

def _read_only(folder: Path) -> list[str]:
    """Make `folder` unwritable, also for root (who writes through permission bits): the
    immutable attribute; returns the command that undoes it."""
    os.chmod(folder, 0o555)
    if os.geteuid() != 0:
        return []
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode != 0:
        pytest.skip("running as root on a filesystem without the immutable attribute: nothing is read-only")
    return ["chattr", "-i", str(folder)]


def test_dp_collect_into_a_read_only_folder_fails_before_collecting(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    undo = _read_only(folder)
    try:
        r = cli("dp-collect", "task=lift", "n_demos=50", f"out={folder / 'lift.zarr'}")
        one_line_error(r, "dp-collect", str(folder), "cannot write here")
        assert "collect lift" not in r.stderr  # no progress bar: it failed before the first episode
        assert list(folder.iterdir()) == []
    finally:
        if undo:
            subprocess.run(undo, check=True)
        os.chmod(folder, 0o755)


# --- 7: dp-import with NaN or strings in the source -----------------------------------------------

def _damaged_hdf5(path: Path, field: str, value) -> None:
    from test_importers import write_robomimic

    write_robomimic(path)
    with h5py.File(path, "r+") as f:
        del f[f"data/demo_2/{field}"]
        f.create_dataset(f"data/demo_2/{field}", data=value)


@pytest.mark.parametrize("field, make, message", [
    ("obs/object", lambda: np.full((6, 10), np.nan), "data/demo_2/obs/object: 60 values are NaN or inf"),
    ("actions", lambda: np.where(np.eye(6, 7) > 0, np.inf, 0.0),
     "data/demo_2/actions: 6 values are NaN or inf"),
    ("states", lambda: np.full((6, 32), 1e300), "data/demo_2/states"),  # float64 holds it: no error
    ("obs/robot0_eef_pos", lambda: np.array([["a", "b", "c"]] * 6, dtype="S"),
     "data/demo_2/obs/robot0_eef_pos: dtype |S1 is not numeric"),
])
def test_dp_import_names_the_field_with_nan_or_strings(tmp_path, field, make, message):
    src, out = tmp_path / "demo.hdf5", tmp_path / "out.zarr"
    _damaged_hdf5(src, field, make())
    r = cli("dp-import", f"in={src}", f"out={out}")
    if field == "states":
        assert r.returncode == 0, r.stderr
        return
    one_line_error(r, "dp-import", f"{src}: {message}")
    assert not out.exists()


def test_an_observation_too_large_for_float32_is_named(tmp_path):
    from envs.errors import SourceError
    from envs.importers import import_robomimic

    src = tmp_path / "demo.hdf5"
    _damaged_hdf5(src, "obs/object", np.full((6, 10), 1e300))
    with pytest.raises(SourceError, match="obs/object: 60 values are NaN or inf as float32"):
        import_robomimic(src, tmp_path / "out.zarr")


# --- 8: dp-rollout with no episodes --------------------------------------------------------------

def test_dp_rollout_without_episodes_is_refused(checkpoint):
    one_line_error(cli("dp-rollout", f"checkpoint={checkpoint}", "episodes=0"), "dp-rollout",
                   "episodes: 0 must be at least 1")


# --- 9: resume with the same store spelled differently ---------------------------------------------

def test_resume_takes_the_same_store_spelled_differently_and_names_what_differs(lift_store, tmp_path):
    from policy.train import train
    from test_training import _cfg

    cwd = Path.cwd()
    os.chdir(lift_store.parent)
    try:
        train(_cfg(lift_store.name, tmp_path / "run", steps=2))  # relative
    finally:
        os.chdir(cwd)
    resumed = train(_cfg(f"{lift_store}/", tmp_path / "run", steps=4))  # absolute, trailing slash
    assert policy.load(resumed).meta["step"] == 4
    other = _cfg(lift_store, tmp_path / "run", steps=6)
    other.policy.horizon = 12
    with pytest.raises(UserError, match=r"holds a run with policy.horizon=16, not 12"):
        train(other)
    elsewhere = tmp_path / "copy.zarr"
    shutil.copytree(lift_store, elsewhere)
    with pytest.raises(UserError, match=f"holds a run on data={lift_store}, not {elsewhere}"):
        train(_cfg(elsewhere, tmp_path / "run", steps=6))


# --- 10: partial directories of killed runs ---------------------------------------------------------

def test_stale_partials_are_removed_and_live_ones_kept(tmp_path):
    stale = tmp_path / f".lift.zarr.{dead_pid()}-abcd.partial"
    old_form = tmp_path / ".lift.zarr.k2j4h5g6.partial"
    mine = make_partial(tmp_path, "lift.zarr")  # this (live) process's
    other = tmp_path / f".can.zarr.{dead_pid()}-x.partial"
    for d in (stale, old_form, other):
        d.mkdir()
    assert sorted(remove_stale_partials(tmp_path, "lift.zarr")) == sorted([stale, old_form])
    assert mine.exists() and other.exists()


def test_a_kill_between_the_two_renames_of_a_replace_loses_nothing(tmp_path):
    """A writer killed after moving the old destination aside, before the new one took its place:
    the next run puts the old one back; where the new one did land, the old one is dropped."""
    from common.files import building

    final = tmp_path / "ckpt"
    killed = tmp_path / f".ckpt.{dead_pid()}-k.partial"
    (killed / "old").mkdir(parents=True)
    (killed / "old" / "weights").write_text("old")
    (killed / "new").mkdir()
    remove_stale_partials(tmp_path, "ckpt")
    assert (final / "weights").read_text() == "old" and not killed.exists()

    with building(final) as tmp:
        (tmp / "weights").write_text("new")
    assert (final / "weights").read_text() == "new" and not list(tmp_path.glob(".*.partial"))
    landed = tmp_path / f".ckpt.{dead_pid()}-m.partial"
    (landed / "old").mkdir(parents=True)
    remove_stale_partials(tmp_path, "ckpt")
    assert (final / "weights").read_text() == "new" and not landed.exists()


def test_building_keeps_the_old_directory_when_the_build_fails(tmp_path):
    from common.files import building

    final = tmp_path / "ckpt"
    final.mkdir()
    (final / "weights").write_text("old")
    with pytest.raises(RuntimeError):
        with building(final) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("killed")
    assert (final / "weights").read_text() == "old" and not list(tmp_path.glob(".*.partial"))


def _wait_for(predicate, timeout: float, proc) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_dp_train_killed_with_sigkill_resumes_and_cleans_its_partials(lift_store, tmp_path):
    out = tmp_path / "run"
    args = [str(BIN / "dp-train"), f"data={lift_store}", f"out={out}", "steps=3000", "checkpoint_every=5",
            *TINY]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (out / "checkpoints" / "latest").exists(), 120, proc)
    proc.kill()
    proc.wait()
    (out / "checkpoints" / f".step-0000999.{dead_pid()}-zz.partial").mkdir()  # as a kill mid-save leaves
    step = policy.load(out).meta["step"]
    r = cli("dp-train", f"data={lift_store}", f"out={out}", f"steps={step + 5}", "checkpoint_every=5", *TINY)
    assert r.returncode == 0 and f"resuming {out} from step {step}" in r.stdout, r.stderr[-2000:]
    assert policy.load(out).meta["step"] == step + 5
    assert not list((out / "checkpoints").glob(".*.partial"))
    saved = (out / "checkpoints" / "latest" / "config.yaml").read_text()  # item 12: the resolved config
    assert f"steps: {step + 5}" in saved and f"data: {lift_store}" in saved


def test_dp_collect_killed_with_sigkill_then_rerun_writes_a_complete_store(tmp_path):
    out = tmp_path / "lift.zarr"
    proc = subprocess.Popen([str(BIN / "dp-collect"), "task=lift", "n_demos=400", "workers=1", f"out={out}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    time.sleep(6)  # its worker is collecting by now
    assert proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    (tmp_path / f".lift.zarr.{dead_pid()}-k.partial").mkdir()  # as a kill mid-write leaves
    r = cli("dp-collect", "task=lift", "n_demos=2", "workers=1", f"out={out}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lift.zarr"]


def test_dp_eval_killed_with_sigkill_continues_with_nothing_lost_or_doubled(checkpoint, tmp_path):
    out = tmp_path / "eval"
    args = [f"checkpoint={checkpoint}", "samplers=['ddim5:steps=2']", "episodes=3", "workers=1", f"out={out}",
            "horizon=100", "progress=false"]  # episodes of 100 steps, not 400
    proc = subprocess.Popen([str(BIN / "dp-eval"), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    log = out / "episodes.jsonl"
    _wait_for(lambda: log.exists() and log.read_text().count("\n") >= 1, 240, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = log.read_text().count("\n")
    assert 1 <= done < 3
    r = cli("dp-eval", *args)
    assert r.returncode == 0 and "continuing" in r.stderr, r.stderr[-2000:]
    seeds = [json.loads(x)["seed"] for x in log.read_text().splitlines()]
    assert sorted(seeds) == [100000, 100001, 100002]
    assert read_rows(out / "results.json")[0]["episodes"] == 3


# --- 11: overwrite=true replaces only a store -------------------------------------------------------

def test_overwrite_refuses_a_folder_that_is_not_a_store(tmp_path):
    from test_store import make_episodes

    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "thesis.txt").write_text("years of work")
    with pytest.raises(StoreError, match=r"notes: not a demonstration store \(it holds thesis.txt\)"):
        write_store(folder, make_episodes(), {"task": "lift"}, overwrite=True)
    assert (folder / "thesis.txt").read_text() == "years of work"
    paper = tmp_path / "paper.pdf"
    paper.write_bytes(b"%PDF")
    with pytest.raises(StoreError, match="a file that is not a demonstration store"):
        write_store(paper, make_episodes(), {"task": "lift"}, overwrite=True)
    store = write_store(tmp_path / "s.zarr", make_episodes(), {"task": "lift"})
    # a store is replaced
    assert write_store(store, make_episodes(), {"task": "lift"}, overwrite=True) == store


def test_dp_collect_overwrite_refuses_a_users_folder(tmp_path):
    folder = tmp_path / "lift.zarr"
    folder.mkdir()
    (folder / "thesis.txt").write_text("x")
    r = cli("dp-collect", "task=lift", "n_demos=1", f"out={folder}", "overwrite=true", cwd=tmp_path)
    one_line_error(r, "dp-collect", "not a demonstration store")
    assert (folder / "thesis.txt").exists()


# --- 12: smaller ones ------------------------------------------------------------------------------

def test_a_bad_host_is_named_as_the_host(checkpoint):
    r = cli("dp-serve", f"checkpoint={checkpoint}", "host=no-such-host.invalid", "port=0")
    one_line_error(r, "dp-serve", "host: cannot listen on 'no-such-host.invalid'")


def test_an_array_map_with_str_keys_is_an_array(start_server):
    _, port = start_server()
    obs = np.zeros((2, 19), np.float32)
    frame = msgpack.packb({"obs_history": {"__ndarray__": True, "data": obs.tobytes(), "dtype": "<f4",
                                           "shape": [2, 19]}})
    with connect(f"ws://127.0.0.1:{port}") as ws:
        ws.recv()
        ws.send(frame)
        reply = ws.recv()
        assert isinstance(reply, bytes), reply
        assert wire.unpackb(reply)["actions"].shape == (8, 7)
        ws.send(msgpack.packb({"obs_history": {"__ndarray__": True, "data": b"12", "dtype": "<f4",
                                               "shape": [2, 19]}}))
        assert ws.recv().startswith("request: an __ndarray__ map that is not an array")


# --- wire fuzzing ---------------------------------------------------------------------------------

def _cast(values: np.ndarray, dtype: str) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):  # NaN to int and 1e300 to float16 are the point
        return values.astype(dtype)


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(),
                     st.text(max_size=8), st.binary(max_size=16))
_arrays = st.builds(
    lambda dtype, shape, fill: _cast(np.full(shape, fill), dtype),
    st.sampled_from(["<f4", "<f8", "<f2", "<i4", "|u1", "|b1"]),
    st.sampled_from([(2, 19), (19,), (2, 18), (1, 2, 19), (0,), ()]),
    st.sampled_from([0.0, 1.0, -3.5, 1e20, 1e300, float("nan"), float("inf")]))
_values = st.recursive(st.one_of(_scalars, _arrays), lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.sampled_from(["obs_history", "n_actions", "advance", "x"]), inner, max_size=3)),
    max_leaves=6)
_frames = st.one_of(
    st.binary(max_size=64),
    st.builds(wire.packb, st.dictionaries(st.sampled_from(["obs_history", "n_actions", "advance", "x"]),
                                          _values, max_size=3)),
    st.builds(wire.packb, _values))


def test_any_frame_gets_a_finite_chunk_or_one_line_and_the_connection_serves_on(start_server):
    _, port = start_server()

    @settings(max_examples=120, deadline=None)
    @given(frames=st.lists(_frames, min_size=1, max_size=3))
    def check(frames):
        with connect(f"ws://127.0.0.1:{port}", max_size=None) as ws:
            ws.recv()
            for frame in frames:
                ws.send(frame)
                reply = ws.recv(timeout=30)
                if isinstance(reply, str):
                    assert reply and "\n" not in reply and "Traceback" not in reply
                else:
                    out = wire.unpackb(reply)
                    assert out["actions"].dtype == np.float32 and np.isfinite(out["actions"]).all()
                    assert out["actions"].shape[1] == 7 and 1 <= out["actions"].shape[0] <= 15
            ws.send(wire.packb({"obs_history": np.zeros((2, 19), np.float32)}))
            assert np.isfinite(wire.unpackb(ws.recv(timeout=30))["actions"]).all()

    check()
