"""Samplers: sequential ones against diffusers' own step() loops; ParaDiGMS and PIADM against their
sequential twins (exactness) and their evaluation/iteration counts."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import UserError
from policy.network import ConditionalUnet1D, UNetConfig
from policy.samplers import SamplerConfig, get_sampler, resolve
from policy.samplers.solvers import get_plan, new_history, step_rows, timesteps

H, A, C = 16, 7, 10


class Denoiser(torch.nn.Module):
    """A stand-in for a trained policy: the exact noise estimate for data concentrated at a
    condition-dependent chunk inside [-1, 1], plus a small real UNet term so the map is not
    linear. (A random UNet alone predicts data far outside the action range, where float32
    rounding of values in the thousands hides the 1e-5 comparisons.)"""

    def __init__(self, sched):
        super().__init__()
        torch.manual_seed(0)
        self.unet = ConditionalUnet1D(A, C, UNetConfig(down_dims=[16, 32], step_embed_dim=16)).eval()
        self.proj = torch.nn.Linear(C, H * A)
        self.abar = sched.alphas_cumprod.double()

    @torch.no_grad()
    def forward(self, x, t, cond):
        T = len(self.abar)
        a = torch.from_numpy(np.interp(t.double().numpy(), np.arange(T), self.abar.numpy())).float()
        a = a.reshape(-1, 1, 1)
        target = 0.8 * torch.tanh(self.proj(cond)).reshape(-1, H, A)
        return (x - a.sqrt() * target) / (1 - a).sqrt() + 0.05 * self.unet(x, t, cond)


def inputs(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, H, A, generator=g), torch.randn(batch, C, generator=g)


class Counting:
    """The denoiser, counting its calls and the rows it was given."""

    def __init__(self, net):
        self.net, self.calls, self.rows = net, 0, []

    def __call__(self, x, t, cond):
        self.calls += 1
        self.rows.append(x.shape[0])
        return self.net(x, t, cond)


def diffusers_loop(net, cond, sched, noise, seed, solver, steps, spacing, record=None):
    """diffusers' own sequential loop with the same noise (`record` collects each step's input)."""
    ts = timesteps(sched, steps, spacing)
    if solver == "ddpm":
        s = DDPMScheduler.from_config(sched.config)
        s.set_timesteps(timesteps=ts.tolist())
        kwargs = {"generator": torch.Generator().manual_seed(seed)}
    elif solver == "ddim":
        s = DDIMScheduler.from_config(sched.config, timestep_spacing=spacing)
        s.set_timesteps(steps)
        assert np.array_equal(s.timesteps.numpy(), ts)  # constant strides only: diffusers' DDIM assumes one
        kwargs = {"eta": 0.0}
    else:
        # clipping x0 to [-1, 1] is diffusers' dynamic thresholding with its threshold clamped to 1
        s = DPMSolverMultistepScheduler.from_config(sched.config, algorithm_type="dpmsolver++",
                                                    solver_order=2, thresholding=sched.config.clip_sample,
                                                    sample_max_value=1.0)
        s.set_timesteps(timesteps=ts.tolist())
        kwargs = {}
    x = noise
    with torch.no_grad():
        for t in s.timesteps:
            if record is not None:
                record.append(x)
            x = s.step(net(x, t.float().expand(x.shape[0]), cond), t, x, **kwargs).prev_sample
    return x


CASES = [
    ("ddpm", 100, "trailing"), ("ddpm", 10, "trailing"), ("ddpm", 15, "linspace"), ("ddpm", 12, "quadratic"),
    ("ddpm", 20, "logsnr"), ("ddpm", 7, "leading"),
    ("ddim", 10, "trailing"), ("ddim", 15, "leading"), ("ddim", 25, "trailing"), ("ddim", 1, "trailing"),
    ("dpmsolver", 15, "trailing"), ("dpmsolver", 10, "linspace"), ("dpmsolver", 20, "logsnr"),
    ("dpmsolver", 8, "quadratic"), ("dpmsolver", 100, "trailing"), ("dpmsolver", 2, "trailing"),
]


@pytest.mark.parametrize("solver,steps,spacing", CASES)
def test_sequential_matches_diffusers_step_loop(net, sched, solver, steps, spacing):
    noise, cond = inputs(3)
    ours = get_sampler(solver)(net, cond, sched, noise, torch.Generator().manual_seed(7), steps=steps,
                               spacing=spacing)
    ref = diffusers_loop(net, cond, sched, noise, 7, solver, steps, spacing)
    assert ours.model_evals == ours.parallel_iters == steps and ours.converged
    assert (ours.x - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("solver,steps,spacing", CASES[::2])
def test_each_step_matches_diffusers_step(net, sched, solver, steps, spacing):
    """Step by step: from diffusers' own point x_k, our batched step gives diffusers' x_{k+1}."""
    noise, cond = inputs(2)
    xs = []
    final = diffusers_loop(net, cond, sched, noise, 11, solver, steps, spacing, record=xs)
    xs.append(final)
    plan = get_plan(sched, solver, steps, spacing, "cpu")
    z = plan.draw_noise(noise.shape, torch.Generator().manual_seed(11), "cpu", torch.float32)
    history = new_history(plan, noise)
    rows = torch.arange(2)
    for k in range(steps):
        ours = step_rows(plan, net, cond, xs[k], torch.full_like(rows, k), rows, history) + z[k]
        assert (ours - xs[k + 1]).abs().max().item() <= 1e-5, f"step {k}"


@settings(max_examples=40, deadline=None, derandomize=True)
@given(solver=st.sampled_from(["ddpm", "ddim", "dpmsolver"]), steps=st.integers(1, 40),
       window=st.integers(1, 20), spacing=st.sampled_from(["trailing", "linspace", "quadratic", "logsnr"]),
       batch=st.integers(1, 3), anderson=st.sampled_from([0, 1, 4]),
       rule=st.sampled_from(["paper", "x0", "chunk"]), floor=st.sampled_from([0.0, 1e-2]), pad=st.booleans())
def test_paradigms_at_zero_tolerance_is_the_sequential_sampler(net, sched, solver, steps, window, spacing,
                                                               batch, anderson, rule, floor, pad):
    noise, cond = inputs(batch, seed=steps)
    if rule == "chunk":  # a whole-chain window, no per-point scale
        window, floor = steps + window - 1, 0.0
    seq = get_sampler(solver)(net, cond, sched, noise, torch.Generator().manual_seed(1), steps=steps,
                              spacing=spacing)
    par = get_sampler(f"para{solver}")(net, cond, sched, noise, torch.Generator().manual_seed(1), steps=steps,
                                       spacing=spacing, window=window, tol=0.0, anderson=anderson, rule=rule,
                                       floor=floor, pad=pad)
    assert par.converged and par.parallel_iters <= steps
    assert (par.x - seq.x).abs().max().item() <= 1e-5


@pytest.mark.parametrize("solver", ["ddpm", "ddim", "dpmsolver"])
def test_paradigms_window_one_is_sequential_in_counts_and_result(net, sched, solver):
    noise, cond = inputs(2)
    seq = get_sampler(solver)(net, cond, sched, noise, torch.Generator().manual_seed(3), steps=30)
    counting = Counting(net)
    par = get_sampler(f"para{solver}")(counting, cond, sched, noise, torch.Generator().manual_seed(3),
                                       steps=30, window=1, tol=0.5)
    assert par.parallel_iters == counting.calls == 30 and par.model_evals == 30
    assert (par.x - seq.x).abs().max().item() <= 1e-5


def test_paradigms_counts_when_every_guess_is_accepted(net, sched):
    """A tolerance nothing exceeds accepts whole windows: ceil(n / window) iterations, n evaluations."""
    noise, cond = inputs(1)
    counting = Counting(net)
    par = get_sampler("paraddpm")(counting, cond, sched, noise, None, steps=100, window=16, tol=1e9)
    assert par.parallel_iters == counting.calls == 7 and par.model_evals == 100 and par.converged
    assert counting.rows == [16] * 6 + [4]


@pytest.mark.parametrize("solver, anderson, rule, tol, window", [
    ("ddpm", 0, "paper", 0.1, 16), ("ddim", 4, "paper", 0.5, 15), ("dpmsolver", 4, "x0", 0.05, 10),
    ("ddpm", 4, "chunk", 0.01, 100)])
def test_padded_rounds_are_the_same_rounds_at_a_fixed_shape(net, sched, solver, anderson, rule, tol, window):
    """`pad` (for a captured denoiser) feeds every round the full window of every sample, finished
    ones included, and masks the extra rows: the same chain, rounds and counts as without."""
    noise, cond = inputs(2, seed=4)
    steps = 100 if solver == "ddpm" else 15
    kw = dict(steps=steps, window=window, tol=tol, anderson=anderson, rule=rule)
    plain, padded = Counting(net), Counting(net)
    a = get_sampler(f"para{solver}")(plain, cond, sched, noise, torch.Generator().manual_seed(6), **kw)
    b = get_sampler(f"para{solver}")(padded, cond, sched, noise, torch.Generator().manual_seed(6),
                                     pad=True, **kw)
    assert (a.parallel_iters, a.evals_per_sample) == (b.parallel_iters, b.evals_per_sample)
    assert padded.rows == [2 * min(window, steps)] * b.parallel_iters  # one shape for every round
    assert sum(plain.rows) == sum(a.evals_per_sample) < sum(padded.rows)
    assert (a.chain - b.chain).abs().max().item() <= 1e-5


HOST_READS = ("__bool__", "item", "tolist", "nonzero", "numpy", "cpu")


def test_a_padded_round_waits_for_the_device_once(net, sched, monkeypatch):
    """On a GPU every host read of a tensor (`bool`, `item`, `tolist`, `nonzero`, ...) waits for
    the device's queue. A padded plan reads once per round (the loop's convergence test) and twice
    at the end (counts, converged), whatever the window, rule and Anderson memory; the unpadded
    one also selects its rows on the host every round."""
    reads, inside = [], [False]
    for method in HOST_READS:
        def counted(self, *args, _original=getattr(torch.Tensor, method), _name=method, **kwargs):
            if not inside[0]:
                reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, counted)

    def denoiser(x, t, cond):  # the stand-in reads t on the host (a network does not): not counted
        inside[0] = True
        try:
            return net(x, t, cond)
        finally:
            inside[0] = False

    noise, cond = inputs(2, seed=4)
    # The chain's plan is built once per setting from the scheduler's host tensors (cached by
    # get_plan), not per round: build it before counting, or the count depends on whether an
    # earlier test of this process built it already (it failed alone, passed in the suite).
    get_plan(sched, "ddpm", 100, "trailing", noise.device, noise.dtype)
    for kw in (dict(window=16, tol=0.1), dict(window=100, tol=1.0, floor=3e-2, anderson=4),
               dict(window=100, rule="chunk", tol=0.01, anderson=4)):
        counts = {}
        for pad in (True, False):
            reads.clear()
            par = get_sampler("paraddpm")(denoiser, cond, sched, noise, torch.Generator().manual_seed(0),
                                          steps=100, pad=pad, **kw)
            counts[pad] = (len(reads), par.parallel_iters)
        assert counts[True][0] == counts[True][1] + 1 + 2, (kw, counts)
        assert counts[False][0] >= counts[False][1] + counts[True][0], (kw, counts)


def test_paradigms_max_iters_caps_and_says_so(net, sched):
    noise, cond = inputs(1)
    par = get_sampler("paraddpm")(net, cond, sched, noise, torch.Generator().manual_seed(0), steps=100,
                                  window=8, tol=0.0, max_iters=5)
    assert par.parallel_iters == 5 and not par.converged and par.model_evals == 40


def test_paradigms_batch_converges_per_sample_in_one_call_per_iteration(net, sched):
    noise, cond = inputs(3, seed=5)
    kw = dict(steps=60, window=10, tol=0.05)
    alone = [get_sampler("paraddim")(net, cond[i:i + 1], sched, noise[i:i + 1], None, **kw) for i in range(3)]
    counting = Counting(net)
    batch = get_sampler("paraddim")(counting, cond, sched, noise, None, **kw)
    assert batch.evals_per_sample == [r.model_evals for r in alone]
    assert batch.parallel_iters == counting.calls == max(r.parallel_iters for r in alone)
    assert sum(counting.rows) == sum(batch.evals_per_sample)  # finished samples cost nothing
    for i, r in enumerate(alone):
        assert (batch.x[i] - r.x[0]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("solver", ["ddpm", "ddim", "dpmsolver"])
def test_paradigms_converges_in_few_rounds_within_tolerance(net, sched, solver):
    noise, cond = inputs(1)
    seq = get_sampler(solver)(net, cond, sched, noise, torch.Generator().manual_seed(2), steps=50)
    par = get_sampler(f"para{solver}")(net, cond, sched, noise, torch.Generator().manual_seed(2), steps=50,
                                       window=16, tol=0.1)
    assert par.converged and par.parallel_iters < 25
    assert (par.x - seq.x).abs().max().item() < 0.05


def _abar_of_points(sched, steps):
    """alpha_bar of the chain's points 0..n, from the schedule directly: point i < n sits at
    timestep ts[i], point n is clean."""
    ts = timesteps(sched, steps, "trailing")
    return np.append(sched.alphas_cumprod.double().numpy()[ts], 1.0)


def _posterior_var_of_points(sched, steps):
    ts = timesteps(sched, steps, "trailing")
    a = sched.alphas_cumprod.double().numpy()[ts]
    ap = np.append(a[1:], 1.0)
    var = np.append(1.0, (1 - ap) / (1 - a) * (1 - a / ap))
    var[var <= 0] = var[var > 0].min()
    return var


@pytest.mark.parametrize("rule, tol, floor, window", [
    ("paper", 0.1, 0.0, 16), ("paper", 0.5, 1e-2, 100), ("x0", 0.02, 0.0, 100), ("x0", 0.05, 1e-3, 16),
])
def test_every_accepted_point_satisfies_its_rule(net, sched, rule, tol, floor, window):
    """Each round, the points the window slides past (other than the exact first) passed the rule:
    |change|^2 <= tol^2 * dim * max(scale, floor), scale = posterior variance (paper) or alpha_bar (x0)."""
    noise, cond = inputs(2)
    scale = (_posterior_var_of_points if rule == "paper" else _abar_of_points)(sched, 100)
    bound = tol**2 * noise[0].numel() * np.maximum(scale, floor)
    seen = []

    def check(state):
        begin_before = seen[-1] if seen else torch.zeros(2, dtype=torch.long)
        change, points, valid = state["change"].numpy(), state["points"].numpy(), state["valid"].numpy()
        for b in range(2):
            slid = int(state["begin"][b] - begin_before[b])
            for j in range(slid - 1):  # the rows before the new first point's row passed the rule
                assert valid[b, j] and change[b, j] <= bound[points[b, j]] * (1 + 1e-5)
        seen.append(state["begin"].clone())

    seq = get_sampler("ddpm")(net, cond, sched, noise, torch.Generator().manual_seed(2), steps=100)
    par = get_sampler("paraddpm")(net, cond, sched, noise, torch.Generator().manual_seed(2), steps=100,
                                  window=window, tol=tol, rule=rule, floor=floor, callback=check)
    assert par.converged and len(seen) == par.parallel_iters
    assert (par.x - seq.x).abs().max().item() < 0.2


def test_chunk_rule_stops_when_the_chunk_stops_moving_and_every_round_yields_one(net, sched):
    """Whole-chain window: the run ends in the first round whose chain end moved by at most tol per
    number; cut earlier (max_iters), it returns that round's whole chunk."""
    noise, cond = inputs(1)
    seq = get_sampler("ddpm")(net, cond, sched, noise, torch.Generator().manual_seed(2), steps=100)
    finals = []

    def track(state):
        finals.append(state["chain"][:, 100].clone())

    tol = 0.01
    par = get_sampler("paraddpm")(net, cond, sched, noise, torch.Generator().manual_seed(2), steps=100,
                                  window=100, tol=tol, rule="chunk", callback=track)
    assert par.converged and par.parallel_iters == len(finals) < 40
    moves = [(b - a).square().sum().item() for a, b in zip(finals, finals[1:])]
    dim = noise[0].numel()
    assert moves[-1] <= tol**2 * dim and all(m > tol**2 * dim for m in moves[:-1])
    assert (par.x - seq.x).abs().max() < 0.05
    for k in (2, 8):
        cut = get_sampler("paraddpm")(net, cond, sched, noise, torch.Generator().manual_seed(2), steps=100,
                                      window=100, tol=tol, rule="chunk", max_iters=k)
        assert not cut.converged and cut.parallel_iters == k and torch.equal(cut.x, finals[k - 1])
    with pytest.raises(UserError, match="sampler.window: 16 is shorter than the chain"):
        get_sampler("paraddpm")(net, cond, sched, noise, None, steps=100, window=16, tol=tol, rule="chunk")


def test_a_floor_on_the_scale_saves_rounds_over_the_whole_chain(net, sched):
    """The paper's rule asks the last DDPM points for a precision far below an action's; a floor
    (1e-2) takes fewer rounds at the same tol, whole-chain window, Anderson 4."""
    noise, cond = inputs(1)
    kw = dict(steps=100, window=100, tol=0.5, anderson=4)
    runs = {f: get_sampler("paraddpm")(net, cond, sched, noise, torch.Generator().manual_seed(2),
                                       floor=f, **kw)
            for f in (0.0, 1e-2)}
    assert runs[1e-2].parallel_iters < runs[0.0].parallel_iters


def test_anderson_mixing_saves_rounds_and_stays_within_tolerance(net, sched):
    """ParaDDPM-100, window 16, tol 0.1 on the stand-in: Anderson mixing over 2 rounds accepts more
    per round (27 -> 23 rounds here) and lands as close to the sequential chain as the tolerance allows."""
    noise, cond = inputs(1)
    seq = get_sampler("ddpm")(net, cond, sched, noise, torch.Generator().manual_seed(2), steps=100)
    runs = {m: get_sampler("paraddpm")(net, cond, sched, noise, torch.Generator().manual_seed(2), steps=100,
                                       window=16, tol=0.1, anderson=m) for m in (0, 2)}
    assert all(r.converged for r in runs.values())
    assert runs[2].parallel_iters <= runs[0].parallel_iters - 3 and runs[2].model_evals < runs[0].model_evals
    assert (runs[2].x - seq.x).abs().max().item() < 0.05


def test_anderson_mixing_is_triangular():
    """A point's mixed guess uses the residuals of the points up to it only: changing the history of
    a later point leaves every earlier point's guess unchanged (and changes its own)."""
    from policy.samplers.anderson import TriangularAnderson

    g = torch.Generator().manual_seed(0)
    chains = [torch.randn(1, 9, 4, 3, generator=g) for _ in range(8)]  # guesses and images of 4 rounds
    after, valid, var = torch.arange(1, 7)[None], torch.ones(1, 6, dtype=torch.bool), torch.rand(9) + 0.5

    def run(edit):
        aa, out = TriangularAnderson(memory=3), None
        for r in range(4):
            x, f = chains[2 * r][:, 1:7].clone(), chains[2 * r + 1][:, 1:7].clone()  # the window's points
            if edit and r == 2:
                f[0, 4] += 1.0  # point 5 (window row 4)
            out = aa.mix(x, f, after, valid, var)
        return out

    first = TriangularAnderson(memory=3).mix(chains[0][:, 1:7], chains[1][:, 1:7], after, valid, var)
    assert torch.equal(first, chains[1][0, 1:7][None])  # no history yet: the Picard image
    base, edited = run(False), run(True)
    assert torch.equal(base[:, :4], edited[:, :4]) and not torch.allclose(base[:, 4], edited[:, 4])


@pytest.mark.parametrize("solver", ["ddim", "ddpm", "dpmsolver"])
@pytest.mark.parametrize("steps,blocks", [(12, 3), (10, 4), (7, 1)])
def test_piadm_with_enough_iterations_is_the_sequential_sampler(net, sched, solver, steps, blocks):
    noise, cond = inputs(2)
    seq = get_sampler(solver)(net, cond, sched, noise, torch.Generator().manual_seed(4), steps=steps)
    counting = Counting(net)
    out = get_sampler("piadm")(counting, cond, sched, noise, torch.Generator().manual_seed(4), solver=solver,
                               steps=steps, blocks=blocks, picard_iters=steps)
    assert (out.x - seq.x).abs().max().item() <= 1e-5
    sizes = [len(b) for b in np.array_split(np.arange(steps), blocks)]
    assert out.parallel_iters == counting.calls == sum(sizes)  # iterations beyond a block's size are skipped
    assert out.model_evals == sum(m * (m + 1) // 2 for m in sizes)  # exact points are not re-evaluated


def test_piadm_counts_and_approximation(net, sched):
    noise, cond = inputs(1)
    seq = get_sampler("ddim")(net, cond, sched, noise, None, steps=20)
    errs = []
    for k in (1, 2, 3):
        out = get_sampler("piadm")(net, cond, sched, noise, None, steps=20, blocks=4, picard_iters=k)
        assert out.parallel_iters == 4 * k and out.model_evals == 4 * sum(5 - i for i in range(k))
        errs.append((out.x - seq.x).abs().max().item())
    assert errs[2] < errs[0]  # more iterations, closer to the sequential chain


def test_sampler_config_refuses_foreign_options_and_bad_values():
    fn, opts = resolve(SamplerConfig(name="paraddim", steps=15, window=8, tol=0.1))
    assert opts == {"steps": 15, "window": 8, "tol": 0.1}
    with pytest.raises(UserError, match=r"sampler.tol: not an option of ddim"):
        resolve(SamplerConfig(name="ddim", steps=15, tol=0.1))
    with pytest.raises(UserError, match=r"sampler.spacing: 'cubic'"):
        resolve(SamplerConfig(name="ddim", spacing="cubic"))
    with pytest.raises(UserError, match=r"sampler.name: unknown sampler 'foo'"):
        resolve(SamplerConfig(name="foo"))
    with pytest.raises(UserError, match=r"sampler.window"):
        resolve(SamplerConfig(name="paraddpm", window=0))
    with pytest.raises(UserError, match=r"sampler.anderson: -1 must be >= 0"):
        resolve(SamplerConfig(name="paraddpm", anderson=-1))
    with pytest.raises(UserError, match=r"sampler.anderson: not an option of piadm"):
        resolve(SamplerConfig(name="piadm", anderson=2))
    with pytest.raises(UserError, match=r"sampler.rule: 'loose' is not an acceptance rule; "
                                        r"known: paper, x0, chunk"):
        resolve(SamplerConfig(name="paraddpm", rule="loose"))
    with pytest.raises(UserError, match=r"sampler.floor: -0.1 must be >= 0"):
        resolve(SamplerConfig(name="paraddpm", floor=-0.1))
    with pytest.raises(UserError, match=r"sampler.window: 16 is shorter than the chain: the chunk rule"):
        resolve(SamplerConfig(name="paraddpm", steps=100, window=16, rule="chunk"))
    with pytest.raises(UserError, match=r"sampler.rule: not an option of ddpm"):
        resolve(SamplerConfig(name="ddpm", rule="x0"))


def test_timestep_spacings_are_strictly_decreasing_and_start_at_the_noise(sched):
    for spacing in ("trailing", "quadratic", "logsnr", "linspace"):
        for steps in (1, 2, 5, 15, 50, 100):
            ts = timesteps(sched, steps, spacing)
            assert len(ts) == steps and np.all(np.diff(ts) < 0) and ts[-1] >= 0
            assert ts[0] == 99 or (spacing, steps) == ("linspace", 1)  # diffusers' linspace of 1 is [0]
    with pytest.raises(UserError, match="sampler.steps"):
        timesteps(sched, 101, "trailing")
