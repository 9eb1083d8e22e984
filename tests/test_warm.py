"""Warm starts across control steps (policy.warm): the noise shifts on the action-time axis, a
warm start changes the iteration count and not the answer (tol = 0), and a good guess saves
rounds, counted."""

import numpy as np
import pytest
import torch
from test_samplers import Counting, inputs

from common.errors import UserError
from policy.checkpoint import load_policy
from policy.samplers import SamplerConfig, get_sampler, resolve
from policy.samplers.solvers import get_plan
from policy.warm import WarmStart
from rollouts.presets import sampler_preset


def test_noise_and_chain_shift_on_the_action_time_axis(sched):
    plan = get_plan(sched, "ddpm", 10, "trailing", "cpu")
    warm, shape, g = WarmStart(), (2, 16, 7), torch.Generator().manual_seed(4)
    noise, z, init = warm.prepare(plan, shape, g, "cpu", torch.float32, advance=8)
    assert init is None  # nothing to start from: cold, and drawn as a plain plan draws
    ref = torch.Generator().manual_seed(4)
    assert torch.equal(noise, torch.randn(shape, generator=ref))
    assert torch.equal(z, plan.draw_noise(shape, ref, "cpu", torch.float32))
    chain = torch.randn(2, 11, 16, 7)
    warm.keep(chain)
    noise2, z2, init2 = warm.prepare(plan, shape, g, "cpu", torch.float32, advance=8)
    assert torch.equal(noise2[:, :8], noise[:, 8:]) and torch.equal(z2[:, :, :8], z[:, :, 8:])
    assert not torch.equal(noise2[:, 8:], noise[:, 8:])  # the tail is drawn fresh
    assert torch.equal(init2[:, 1:, :8], chain[:, 1:, 8:]) and torch.equal(init2[:, 0], noise2)
    # the tail guess: the last action, noised to each point's level with x_T's new tail
    assert torch.allclose(init2[:, -1, 8:], chain[:, -1, -1:].expand(2, 8, 7))
    a = plan.sqrt_a[3]
    assert torch.allclose(init2[:, 3, 8:], a * chain[:, -1, -1:] + (1 - a**2).sqrt() * noise2[:, 8:],
                          atol=1e-6)
    warm.keep(chain)
    assert warm.prepare(plan, shape, g, "cpu", torch.float32, advance=None)[2] is None  # no advance: cold
    warm.keep(chain)
    other = get_plan(sched, "ddpm", 12, "trailing", "cpu")
    assert warm.prepare(other, shape, g, "cpu", torch.float32, advance=8)[2] is None  # another chain: cold


@pytest.mark.parametrize("name, kw", [
    ("paraddpm", dict(steps=40, window=8)), ("paraddim", dict(steps=25, window=10)),
    ("paradpmsolver", dict(steps=20, window=6)), ("piadm", dict(steps=24, blocks=3, picard_iters=8)),
    ("paraddpm", dict(steps=40, window=8, anderson=3)),
])
def test_a_warm_start_at_zero_tolerance_is_the_cold_result(net, sched, name, kw):
    noise, cond = inputs(2)
    fn = get_sampler(name)
    solver = "ddim" if name == "piadm" else name[4:]
    z = get_plan(sched, solver, kw["steps"], "trailing", "cpu").draw_noise(noise.shape,
                                                                           torch.Generator().manual_seed(2),
                                                                            "cpu", torch.float32)
    extra = {} if name == "piadm" else {"tol": 0.0}
    cold = fn(net, cond, sched, noise, None, step_noise=z, **kw, **extra)
    seq = get_sampler(solver)(net, cond, sched, noise, None, step_noise=z, steps=kw["steps"])
    assert (cold.x - seq.x).abs().max() <= 1e-5 and cold.chain.shape == (2, kw["steps"] + 1, 16, 7)
    for guess in (torch.randn_like(cold.chain), cold.chain.roll(3, dims=2)):  # any guess, good or bad
        warm = fn(net, cond, sched, noise, None, step_noise=z, init=guess, **kw, **extra)
        assert (warm.x - cold.x).abs().max() <= 1e-5
        assert torch.equal(warm.chain[:, 0], noise)


def test_the_converged_chain_as_the_guess_saves_the_rounds(net, sched):
    """Started from its own fixed point, ParaDDPM-100 accepts every window whole: ceil(100 / 16) = 7
    rounds and 100 evaluations, where the cold start needs several times as many."""
    noise, cond = inputs(1)
    kw = dict(steps=100, window=16, tol=0.1)
    z = get_plan(sched, "ddpm", 100, "trailing", "cpu").draw_noise(noise.shape,
                                                                   torch.Generator().manual_seed(5),
                                                                   "cpu", torch.float32)
    cold = get_sampler("paraddpm")(net, cond, sched, noise, None, step_noise=z, **kw)
    fixed_point = get_sampler("paraddpm")(net, cond, sched, noise, None, step_noise=z,
                                          **{**kw, "tol": 0.0}).chain
    counting = Counting(net)
    warm = get_sampler("paraddpm")(counting, cond, sched, noise, None, step_noise=z, init=fixed_point, **kw)
    assert warm.parallel_iters == counting.calls == 7 and warm.model_evals == 100
    assert cold.parallel_iters >= 14
    assert (warm.x - fixed_point[:, -1]).abs().max() <= 1e-5


def test_warm_is_refused_where_there_is_no_chain_and_parsed_where_there_is():
    with pytest.raises(UserError, match="sampler.start: a sequential sampler warm-starts part-way"):
        resolve(SamplerConfig(name="ddim", steps=10, warm=True))
    with pytest.raises(UserError, match="sampler.start: .*now warm=None, start=5"):
        resolve(SamplerConfig(name="ddpm", steps=10, start=5))
    with pytest.raises(UserError, match="sampler.start: -2 must be >= 0"):
        resolve(SamplerConfig(name="ddpm", steps=10, start=-2, warm=True))
    with pytest.raises(UserError, match="sampler.start: not an option of paraddpm"):
        resolve(SamplerConfig(name="paraddpm", start=5, warm=True))
    cfg = sampler_preset("paraddpm100:warm=true")
    assert cfg.warm is True and cfg.name == "paraddpm"
    resolve(SamplerConfig(name="piadm", steps=12, warm=True))


def test_policy_plans_carry_noise_and_chain_and_stay_exact(checkpoint):
    """Along one episode a warm ParaDDPM plans exactly what a cold one plans from the same (shifted)
    noise; its first plan is the plain sampler's; `seed` starts cold again."""
    pol = load_policy(checkpoint)
    rng = np.random.default_rng(0)
    history = [rng.normal(size=(2, pol.obs_dim)).astype(np.float32) for _ in range(4)]
    pol.sampler = SamplerConfig(name="paraddpm", steps=30, window=8, tol=0.0)
    pol.seed(9)
    plain_first = pol.plan(history[0]).actions
    pol.sampler = SamplerConfig(name="paraddpm", steps=30, window=8, tol=0.0, warm=True)
    pol.seed(9)
    plans = []
    for i, obs in enumerate(history):
        before = None if pol.warm.noise is None else pol.warm.noise.clone()
        r = pol.plan(obs, advance=8 if i else None)  # the runner's cadence: a plan every 8 steps
        plans.append(r)
        if before is not None:
            assert torch.equal(pol.warm.noise[:, :-8], before[:, 8:])
        # the same noise, cold, through the plain sampler function
        with torch.no_grad():
            cold = get_sampler("paraddpm")(pol.net, pol.condition(torch.as_tensor(obs)[None]), pol.scheduler,
                                           pol.warm.noise, None, step_noise=pol.warm.step_noise, steps=30,
                                           window=8, tol=0.0)
            want = pol.normalizer.unnormalize("action", cold.x)[0, 1:9].numpy()
        np.testing.assert_allclose(r.actions, want, atol=1e-4)
    np.testing.assert_array_equal(plans[0].actions, plain_first)  # the first plan is the plain sampler's
    pol.seed(9)
    assert pol.warm.chain is None and np.allclose(pol.plan(history[0]).actions, plans[0].actions)


def test_each_server_connection_keeps_its_own_warm_state(checkpoint):
    from policy.warm import WarmStart
    from rollouts.serve import PolicyService

    pol = load_policy(checkpoint)
    pol.sampler = SamplerConfig(name="paraddpm", steps=20, window=8, tol=0.1, warm=True)
    pol.seed(0)
    service, a, b = PolicyService(pol), WarmStart(), WarmStart()
    obs = {"obs_history": np.zeros((2, pol.obs_dim), np.float32)}
    own = pol.warm
    service.infer(obs, a)
    first = a.noise.clone()
    service.infer(obs, b)  # another connection: its own stream, a is untouched
    assert torch.equal(a.noise, first) and b.chain is not None and pol.warm is own and own.chain is None
    service.infer({**obs, "advance": 8}, a)
    assert torch.equal(a.noise[:, :8], first[:, 8:])
    service.infer(obs, a)  # no advance: cold again
    assert not torch.equal(a.noise[:, :8], first[:, 8:])
    with pytest.raises(ValueError, match="advance: -1 is not a non-negative integer"):
        service.infer({**obs, "advance": -1}, a)


def test_dp_bench_closed_loop_runs_warm_rows_exactly(checkpoint, tmp_path):
    from rollouts.bench import BenchConfig, run_bench

    cfg = BenchConfig(checkpoint=str(checkpoint), plans=10, closed_loop=True, threads=1, warmup=1,
                      overhead_plans=2, batch_sizes=[1, 2],
                      samplers=["paraddpm100paper:steps=20,window=8,tol=0",
                                "paraddpm100paper:steps=20,window=8,tol=0,warm=true",
                                "paraddpm100paper:steps=20,window=8,warm=true"])
    results, context = run_bench(cfg)
    by = {r["name"]: r for r in results}
    assert context["closed_loop"] is True
    exact = by["paraddpm100paper:steps=20,window=8,tol=0,warm=true"]
    # against DDPM on its own noise
    assert exact["baseline"] == "ddpm20" and exact["action_max_abs_diff"] <= 1e-4
    assert exact["parallel_iters_mean"] == 20  # tol 0 slides one step per round, warm or cold
    loose = by["paraddpm100paper:steps=20,window=8,warm=true"]
    assert loose["parallel_iters_mean"] < 20 and loose["action_max_abs_diff"] < 0.5


def test_dp_bench_compares_falcon_with_the_whole_chain(checkpoint):
    from rollouts.bench import BenchConfig, run_bench

    cfg = BenchConfig(checkpoint=str(checkpoint), plans=6, closed_loop=True, threads=1, warmup=1,
                      overhead_plans=1, batch_sizes=[1, 2],
                      samplers=["falcon100:steps=20,start=10", "paraddpm100:steps=20,window=8"])
    results, _ = run_bench(cfg)
    by = {r["name"]: r for r in results}
    assert (by["falcon100:steps=20,start=10"]["baseline"] == by["paraddpm100:steps=20,window=8"]["baseline"]
            == "ddpm20")
    assert 10 <= by["falcon100:steps=20,start=10"]["model_evals_mean"] < 20  # cold first plans, then 10 calls


def test_episode_sequences_step_through_episodes_by_the_action_chunk(checkpoint):
    from envs.store import open_store
    from policy.windows import episode_sequences

    pol = load_policy(checkpoint)
    obs, first = episode_sequences(pol, pol.meta["data"], "val", 12)
    with open_store(pol.meta["data"]) as store:
        data = np.asarray(store["obs"], np.float32)
        end0 = int(store.episode_ends[0])
    assert obs.shape == (12, 2, pol.obs_dim) and first[0]
    np.testing.assert_array_equal(obs[0], data[[0, 0]])  # the episode's start, history edge-padded
    np.testing.assert_array_equal(obs[1], data[[7, 8]])  # 8 steps later
    k = int(np.ceil(end0 / 8))
    assert first[k] and not first[1:k].any()


@pytest.mark.parametrize("solver", ["ddpm", "ddim"])
def test_falcon_starts_part_way_from_the_previous_chunk_noised_to_that_level(net, sched, solver):
    """Warm with start s: point s is the guess of the chain's end noised with x_T to step s's level,
    then the plain steps s..n-1 follow (n - s calls); cold, it is the plain sampler."""
    noise, cond = inputs(2)
    fn = get_sampler(solver)
    plan = get_plan(sched, solver, 40, "trailing", "cpu")
    z = plan.draw_noise(noise.shape, torch.Generator().manual_seed(2), "cpu", torch.float32)
    plain = fn(net, cond, sched, noise, None, step_noise=z, steps=40)
    assert plain.chain.shape == (2, 41, 16, 7) and torch.equal(plain.chain[:, -1], plain.x)
    cold = fn(net, cond, sched, noise, None, step_noise=z, steps=40, start=25)  # no guess: the whole chain
    assert cold.model_evals == 40 and torch.equal(cold.x, plain.x)
    guess = torch.randn(2, 41, 16, 7, generator=torch.Generator().manual_seed(3))
    counting = Counting(net)
    warm = fn(counting, cond, sched, noise, None, step_noise=z, steps=40, start=25, init=guess)
    assert warm.model_evals == warm.parallel_iters == counting.calls == 15
    a = plan.sqrt_a[25]
    assert torch.allclose(warm.chain[:, 25], a * guess[:, 40] + (1 - a * a).sqrt() * noise, atol=1e-6)
    # the rest of the chain: the plain steps from that point, with the same step noise
    x = warm.chain[:, 25]
    rows = torch.arange(2)
    from policy.samplers.solvers import step_rows

    for i in range(25, 40):
        x = step_rows(plan, net, cond, x, torch.full_like(rows, i), rows, None) + z[i]
    assert (warm.x - x).abs().max() <= 1e-6
    # a guess at the data itself starts the steps closer to the plain chain than a wrong guess does
    # (the end result of an untrained net hardly depends on where step 25 starts, so compare there)
    near = fn(net, cond, sched, noise, None, step_noise=z, steps=40, start=25, init=plain.chain)
    gap = lambda r: (r.chain[:, 25] - plain.chain[:, 25]).abs().mean()  # noqa: E731
    assert gap(near) < gap(warm)


def test_falcon_needs_a_one_step_solver_and_a_step_of_its_chain(net, sched):
    noise, cond = inputs(1)
    guess = torch.zeros(1, 11, 16, 7)
    with pytest.raises(UserError, match="sampler.start: a warm start part-way .* one-step solver"):
        get_sampler("dpmsolver")(net, cond, sched, noise, None, steps=10, start=3, init=guess)
    with pytest.raises(UserError, match=r"sampler.start: 10 is not a step of the 10-step chain \(0..9\)"):
        get_sampler("ddpm")(net, cond, sched, noise, None, steps=10, start=10, init=guess)


def test_policy_falcon_plans_cold_first_then_part_way(checkpoint):
    """Along one episode Falcon's first plan is plain DDPM's; the next ones cost n - start calls."""
    pol = load_policy(checkpoint)
    rng = np.random.default_rng(1)
    history = [rng.normal(size=(2, pol.obs_dim)).astype(np.float32) for _ in range(3)]
    pol.sampler = SamplerConfig(name="ddpm", steps=30)
    pol.seed(4)
    plain_first = pol.plan(history[0]).actions
    pol.sampler = sampler_preset("falcon100:steps=30,start=20")
    pol.seed(4)
    plans = [pol.plan(obs, advance=8 if i else None) for i, obs in enumerate(history)]
    np.testing.assert_array_equal(plans[0].actions, plain_first)
    assert [p.model_evals for p in plans] == [30, 10, 10]
