"""The closed-loop runner and dp-rollout, with a small trained policy in the real simulator."""


import numpy as np
import pytest

import envs
import policy
from policy.diffusion import SamplerConfig
from rollouts.runner import run_episode

from commands import dp


def test_episode_replans_every_n_action_steps_and_records_each_plan(checkpoint):
    pol = policy.load(checkpoint)
    pol.sampler = SamplerConfig(steps=5)
    env = envs.make_env("lift")
    r = run_episode(env, pol, seed=100000)
    assert r.error is None and not r.success  # 20 training steps do not lift a cube
    assert r.length == 400  # truncated at the horizon
    n = pol.cfg.n_action_steps
    assert len(r.plans) == -(-r.length // n)
    assert [p.step for p in r.plans] == list(range(0, r.length, n))
    assert all(p.model_evals == 5 and p.parallel_iters == 5 and p.converged for p in r.plans)
    assert all(p.latency_ms > 0 for p in r.plans)


def test_same_seed_same_episode(checkpoint):
    pol = policy.load(checkpoint)
    pol.sampler = SamplerConfig(steps=3)
    env = envs.make_env("lift")
    a, b = run_episode(env, pol, seed=7), run_episode(env, pol, seed=7)
    assert (a.length, a.return_, a.max_reward) == (b.length, b.return_, b.max_reward)


def test_plan_refuses_a_history_of_the_wrong_shape(checkpoint):
    pol = policy.load(checkpoint)
    with pytest.raises(ValueError, match=r"obs_history: shape \(3, 19\), expected \(2, 19\)"):
        pol.plan(np.zeros((3, 19), np.float32))


def test_dp_rollout_prints_episodes_and_success_rate(checkpoint):
    r = dp("dp-rollout", f"checkpoint={checkpoint}", "episodes=1", "sampler.steps=2", "threads=1")
    assert r.returncode == 0, r.stderr
    assert "seed 100000: success=False length=400" in r.stderr + r.stdout
    assert "lift: success 0% (0/1) with ddpm" in r.stdout


def test_dp_rollout_takes_a_sampler_preset_and_its_options(checkpoint):
    r = dp("dp-rollout", f"checkpoint={checkpoint}", "episodes=1", "sampler=paraddim15", "sampler.steps=4",
           "sampler.window=2", "threads=1")
    assert r.returncode == 0, r.stderr
    assert "lift: success 0% (0/1) with paraddim" in r.stdout
    bad = dp("dp-rollout", f"checkpoint={checkpoint}", "sampler=ddim15", "sampler.tol=0.1")
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("dp-rollout: sampler.tol: not an option of ddim")
    unknown = dp("dp-rollout", f"checkpoint={checkpoint}", "sampler=ddim99")
    assert unknown.returncode == 2
    known = "known: consistency1, consistency2, consistency3, ddim1, ddim10"
    assert f"dp-rollout: unknown sampler 'ddim99'; {known}" in unknown.stderr


def test_dp_rollout_refuses_a_policy_of_an_imported_dataset(checkpoint, tmp_path):
    from test_eval import external_policy

    r = dp("dp-rollout", f"checkpoint={external_policy(checkpoint, tmp_path / 'ext')}", "episodes=1")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert "trained on an imported dataset (task=external), which no simulator here runs" in r.stderr
    assert "unknown task" not in r.stderr


def test_dp_rollout_missing_checkpoint_is_one_line(tmp_path):
    r = dp("dp-rollout", f"checkpoint={tmp_path / 'nope'}")
    assert r.returncode == 2 and r.stderr.strip() == f"dp-rollout: {tmp_path / 'nope'}: no such checkpoint"
