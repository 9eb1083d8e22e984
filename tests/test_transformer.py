"""Diffusion Policy's transformer denoiser (`policy.net=transformer`): what its masks let each action
see, that batched rows are single rows, that dp-train takes it and checks its numbers, and that a
trained one plans with every sampler preset, ParaDiGMS at zero tolerance reproducing its
sequential twin on both backends."""

import re

import numpy as np
import pytest
import torch

import policy
from commands import dp, one_line_error
from policy.samplers import SamplerConfig
from policy.transformer import TransformerConfig, TransformerForDiffusion
from rollouts.presets import known_presets, sampler_preset


def tiny(**kw) -> TransformerForDiffusion:
    torch.manual_seed(0)
    cfg = TransformerConfig(n_layer=2, n_head=2, n_emb=16, **kw)
    return TransformerForDiffusion(7, 2 * 10, 16, 2, cfg).eval()


def inputs(rows: int):
    g = torch.Generator().manual_seed(rows)
    x, t = torch.randn((rows, 16, 7), generator=g), torch.rand(rows, generator=g) * 99
    return x, t, torch.randn((rows, 20), generator=g)


def test_an_action_sees_itself_earlier_actions_and_the_observations_up_to_its_own_step():
    net = tiny()
    x, t, cond = inputs(3)
    with torch.no_grad():
        base = net(x, t, cond)
        later = x.clone()
        later[:, 9:] += 1.0
        moved = net(later, t, cond)
        assert torch.equal(moved[:, :9], base[:, :9]) and not torch.allclose(moved[:, 9:], base[:, 9:])
        second_obs = cond.clone()
        second_obs[:, 10:] += 1.0  # the second observation step: not seen by the first action
        seen = net(x, t, second_obs)
        assert torch.equal(seen[:, 0], base[:, 0]) and not torch.allclose(seen[:, 1:], base[:, 1:])
        assert not torch.allclose(net(x, t + 1.0, cond)[:, 0], base[:, 0])  # the step is seen by every action
    free = tiny(causal_attn=False)
    with torch.no_grad():
        assert not torch.allclose(free(later, t, cond)[:, :9], free(x, t, cond)[:, :9])


def test_batched_rows_are_the_rows_one_at_a_time():
    net = tiny()
    x, t, cond = inputs(5)
    with torch.no_grad():
        batched = net(x, t, cond)
        one = torch.cat([net(x[i:i + 1], t[i:i + 1], cond[i:i + 1]) for i in range(5)])
        assert batched.shape == x.shape
        torch.testing.assert_close(batched, one, atol=1e-6, rtol=0)
        torch.testing.assert_close(net(x[:1], t[0], cond[:1]), one[:1], atol=0, rtol=0)  # a scalar step


@pytest.mark.parametrize("settings, says", [
    ({"net": "lstm"}, "policy.net: 'lstm' is not a network here; one of unet, transformer"),
    ({"transformer": {"n_head": 3}}, "policy.transformer.n_emb: 256 is not a multiple of n_head=3"),
    ({"transformer": {"n_layer": 0}}, "policy.transformer.n_layer: 0 must be at least 1"),
    ({"transformer": {"p_drop_attn": 1.5}}, "policy.transformer.p_drop_attn: 1.5 must be a probability"),
])
def test_the_transformers_numbers_are_checked_by_name(settings, says):
    from common.errors import UserError
    from policy.diffusion import PolicyConfig

    kw = {"net": "transformer", **settings}
    if "transformer" in kw:
        kw["transformer"] = TransformerConfig(**kw["transformer"])
    with pytest.raises(UserError, match=re.escape(says)):
        PolicyConfig(**kw)


def test_dp_train_takes_the_transformer_at_any_horizon_and_refuses_a_bad_net(lift_demos, tmp_path):
    base = [f"data={lift_demos}", "steps=2", "batch_size=8", "val_fraction=0", "threads=1", "progress=false",
            "policy.transformer.n_layer=1", "policy.transformer.n_head=2", "policy.transformer.n_emb=16"]
    r = dp("dp-train", *base, f"out={tmp_path / 'run'}", "policy.net=transformer", "policy.horizon=10")
    assert r.returncode == 0, r.stderr[-2000:]
    pol = policy.load(tmp_path / "run")
    assert isinstance(pol.net, TransformerForDiffusion) and pol.cfg.horizon == 10  # no halvings: any horizon
    r = dp("dp-train", *base, f"out={tmp_path / 'bad'}", "policy.net=lstm")
    one_line_error(r, "dp-train", "policy.net: 'lstm' is not a network here")
    assert not (tmp_path / "bad").exists()


def test_a_unet_policy_is_no_start_for_a_transformer_run(checkpoint, lift_demos, tmp_path):
    r = dp("dp-train", f"data={lift_demos}", f"out={tmp_path / 'run'}", f"init={checkpoint}", "steps=1",
           "batch_size=8", "val_fraction=0", "threads=1", "progress=false", "policy.net=transformer")
    one_line_error(r, "dp-train", "has policy.net='unet', this run 'transformer'")


def test_a_trained_transformer_plans_with_every_preset(transformer_checkpoint):
    pol = policy.load(transformer_checkpoint)
    assert isinstance(pol.net, TransformerForDiffusion) and pol.cfg.net == "transformer"
    obs = pol.neutral_obs()[0].numpy()
    for name in known_presets():
        if name.startswith("consistency"):  # a distilled student's (tests/test_consistency.py)
            continue
        pol.sampler = sampler_preset(name)
        plan = pol.plan(obs)
        assert plan.actions.shape == (pol.cfg.n_action_steps, pol.action_dim), name
        assert np.isfinite(plan.actions).all() and plan.model_evals >= 1, name


@pytest.mark.parametrize("backend", ["torch", "openvino"])
@pytest.mark.parametrize("solver", ["ddim", "ddpm"])
def test_paradigms_at_zero_tolerance_reproduces_its_twin_with_the_transformer(transformer_checkpoint, backend,
                                                                              solver):
    pol = policy.load(transformer_checkpoint)
    obs = pol.neutral_obs()
    noise = torch.randn((1, pol.cfg.horizon, pol.action_dim), generator=torch.Generator().manual_seed(0))
    pol.sampler = SamplerConfig(name=solver, steps=12, backend=backend)
    seq, _ = pol.sample(obs, noise=noise, generator=torch.Generator().manual_seed(1))
    pol.sampler = SamplerConfig(name=f"para{solver}", steps=12, window=5, tol=0.0, backend=backend)
    par, res = pol.sample(obs, noise=noise, generator=torch.Generator().manual_seed(1))
    assert res.converged and res.parallel_iters <= 12 and res.model_evals > 12  # rows in parallel
    assert (par - seq).abs().max().item() <= 1e-5


def test_openvino_noise_estimates_agree_with_torch_for_the_transformer(transformer_checkpoint):
    pol = policy.load(transformer_checkpoint)
    for rows in (1, 16):
        g = torch.Generator().manual_seed(rows)
        x = torch.randn((rows, pol.cfg.horizon, pol.action_dim), generator=g)
        cond = torch.randn((rows, pol.cond_dim), generator=g)
        t = torch.linspace(0, pol.cfg.schedule.num_train_timesteps - 1, rows)
        with torch.no_grad():
            ref, ov = pol.denoiser_for("torch")(x, t, cond), pol.denoiser_for("openvino")(x, t, cond)
        assert ((ov - ref).abs().max() / ref.abs().max()).item() <= 1e-5, rows
