"""Inpainting a committed prefix (`policy/samplers/inpaint.py`, Real-Time Chunking): by
replacement the chain ends on the frozen actions; by guidance it is bent toward them with one
vector-Jacobian product per step; ParaDiGMS and PIADM solve either constrained chain exactly."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from policy.samplers import get_sampler
from policy.samplers.inpaint import Inpaint, rtc_weights
from test_samplers import inputs


def test_rtc_weights_freeze_decay_and_stop():
    w = rtc_weights(16, frozen=3, overlap=10)
    assert torch.equal(w[:3], torch.ones(3)) and torch.equal(w[10:], torch.zeros(6))
    assert bool((w[3:10] > 0).all()) and bool((w[3:10] < 1).all()) and bool((w[3:10].diff() < 0).all())
    c = (10 - 4) / (10 - 3 + 1)
    assert abs(w[4].item() - c * (torch.e**c - 1) / (torch.e - 1)) < 1e-6  # RTC's exponential decay
    with pytest.raises(ValueError, match="frozen"):
        rtc_weights(16, frozen=5, overlap=3)


@pytest.mark.parametrize("solver", ["ddpm", "ddim", "dpmsolver"])
def test_the_chunk_ends_on_the_frozen_actions_and_is_free_after_the_overlap(net, sched, solver):
    noise, cond = inputs(2, seed=3)
    prefix = 0.5 * torch.tanh(torch.randn(2, 16, 7, generator=torch.Generator().manual_seed(9)))
    w = rtc_weights(16, frozen=4, overlap=10)

    plain = get_sampler(solver)(net, cond, sched, noise, torch.Generator().manual_seed(1), steps=20)
    pulled = get_sampler(solver)(net, cond, sched, noise, torch.Generator().manual_seed(1), steps=20,
                                 inpaint=Inpaint(prefix, w))
    # clean data at the end: exactly the prefix
    assert torch.allclose(pulled.x[:, :4], prefix[:, :4], atol=1e-6)
    moved = (pulled.x - plain.x).abs().amax((0, 2))
    assert bool((moved[:4] > 1e-3).all())
    assert pulled.model_evals == 20


class Differentiable(torch.nn.Module):
    """The stand-in denoiser with its gradient (guidance takes a vector-Jacobian product through it);
    `double=True`: a float64 copy, for exactness checks (the guided step divides by sqrt(abar)
    twice, so float32 rounding of differently batched rows would reach 1e-4 near the noise)."""

    def __init__(self, net, double: bool = False):
        super().__init__()
        self.net = copy.deepcopy(net).double() if double else net

    def forward(self, x, t, cond):
        return type(self.net).forward.__wrapped__(self.net, x, t, cond)


class Counting:
    def __init__(self, net):
        self.net, self.calls, self.rows, self.grad = net, 0, 0, []

    def __call__(self, x, t, cond):
        self.calls, self.rows = self.calls + 1, self.rows + len(x)
        self.grad.append(torch.is_grad_enabled())
        return self.net(x, t, cond)


@pytest.mark.parametrize("solver", ["ddpm", "ddim", "dpmsolver"])
def test_guidance_bends_the_chunk_toward_the_prefix_with_one_vjp_per_step(net, sched, solver):
    noise, cond = inputs(2, seed=5)
    prefix = 0.5 * torch.tanh(torch.randn(2, 16, 7, generator=torch.Generator().manual_seed(2)))
    w = rtc_weights(16, frozen=4, overlap=10)
    den = Counting(Differentiable(net))
    with torch.no_grad():  # as the policy samples
        plain = get_sampler(solver)(den, cond, sched, noise, torch.Generator().manual_seed(1), steps=20)
        assert not any(den.grad)
        den.grad.clear()
        guided = get_sampler(solver)(den, cond, sched, noise, torch.Generator().manual_seed(1), steps=20,
                                     inpaint=Inpaint(prefix, w, mode="guide"))
    assert len(den.grad) == 20 and all(den.grad)  # each step's one call is taken with its gradient
    # The stand-in's data estimate hardly depends on its point, so guidance moves its chunk only a
    # little (the policy test below checks the pull toward the committed actions on a trained network).
    assert (guided.x - plain.x).abs()[:, :4].amax().item() > 1e-7
    assert guided.model_evals == 20


def constrained(net, mode: str, seed: int, prefix_seed: int, frozen: int, overlap: int):
    """The denoiser, noise, condition and inpainting job of an exactness check, with the bound the
    twins must meet, in float64: a step near the noise divides the network's output by sqrt(abar)
    (twice when guided), so float32 rounding of differently batched rows reaches 1.5e-4 there
    (DDPM, 2 steps, one thread) while the twins are the same chain."""
    dtype = torch.float64
    noise, cond = (v.to(dtype) for v in inputs(2, seed=seed))
    prefix = 0.8 * torch.tanh(torch.randn(2, 16, 7, generator=torch.Generator().manual_seed(prefix_seed),
                                          dtype=dtype))
    den = Differentiable(net, double=True)
    job = Inpaint(prefix, rtc_weights(16, frozen=frozen, overlap=overlap), mode=mode)
    return den, noise, cond, job, 1e-9


@settings(max_examples=30, deadline=None, derandomize=True)
@given(mode=st.sampled_from(["replace", "guide"]), solver=st.sampled_from(["ddpm", "ddim", "dpmsolver"]),
       steps=st.integers(2, 30), window=st.integers(1, 30), frozen=st.integers(0, 8),
       anderson=st.sampled_from([0, 4]), pad=st.booleans())
def test_paradigms_at_zero_tolerance_is_the_inpainted_sequential_sampler(net, sched, mode, solver, steps,
                                                                         window, frozen, anderson, pad):
    den, noise, cond, job, bound = constrained(net, mode, steps, steps, frozen, max(frozen, 12))
    seq = get_sampler(solver)(den, cond, sched, noise, torch.Generator().manual_seed(1), steps=steps,
                              inpaint=job)
    par = get_sampler(f"para{solver}")(den, cond, sched, noise, torch.Generator().manual_seed(1), steps=steps,
                                       window=window, tol=0.0, anderson=anderson, pad=pad, inpaint=job)
    assert par.converged and (par.x - seq.x).abs().max().item() <= bound
    # cumulative sums of noise-scale points round
    assert (par.chain - seq.chain).abs().max().item() <= 10 * bound


@pytest.mark.parametrize("mode", ["replace", "guide"])
@pytest.mark.parametrize("solver", ["ddim", "ddpm"])
def test_piadm_with_enough_iterations_is_the_inpainted_sequential_sampler(net, sched, solver, mode):
    den, noise, cond, job, bound = constrained(net, mode, 11, 4, frozen=3, overlap=12)
    prefix = job.prefix
    seq = get_sampler(solver)(den, cond, sched, noise, torch.Generator().manual_seed(1), steps=12,
                              inpaint=job)
    exact = get_sampler("piadm")(den, cond, sched, noise, torch.Generator().manual_seed(1), solver=solver,
                                 steps=12, blocks=3, picard_iters=4, inpaint=job)
    assert (exact.x - seq.x).abs().max().item() <= bound and exact.parallel_iters == 12
    few = get_sampler("piadm")(den, cond, sched, noise, torch.Generator().manual_seed(1), solver=solver,
                               steps=12, blocks=3, picard_iters=2, inpaint=job)
    assert few.parallel_iters == 6
    if mode == "replace":  # whatever the iterations, the rebuilt chain's end is pinned to the frozen actions
        assert torch.allclose(few.x[:, :3], prefix[:, :3], atol=1e-6)


def test_bad_inpaint_inputs_are_named():
    with pytest.raises(ValueError, match="weights of shape"):
        Inpaint(torch.zeros(1, 16, 7), torch.ones(8))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        Inpaint(torch.zeros(1, 16, 7), torch.full((16,), 2.0))
    with pytest.raises(ValueError, match="mode 'pull' is not one of replace, guide"):
        Inpaint(torch.zeros(1, 16, 7), torch.ones(16), mode="pull")


def test_a_plan_with_committed_actions_starts_with_them(checkpoint):
    """`plan(obs, committed=..., frozen=d)`: the first d actions are the committed ones, the
    overlap after them is pulled but not pinned; a bad prefix is named."""
    import numpy as np

    from common.errors import UserError
    from policy import load
    from policy.samplers import SamplerConfig

    pol = load(checkpoint)
    obs = np.random.default_rng(0).normal(size=(2, pol.obs_dim)).astype(np.float32)
    spread = torch.as_tensor(np.random.default_rng(1).uniform(-0.9, 0.9, size=(6, pol.action_dim)))
    committed = pol.normalizer.unnormalize("action", spread.float()).numpy()  # in the trained range
    for cfg in (SamplerConfig(name="ddim", steps=8),
                SamplerConfig(name="paraddim", steps=8, window=8, tol=0.0)):
        pol.sampler = cfg
        pol.seed(0)
        plan = pol.plan(obs, n_actions=10, committed=committed, frozen=3)
        np.testing.assert_allclose(plan.actions[:3], committed[:3], atol=1e-5)
        assert np.abs(plan.actions[3:6] - committed[3:6]).max() > 1e-4  # decaying weights: pulled, not pinned
    with pytest.raises(ValueError, match=r"committed: shape \(6, 3\), expected \[1..15, 7\]"):
        pol.plan(obs, committed=committed[:, :3])
    with pytest.raises(ValueError, match="frozen: 7 is not in 0..6"):
        pol.plan(obs, committed=committed, frozen=7)
    pol.sampler = SamplerConfig(name="piadm", steps=6, blocks=2, picard_iters=3)
    pol.seed(0)
    plan = pol.plan(obs, n_actions=10, committed=committed, frozen=3)
    np.testing.assert_allclose(plan.actions[:3], committed[:3], atol=1e-5)
    pol.sampler = SamplerConfig(name="ddim", steps=8, inpaint="guide")
    pol.seed(0)
    free = pol.plan(obs, n_actions=10).actions
    pol.seed(0)
    guided = pol.plan(obs, n_actions=10, committed=committed, frozen=3).actions
    assert np.abs(guided[:3] - committed[:3]).mean() < np.abs(free[:3] - committed[:3]).mean()
    with pytest.raises(UserError, match="sampler.inpaint: 'pull' is not one of replace, guide"):
        pol.sampler = SamplerConfig(name="ddim", steps=8, inpaint="pull")
