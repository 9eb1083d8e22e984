"""The third round of a hostile user's probes (issue 30), the part about outputs and loaded parts:
one writer per output (2, 3), dp-export's out= (4, 11), the safety rule widened to the trained
range (5), every loaded part checked at load (6), Ctrl-C while a command starts or its workers
run (12), and a shipped policy benchmarked without its store (13). Item numbers are the issue's."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from common.errors import UserError
from common.lock import exclusive
import policy
from policy.safety import ActionsOutOfRange, NonFiniteActions, check_actions, refusal

from commands import dp, one_line_error
from test_probes import TINY, ckpt_copy, lift_store  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def hold_lock(out: Path, command: str) -> subprocess.Popen:
    """Another process holding `out`'s lock as `command` would (until killed)."""
    code = ("import sys, time\nfrom common.lock import exclusive\n"
            f"with exclusive({str(out)!r}, {command!r}):\n"
            "    print('held', flush=True)\n    time.sleep(120)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert p.stdout.readline().strip() == "held"
    return p


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


# --- 2, 3: one output, one writer -----------------------------------------------------------------

def test_a_second_dp_eval_on_a_live_output_is_refused_and_a_dead_holders_lock_is_taken(checkpoint, tmp_path):
    out = tmp_path / "eval"
    args = [f"checkpoint={checkpoint}", "horizon=40", "samplers=[ddim5]", "episodes=1", "workers=1",
            "progress=false", f"out={out}"]
    assert dp("dp-eval", *args).returncode == 0
    before = snapshot(out)
    holder = hold_lock(out, "dp-eval")
    try:
        r = dp("dp-eval", *args[:-3], "episodes=2", *args[-3:])
        one_line_error(r, "dp-eval", str(out), "in use by dp-eval", f"pid {holder.pid}")
        assert snapshot(out) == before  # the live run's log and run.json untouched
    finally:
        holder.kill()
        holder.wait()
    r = dp("dp-eval", *args[:-3], "episodes=2", *args[-3:])  # the killed holder's lock is free
    assert r.returncode == 0, r.stderr
    log = [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()]
    assert sorted(e["seed"] for e in log) == [100000, 100001]  # the first episode kept, the second added


def test_a_second_dp_train_on_a_live_run_is_refused(lift_store, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    args = [f"data={lift_store}", f"out={out}", "checkpoint_every=2", *TINY]
    assert dp("dp-train", *args, "steps=2").returncode == 0
    before = snapshot(out)
    holder = hold_lock(out, "dp-train")
    try:
        r = dp("dp-train", *args, "steps=4", "seed=1")
        one_line_error(r, "dp-train", "in use by dp-train", f"pid {holder.pid}")
        assert snapshot(out) == before
    finally:
        holder.kill()
        holder.wait()
    assert dp("dp-train", *args, "steps=4").returncode == 0
    assert json.loads((out / "checkpoints" / "latest" / "policy.json").read_text())["step"] == 4


def test_a_refused_run_leaves_no_folder_and_the_lock_names_nobody_after(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(RuntimeError):
        with exclusive(out, "dp-train"):
            raise RuntimeError("failed before writing anything")
    assert not out.exists()
    with exclusive(out, "dp-eval"):
        (out / "x").write_text("1")
    with exclusive(out, "dp-eval"):  # released at the end of the block: taken again
        pass


def _victim(tmp_path: Path) -> tuple[Path, bytes]:
    victim = tmp_path / "precious.txt"
    victim.write_bytes(b"the user's own file\n")
    return victim, victim.read_bytes()


def test_a_lock_that_is_a_symlink_is_refused_by_dp_eval_and_dp_train_and_its_target_untouched(
        checkpoint, lift_store, tmp_path):  # noqa: F811
    victim, content = _victim(tmp_path)
    for command, args in [("dp-eval", [f"checkpoint={checkpoint}", "samplers=[ddim5]", "episodes=1",
                                       "workers=1", "progress=false"]),
                          ("dp-train", [f"data={lift_store}", "steps=2", *TINY])]:
        out = tmp_path / command
        out.mkdir()
        (out / ".lock").symlink_to(victim)
        r = dp(command, *args, f"out={out}")
        one_line_error(r, command, str(out / ".lock"), "symbolic link")
        assert victim.read_bytes() == content and os.listdir(out) == [".lock"]
    dangling = tmp_path / "dangling"
    dangling.mkdir()
    (dangling / ".lock").symlink_to(tmp_path / "made-by-the-lock")  # O_CREAT would make the target
    with pytest.raises(UserError, match="symbolic link"):
        with exclusive(dangling, "dp-align"):
            pass
    assert not (tmp_path / "made-by-the-lock").exists()


@pytest.mark.parametrize("kind", ["fifo", "directory", "hard link"])
def test_a_lock_that_is_not_a_regular_file_of_its_own_is_refused_in_one_line(tmp_path, kind):
    out = tmp_path / "out"
    out.mkdir()
    victim, content = _victim(tmp_path)
    {"fifo": lambda p: os.mkfifo(p), "directory": lambda p: p.mkdir(),
     "hard link": lambda p: os.link(victim, p)}[kind](out / ".lock")
    with pytest.raises(UserError, match=kind) as e:
        with exclusive(out, "dp-align"):
            pass
    assert str(out / ".lock") in str(e.value) and "\n" not in str(e.value)
    assert victim.read_bytes() == content


def test_a_lock_held_by_another_names_it_and_a_stale_one_is_taken_over_in_place(tmp_path):
    out = tmp_path / "out"
    holder = hold_lock(out, "dp-eval")
    try:
        with pytest.raises(UserError, match=f"in use by dp-eval \\(pid {holder.pid}"):
            with exclusive(out, "dp-eval"):
                pass
    finally:
        holder.kill()
        holder.wait()
    inode = (out / ".lock").stat().st_ino
    with exclusive(out, "dp-train"):  # the dead holder's file, rewritten through its own descriptor
        assert (out / ".lock").stat().st_ino == inode
        assert json.loads((out / ".lock").read_text())["command"] == "dp-train"


# --- 4, 11: dp-export's out= and measured= ----------------------------------------------------------

def _run_dir(ckpt_copy: Path, tmp_path: Path) -> Path:  # noqa: F811
    """A training run folder holding the tiny checkpoint as checkpoints/step-N with `latest`."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    step = run / "checkpoints" / "step-0000020"
    shutil.copytree(ckpt_copy, step)
    (run / "checkpoints" / "latest").symlink_to(step.name)
    return run


@pytest.mark.parametrize("where", ["checkpoint", "latest link", "run", "other checkpoint"])
def test_dp_export_never_writes_over_a_training_checkpoint(ckpt_copy, tmp_path, where):  # noqa: F811
    run = _run_dir(ckpt_copy, tmp_path)
    step = run / "checkpoints" / "step-0000020"
    other = run / "checkpoints" / "step-0000010"
    shutil.copytree(step, other)
    out = {"checkpoint": step, "latest link": run / "checkpoints" / "latest", "run": run,
           "other checkpoint": other}[where]
    before = snapshot(run)
    r = dp("dp-export", f"checkpoint={run}", f"out={out}")
    one_line_error(r, "dp-export", str(out))
    assert snapshot(run) == before and (run / "checkpoints" / "latest").is_symlink()


def test_dp_export_refuses_a_bad_evaluation_before_exporting(ckpt_copy, tmp_path):  # noqa: F811
    evaluation = tmp_path / "eval"
    evaluation.mkdir()
    (evaluation / "results.json").write_text("[1, 2, 3]")
    out = tmp_path / "zoo" / "lift"
    r = dp("dp-export", f"checkpoint={ckpt_copy}", f"out={out}", f"measured={evaluation}")
    one_line_error(r, "dp-export", "results.json: not dp-eval results")
    assert not out.exists()


# --- 5: no action outside the trained range leaves the policy ---------------------------------------

def _save_normalizer(ckpt: Path, field: str, value: float) -> None:
    stats = load_file(ckpt / "normalizer.safetensors")
    stats[field] = torch.full_like(stats[field], value)
    save_file(stats, ckpt / "normalizer.safetensors")


@pytest.mark.parametrize("field, value, message", [
    ("action.scale", 1e-30, "action.scale: does not follow from action.min and action.max"),
    ("action.scale", 0.0, "action.scale: does not follow"),
    ("action.scale", math.nan, "action.scale: holds NaN or inf"),
    ("obs.offset", math.inf, "obs.offset: holds NaN or inf"),
    ("action.min", 1e9, "action.min: above action.max"),
])
def test_a_damaged_normalizer_does_not_load(ckpt_copy, field, value, message):  # noqa: F811
    _save_normalizer(ckpt_copy, field, value)
    with pytest.raises(UserError, match=f"normalizer.safetensors: .*{message}"):
        policy.load(ckpt_copy)
    r = dp("dp-rollout", f"checkpoint={ckpt_copy}", "episodes=1", "seed=1")
    one_line_error(r, "dp-rollout", "normalizer.safetensors", field)


def test_a_normalizer_of_other_dimensions_does_not_load(ckpt_copy):  # noqa: F811
    stats = load_file(ckpt_copy / "normalizer.safetensors")
    save_file({k: (v[:-1] if k.startswith("action.") else v).contiguous() for k, v in stats.items()},
              ckpt_copy / "normalizer.safetensors")
    with pytest.raises(UserError, match="normalizer.safetensors: action has 6 dimensions, "
                                        "policy.json's network 7"):
        policy.load(ckpt_copy)


def test_the_range_rule_refuses_past_the_margin_and_names_the_step():
    low, high = np.array([-1.5, 0.0]), np.array([1.5, 2.0])
    ok = np.array([[1.4, 0.0], [-1.5, 2.0]])
    assert check_actions(ok, low, high) is ok
    with pytest.raises(ActionsOutOfRange, match=r"in 1 of the plan's 2 actions \(first at chunk step 1: "
                                                r"dimension 0 is 7.1e\+05, allowed -1.5..1.5\)") as err:
        check_actions(np.array([[0.0, 1.0], [7.1e5, 1.0]]), low, high)
    assert isinstance(refusal(str(err.value)), ActionsOutOfRange)
    with pytest.raises(NonFiniteActions):
        check_actions(np.array([[np.nan, 1.0]]), low, high)
    assert refusal("obs: shape (1,)") is None


def test_a_plan_that_leaves_the_trained_range_is_refused_and_resets_the_warm_start(checkpoint):
    from policy.samplers import SamplerConfig
    from policy.schedule import ScheduleConfig, make_scheduler

    pol = policy.load(checkpoint)
    pol.sampler = SamplerConfig(name="ddim", steps=5)
    obs = pol.neutral_obs()[0].numpy()
    assert np.all(np.abs(pol.plan(obs).actions) < 1e3)
    # an unclipped schedule and a network gone wild: the chain ends far outside [-1, 1]
    pol.scheduler = make_scheduler(ScheduleConfig(num_train_timesteps=pol.cfg.schedule.num_train_timesteps,
                                                  clip_sample=False))
    pol.net.register_forward_hook(lambda module, args, out: out * 1e4)
    pol.warm.chain = "stale"
    with pytest.raises(ActionsOutOfRange, match="^actions: outside the trained range"):
        pol.plan(obs)
    assert pol.warm.chain is None


def test_a_dimension_trained_on_one_value_gets_that_value_not_two_units_of_room(ckpt_copy):  # noqa: F811
    """A gripper that never moved (0.0) and a joint that barely did (0.30000-0.30005): their
    normalized units are only centred, so +-2 of them were +-2 absolute and the network's output
    there (noise around 0) was served as is, 1.0 away. The room now follows the dimension's scale."""
    from policy.normalizer import Normalizer
    from policy.samplers import SamplerConfig

    stats = load_file(ckpt_copy / "normalizer.safetensors")
    lo, hi = stats["action.min"].clone(), stats["action.max"].clone()
    lo[0] = hi[0] = 0.0
    lo[1], hi[1] = 0.3, 0.30005
    for stat, v in Normalizer.fit({"action": torch.stack([lo, hi]).numpy()}).stats["action"].items():
        stats[f"action.{stat}"] = v.float().contiguous()
    save_file(stats, ckpt_copy / "normalizer.safetensors")
    pol = policy.load(ckpt_copy)
    pol.sampler = SamplerConfig(name="ddim", steps=5)
    low, high = pol.action_bounds
    assert -1e-6 <= low[0] <= high[0] <= 1e-6 and 0.29997 < low[1] < 0.3 < 0.30005 < high[1] < 0.30008
    width = (hi - lo)[2:].numpy()  # the other dimensions keep half their width of room
    np.testing.assert_allclose(low[2:], lo[2:].numpy() - 0.5 * width, rtol=1e-6)
    np.testing.assert_allclose(high[2:], hi[2:].numpy() + 0.5 * width, rtol=1e-6)
    obs = pol.neutral_obs()[0].numpy()
    pol.seed(0)
    raw, _ = pol.sample(torch.as_tensor(obs)[None])
    assert np.abs(raw[0, :, 0].numpy()).max() > 1e-3  # what the network says there: noise around 0
    for seed in range(3):
        pol.seed(seed)
        a = pol.plan(obs).actions
        assert np.all(a[:, 0] == 0.0) and np.all((a[:, 1] >= 0.3 - 1e-7) & (a[:, 1] <= 0.30005 + 1e-7))
    for dim, value in [(0, 1.0), (1, 1.3), (1, 0.3001)]:
        served = np.array(a)
        served[2, dim] = value
        with pytest.raises(ActionsOutOfRange, match=f"chunk step 2: dimension {dim} is {value:.4g}, allowed"):
            check_actions(served, low, high)
        committed = np.array(a[:3])
        committed[1, dim] = value
        with pytest.raises(ValueError, match=f"^committed: outside the trained range .*dimension {dim} is"):
            pol.plan(obs, committed=committed, frozen=1)
    assert pol.plan(obs, committed=a[:3], frozen=1).actions[:, 0].tolist() == [0.0] * 8


def test_committed_actions_outside_the_trained_range_are_refused(checkpoint):
    pol = policy.load(checkpoint)
    obs = pol.neutral_obs()[0].numpy()
    committed = np.zeros((3, pol.action_dim), np.float32)
    pol.plan(obs, committed=committed, frozen=1)
    committed[1, 0] = 1e6
    with pytest.raises(ValueError, match=r"^committed: outside the trained range "
                                         r".*chunk step 1: dimension 0 is 1e\+06"):
        pol.plan(obs, committed=committed, frozen=1)


# --- 6: every loaded part checked at load ---------------------------------------------------------

def _aligner(ckpt: Path, taus) -> None:
    (ckpt / "aligner").mkdir(exist_ok=True)
    doc = {"strategy": "sequential", "strategies": {"sequential": {"taus": taus}}}
    (ckpt / "aligner" / "ddim-5-trailing.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("taus, message", [
    ([99.0, 79.0, math.nan, 39.0, 19.0], r"taus\[2\] is nan, not a finite number"),
    ([99.0, 79.0, 59.0, 39.0, -3.0], r"taus\[4\] = -3 is outside the schedule's timesteps 0..99"),
    ([1e6, 79.0, 59.0, 39.0, 19.0], r"taus\[0\] = 1e\+06 is outside"),
    ([19.0, 39.0, 59.0, 79.0, 99.0], r"taus\[1\] = 39 does not decrease from taus\[0\] = 19"),
    ([99.0, "79", 59.0, 39.0, 19.0], r"taus\[1\] is '79', not a finite number"),
    ([99.0, None, 59.0, 39.0, 19.0], r"taus\[1\] is None"),
    ([99.0, 79.0], r"taus must be a list of 5 numbers"),
    (None, r"taus must be a list of 5 numbers"),
])
def test_damaged_aligner_timesteps_are_refused_at_load(ckpt_copy, taus, message):  # noqa: F811
    _aligner(ckpt_copy, taus)
    r = dp("dp-bench", f"checkpoint={ckpt_copy}", "samplers=[ddim5+aligner]", "plans=1", "warmup=0",
           "batch_sizes=[1]", "overhead_plans=1", "threads=1", f"out={ckpt_copy.parent / 'bench'}")
    one_line_error(r, "dp-bench", "ddim-5-trailing.json (sequential)", *message.replace("\\", "").split(".*"))


def test_good_aligner_timesteps_load(ckpt_copy):  # noqa: F811
    _aligner(ckpt_copy, [99, 80.5, 59.0, 41.0, 19.0])
    from rollouts.presets import sampler_preset

    pol = policy.load(ckpt_copy)
    pol.sampler = sampler_preset("ddim5+aligner")
    assert pol.sample_options()["taus"] == (99.0, 80.5, 59.0, 41.0, 19.0)


@pytest.mark.parametrize("horizon, message", [
    (32, "config.horizon is 32, but the weights were saved with 16"),
    (17, "policy.horizon: 17 is not a positive multiple of 2"),
    (3, "policy.horizon: 3 is not a positive multiple of 2"),
])
def test_a_policy_json_that_does_not_describe_the_weights_is_refused(ckpt_copy,  # noqa: F811
                                                                     horizon, message):
    meta = json.loads((ckpt_copy / "policy.json").read_text())
    meta["config"]["horizon"] = horizon
    (ckpt_copy / "policy.json").write_text(json.dumps(meta))
    r = dp("dp-bench", f"checkpoint={ckpt_copy}", "samplers=[ddim5]", "plans=1",
           f"out={ckpt_copy.parent / 'b'}")
    one_line_error(r, "dp-bench", "policy.json", message)


def test_the_shipped_policies_record_the_network_their_weights_fit():
    for task in ("lift", "can", "square", "lift_image"):
        policy.load(ROOT / "zoo" / task)  # every check passes on what is shipped
        meta = json.loads((ROOT / "zoo" / task / "policy.json").read_text())
        from safetensors import safe_open

        with safe_open(str(ROOT / "zoo" / task / "weights_ema.safetensors"), "pt") as f:
            recorded = json.loads(f.metadata()["parapolicy.policy"])
        assert recorded["config"]["horizon"] == meta["config"]["horizon"] and recorded["action_dim"] == 7


def test_nan_weights_do_not_load(ckpt_copy):  # noqa: F811
    weights = load_file(ckpt_copy / "weights_ema.safetensors")
    name = sorted(weights)[3]
    weights[name][0] = math.nan
    save_file(weights, ckpt_copy / "weights_ema.safetensors")
    r = dp("dp-bench", f"checkpoint={ckpt_copy}", "samplers=[ddim5]", "plans=1",
           f"out={ckpt_copy.parent / 'b'}")
    one_line_error(r, "dp-bench", "weights_ema.safetensors", f"tensor {name} holds NaN or inf")


# --- 12: Ctrl-C while a command starts, and in dp-eval's worker pool --------------------------------

def _interrupt(args: list[str], after: float, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "MUJOCO_GL": "egl"}
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
                         start_new_session=True,  # a process group of its own, as a terminal's job is
                         # a shell's background job inherits SIGINT ignored; Ctrl-C is what is tested
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(after)
    os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C does: the whole group
    out, err = p.communicate(timeout=120)
    return subprocess.CompletedProcess(args, p.returncode, out, err)


def test_an_error_a_ctrl_c_caused_counts_as_the_ctrl_c():
    """A Ctrl-C inside numpy's own import set-up surfaces as its RuntimeError ("Unable to
    configure default ndarray.__str__") caused by the KeyboardInterrupt: still exit 130."""
    from envs.launch import _interrupted

    def raised(cause):
        try:
            try:
                raise cause
            except BaseException as inner:
                raise RuntimeError("Unable to configure default ndarray.__str__") from inner
        except RuntimeError as err:
            return err

    assert _interrupted(raised(KeyboardInterrupt())) and _interrupted(KeyboardInterrupt())
    assert not _interrupted(raised(ValueError("x"))) and not _interrupted(RuntimeError("y"))


@pytest.mark.parametrize("command", ["dp-export", "dp-serve", "dp-train"])
def test_ctrl_c_during_imports_is_one_line(command, tmp_path):
    r = _interrupt([str(BIN / command), "checkpoint=zoo/lift", f"out={tmp_path / 'x'}"], after=0.4, cwd=ROOT)
    assert r.returncode == 130, r.stderr[-2000:]
    assert ("Traceback" not in r.stderr
            and r.stderr.strip().startswith(f"{command}: interrupted")), r.stderr[-2000:]


def test_ctrl_c_in_dp_eval_pool_is_one_line_and_the_log_continues(checkpoint, tmp_path):
    out = tmp_path / "eval"
    args = [str(BIN / "dp-eval"), f"checkpoint={checkpoint}", "samplers=[ddim5]", "episodes=20", "workers=2",
            "progress=false", f"out={out}"]
    r = _interrupt(args, after=12)
    assert r.returncode == 130, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "SpawnPoolWorker" not in r.stderr, r.stderr[-2000:]
    assert [x for x in r.stderr.splitlines() if x.startswith("dp-eval: interrupted")], r.stderr[-2000:]


# --- 13: a shipped policy is benchmarked without its training store ---------------------------------

def test_dp_bench_plans_on_a_shipped_policy_without_its_store(tmp_path):
    zoo = tmp_path / "zoo" / "lift"
    shutil.copytree(ROOT / "zoo" / "lift", zoo)  # elsewhere than a checkout: no data/lift.zarr beside it
    r = dp("dp-bench", f"checkpoint={zoo}", "plans=3", "closed_loop=true", "samplers=[ddim5]", "warmup=0",
           "batch_sizes=[1]", "overhead_plans=1", "threads=1", f"out={tmp_path / 'bench'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    context = json.loads((tmp_path / "bench" / "context.json").read_text())
    assert context["data"].endswith("histories.npz") and context["plans"] == 3


# --- 11: data-parallel training's failures are one line, not torchrun's report ------------------------

def test_dp_train_nproc_failures_are_one_line(lift_store, tmp_path):  # noqa: F811
    r = dp("dp-train", f"data={lift_store}", f"out={tmp_path / 'a'}", *TINY, "nproc=2", "batch_size=7")
    one_line_error(r, "dp-train", "batch_size: 7 does not split over 2 processes")
    # a failure inside every process (which write to the terminal, so a real process here): process 0
    # says it once; torchrun's traceback and failure table are left out
    r = subprocess.run([str(BIN / "dp-train"), f"data={tmp_path / 'none.zarr'}", f"out={tmp_path / 'b'}",
                        *TINY, "nproc=2"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    one_line_error(r, "dp-train", "none.zarr: no such demonstration store")
    assert "ChildFailedError" not in r.stderr and "Root Cause" not in r.stderr
    assert not (tmp_path / "b").exists()
