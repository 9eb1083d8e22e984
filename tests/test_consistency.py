"""Consistency distillation (`dp-distill`, `policy.consistency`) and its sampler (`consistency1`..3):
the sampler walks diffusers' LCMScheduler's chain, dp-distill trains a student from a real tiny
teacher (frozen, resumable to the same weights), and students and teachers refuse each other's
samplers in one line."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import policy
from commands import dp, one_line_error
from policy.samplers import get_sampler
from policy.samplers.solvers import consistency_scalings
from policy.schedule import ScheduleConfig, make_scheduler
from rollouts.presets import sampler_preset


def test_the_boundary_keeps_a_clean_point_and_a_noisy_step_is_the_data_estimate():
    c_skip, c_out = consistency_scalings(torch.tensor([0.0, 1.0, 99.0]))
    assert c_skip[0] == 1.0 and c_out[0] == 0.0  # f(x, 0) = x
    assert c_skip[2] < 1e-4 and c_out[2] > 0.9999


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_the_consistency_sampler_walks_lcm_schedulers_chain(steps):
    from diffusers import LCMScheduler

    scheduler = make_scheduler(ScheduleConfig())
    lcm = LCMScheduler.from_config(scheduler.config)
    ts = get_sampler("consistency")  # a sequential chain over the "consistency" solver
    g = torch.Generator().manual_seed(0)
    cond = torch.randn((2, 6), generator=g)
    weights = torch.randn((6, 4 * 3), generator=g)

    def denoiser(x, t, c):  # any smooth function of (x, t, cond) will do: the chains must agree
        return torch.tanh(x + (c @ weights).reshape(x.shape) * (1 + t.reshape(-1, 1, 1) / 100))

    noise = torch.randn((2, 4, 3), generator=torch.Generator().manual_seed(1))
    ours = ts(denoiser, cond, scheduler, noise, torch.Generator().manual_seed(2), steps=steps).x
    from policy.samplers.solvers import timesteps as chain_timesteps

    lcm.set_timesteps(timesteps=[int(t) for t in chain_timesteps(scheduler, steps, "trailing")])
    x, gen = noise.clone(), torch.Generator().manual_seed(2)
    for t in lcm.timesteps:
        eps = denoiser(x, t.float().expand(2), cond)
        out = lcm.step(eps, t, x, generator=gen)
        x = out.prev_sample if t != lcm.timesteps[-1] else out.denoised
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def student(checkpoint, lift_demos, tmp_path_factory):
    out = tmp_path_factory.mktemp("distill") / "student"
    r = dp("dp-distill", f"checkpoint={checkpoint}", f"out={out}", f"data={lift_demos}", "steps=4",
           "batch_size=8", "val_fraction=0", "threads=1", "progress=false", "checkpoint_every=2",
           "warmup_steps=1")
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_a_student_plans_in_its_steps_and_refuses_a_teachers_sampler(student, checkpoint):
    pol = policy.load(student)
    assert pol.distilled["teacher"] == str(checkpoint) and pol.distilled["skip"] == 5
    obs = pol.neutral_obs()[0].numpy()
    for k in (1, 2, 3):
        pol.sampler = sampler_preset(f"consistency{k}")
        plan = pol.plan(obs)
        assert plan.model_evals == k and np.isfinite(plan.actions).all()
    r = dp("dp-rollout", f"checkpoint={student}", "episodes=1", "sampler=ddim10")
    one_line_error(r, "dp-rollout", "this one is a consistency student")
    r = dp("dp-rollout", f"checkpoint={checkpoint}", "episodes=1", "sampler=consistency1")
    one_line_error(r, "dp-rollout", "this policy is a diffusion policy: distill one with dp-distill")


def test_the_student_starts_from_the_teacher_and_the_teacher_is_left_as_it_was(student, checkpoint):
    teacher = policy.load(checkpoint)
    before = {k: v.clone() for k, v in teacher.net.state_dict().items()}
    pupil = policy.load(student)
    moved = [k for k, v in pupil.net.state_dict().items() if not torch.equal(v, before[k])]
    assert moved, "the student did not train"
    after = load_file(f"{checkpoint}/weights_ema.safetensors")
    assert all(torch.equal(after.get(f"net.{k}", after.get(k)), v) for k, v in before.items())


def test_an_interrupted_distillation_resumes_to_the_weights_of_a_straight_run(checkpoint, lift_demos,
                                                                              tmp_path):
    args = [f"checkpoint={checkpoint}", f"data={lift_demos}", "steps=4", "batch_size=8", "val_fraction=0",
            "threads=1", "progress=false", "checkpoint_every=2", "warmup_steps=1", "target_decay=0.5"]
    straight = dp("dp-distill", *args, f"out={tmp_path / 'a'}")
    assert straight.returncode == 0, straight.stderr[-2000:]
    first = dp("dp-distill", *args, "stop_at=2", f"out={tmp_path / 'b'}")
    again = dp("dp-distill", *args, f"out={tmp_path / 'b'}")
    assert first.returncode == 0 and again.returncode == 0, again.stderr[-2000:]
    assert "resuming" in again.stdout
    for name in ("weights.safetensors", "weights_ema.safetensors"):
        a = load_file(tmp_path / "a" / "checkpoints" / "latest" / name)
        b = load_file(tmp_path / "b" / "checkpoints" / "latest" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_dp_distill_refuses_a_student_a_missing_store_and_a_bad_setting(student, checkpoint, tmp_path):
    r = dp("dp-distill", f"checkpoint={student}", f"out={tmp_path / 'x'}")
    one_line_error(r, "dp-distill", "is a consistency student already")
    r = dp("dp-distill", f"checkpoint={checkpoint}", f"out={tmp_path / 'x'}",
           f"data={tmp_path / 'none.zarr'}")
    one_line_error(r, "dp-distill", "(the teacher's demonstrations) is not here")
    r = dp("dp-distill", f"checkpoint={checkpoint}", f"out={tmp_path / 'x'}", "skip=0")
    one_line_error(r, "dp-distill", "skip: 0 must be at least 1")
    assert not (tmp_path / "x").exists()


def test_a_distillation_resumes_only_as_the_same_distillation(checkpoint, lift_demos, tmp_path):
    args = [f"checkpoint={checkpoint}", f"data={lift_demos}", "steps=4", "stop_at=2", "batch_size=8",
            "val_fraction=0", "threads=1", "progress=false", "checkpoint_every=2", "warmup_steps=1"]
    first = dp("dp-distill", *args, f"out={tmp_path / 'run'}")
    assert first.returncode == 0, first.stderr[-2000:]
    other = dp("dp-distill", *args, "skip=3", f"out={tmp_path / 'run'}")
    one_line_error(other, "dp-distill", "holds a run with skip=5, not 3")


def test_dp_bench_times_the_teachers_samplers_beside_the_student_in_one_run(student, checkpoint, lift_demos,
                                                                             tmp_path):
    out = tmp_path / "bench"
    r = dp("dp-bench", f"checkpoint={student}", f"data={lift_demos}",
           "samplers=[consistency1,teacher:ddim1,'teacher:paraddim15:tol=0']", "plans=2", "warmup=0",
           "batch_sizes=[1]", "overhead_plans=1", "threads=1", f"out={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {row["name"]: row for row in json.loads((out / "results.json").read_text())}
    # the parallel teacher row's twin is the teacher's own DDIM-15, added and timed beside it
    assert list(rows) == ["consistency1", "teacher:ddim1", "teacher:paraddim15:tol=0", "teacher:ddim15"]
    assert rows["teacher:paraddim15:tol=0"]["baseline"] == "teacher:ddim15"
    # exact at tol 0, to the float sums of batched rows
    assert rows["teacher:paraddim15:tol=0"]["action_max_abs_diff"] < 1e-4
    assert rows["consistency1"]["model_evals_mean"] == rows["teacher:ddim1"]["model_evals_mean"] == 1
    assert json.loads((out / "context.json").read_text())["teacher"] == str(checkpoint)
    r = dp("dp-bench", f"checkpoint={checkpoint}", f"data={lift_demos}", "samplers=[teacher:ddim1]",
           "plans=2", f"out={tmp_path / 'x'}")
    one_line_error(r, "dp-bench", "is a diffusion policy: name its samplers without teacher:")
    r = dp("dp-eval", f"checkpoint={student}", "samplers=[consistency1,teacher:ddpm100]", "episodes=1",
           f"out={tmp_path / 'eval'}")
    one_line_error(r, "dp-eval", "merge both runs with dp-report")
    assert not (tmp_path / "eval").exists()


def test_the_fidelity_of_a_student_is_measured_against_its_teachers_ddpm100(student, lift_demos, tmp_path):
    out = tmp_path / "fid"
    r = dp("dp-bench", f"checkpoint={student}", "fidelity=true", f"data={lift_demos}",
           "samplers=[consistency1,teacher:ddim1]", "states=2", "draws=4", "threads=1", f"out={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {row["name"]: row for row in json.loads((out / "results.json").read_text())}
    assert list(rows) == ["teacher:ddpm100", "consistency1", "teacher:ddim1"]
    assert rows["consistency1"]["model_evals_per_plan"] == 1
    assert json.loads((out / "context.json").read_text())["reference"] == "teacher:ddpm100"
    assert "teacher:ddpm100's plans" in r.stdout


def test_an_exported_student_names_a_teacher_in_its_tree_from_the_trees_root(student, checkpoint, tmp_path,
                                                                            monkeypatch):
    from policy.checkpoint import resolve
    from policy.zoo import export
    from rollouts.teacher import teacher_of

    tree = Path(checkpoint).resolve().parents[1]  # where the teacher lives, as zoo/square in a clone
    monkeypatch.chdir(tree)
    out = export(student, tree / "zoo" / tmp_path.name)
    teacher = json.loads((out / "policy.json").read_text())["meta"]["distilled"]["teacher"]
    assert not Path(teacher).is_absolute() and (tree / teacher).resolve() == resolve(checkpoint)
    assert teacher_of(policy.load(out)).meta["step"] == policy.load(checkpoint).meta["step"]
