"""Denoiser backends (`policy.backends`, issue 31): OpenVINO built from the policy's own weights
agrees with torch, every sampler feature runs on it or is refused in one line, ParaDiGMS at
zero tolerance reproduces its sequential twin on it, and `backend=auto` is measured once and cached."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from common.errors import UserError
import policy
from policy.backends import check_device
from policy.samplers import SamplerConfig
from rollouts.presets import sampler_preset

ZOO = Path(__file__).resolve().parents[1] / "zoo"


def _eps(pol, backend: str, rows: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(rows)
    x = torch.randn((rows, pol.cfg.horizon, pol.action_dim), generator=g)
    cond = torch.randn((rows, pol.cond_dim), generator=g)
    t = torch.linspace(0, pol.cfg.schedule.num_train_timesteps - 1, rows)
    with torch.no_grad():
        return pol.denoiser_for(backend)(x, t, cond)


@pytest.mark.parametrize("task", ["lift", "can", "square", "lift_image"])
def test_openvino_noise_estimates_agree_with_torch_on_the_shipped_policies(task):
    pol = policy.load(ZOO / task)
    for rows in (1, 16):
        ref, ov = _eps(pol, "torch", rows), _eps(pol, "openvino", rows)
        assert ((ov - ref).abs().max() / ref.abs().max()).item() <= 1e-5, (task, rows)


@pytest.mark.parametrize("solver, extra", [("ddim", {}), ("ddpm", {}), ("dpmsolver", {"anderson": 0}),
                                           ("ddim", {"pad": None, "capture": "pad"})])
def test_paradigms_at_zero_tolerance_reproduces_its_twin_on_openvino(checkpoint, solver, extra):
    pol = policy.load(checkpoint)
    obs = pol.neutral_obs()
    noise = torch.randn((1, pol.cfg.horizon, pol.action_dim), generator=torch.Generator().manual_seed(0))
    capture = extra.get("capture")
    pol.sampler = SamplerConfig(name=solver, steps=12, backend="openvino", capture=capture)
    seq, _ = pol.sample(obs, noise=noise, generator=torch.Generator().manual_seed(1))
    pol.sampler = SamplerConfig(name=f"para{solver}", steps=12, window=5, tol=0.0, backend="openvino",
                                capture=capture, anderson=extra.get("anderson"))
    par, res = pol.sample(obs, noise=noise, generator=torch.Generator().manual_seed(1))
    assert res.converged and res.parallel_iters <= 12
    assert (par - seq).abs().max().item() <= 1e-5


class _Calls:
    """Wraps every runtime-served denoiser call (no gradient): `measure` records how far the
    runtime's answer is from torch's on the same inputs; `perturb` adds uniform noise of that
    size to torch's answers instead (a seeded stream)."""

    def __init__(self, monkeypatch):
        from policy.denoiser import Denoiser

        self.mode, self.per_call, self.gen = None, 0.0, None
        call = Denoiser._call

        def wrapped(den, x, t, cond):
            out = call(den, x, t, cond)
            if torch.is_grad_enabled():  # RTC guidance's gradient calls run on torch on either backend
                return out
            if self.mode == "measure" and den.backend != "torch":
                ref = den._eager(den._network(), x, t.expand(x.shape[0]), cond)
                self.per_call = max(self.per_call, (out - ref).abs().max().item())
            if self.mode == "perturb":
                out = out + self.per_call * (2 * torch.rand(out.shape, generator=self.gen) - 1)
            return out

        monkeypatch.setattr(Denoiser, "_call", wrapped)


def _plans(ckpt, obs, spec: str, backend: str) -> np.ndarray:
    """Two plans of `spec` from seed 0: the second warm-started from the first; an inpainting spec
    plans the first with 4 committed actions, 2 frozen."""
    pol = policy.load(ckpt)
    pol.sampler = sampler_preset(f"{spec}{',' if ':' in spec else ':'}backend={backend}")
    pol.seed(0)
    committed = pol.plan(obs).actions[:4] if "inpaint" in spec else None
    pol.seed(0)
    first = pol.plan(obs, committed=committed, frozen=2 if committed is not None else 0)
    second = pol.plan(obs, advance=8)  # a warm sampler starts from the first plan's chain
    return np.concatenate([first.actions, second.actions])


def test_warm_start_rtc_and_aligner_taus_run_on_openvino_as_on_torch(checkpoint, tmp_path, monkeypatch):
    """Each feature on both backends from the same noise gives the same plans, up to what the
    chain makes of the runtime's per-call rounding. That bound is derived on this CPU, not tuned
    to one: the largest per-call difference (OpenVINO against torch on the same inputs, measured
    along the plan), fed to torch's own chain as uniform noise of that size (3 streams), moves the
    plan by some amount; OpenVINO's plan must stay within 3x the largest. Guidance amplifies a
    call's rounding ~100x: a fixed atol held on one CPU and failed on another. A feature the
    runtime ran wrongly (other timesteps, no warm start, no inpainting) moves a plan by >1e-2."""
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint, ckpt)
    (ckpt / "aligner").mkdir()
    doc = {"strategy": "sequential", "strategies": {"sequential": {"taus": [99.0, 79.5, 60.0, 39.0, 20.5]}}}
    (ckpt / "aligner" / "ddim-5-trailing.json").write_text(json.dumps(doc))
    obs = policy.load(ckpt).neutral_obs()[0].numpy()
    calls = _Calls(monkeypatch)
    specs = ["ddim5+aligner", "paraddim15:warm=true", "ddim10:inpaint=guide", "paraddim15:inpaint=replace"]
    for spec in specs:
        calls.mode = None
        ref = _plans(ckpt, obs, spec, "torch")
        calls.mode, calls.per_call = "measure", 0.0
        ov = _plans(ckpt, obs, spec, "openvino")
        assert 0 < calls.per_call <= 1e-5, (spec, calls.per_call)  # the per-call agreement itself
        calls.mode, moved = "perturb", 0.0
        for stream in range(3):
            calls.gen = torch.Generator().manual_seed(stream)
            moved = max(moved, float(np.abs(_plans(ckpt, obs, spec, "torch") - ref).max()))
        bound = 3 * moved
        assert 0 < bound < 1e-2, (spec, bound)  # still far below what a wrongly run feature moves
        np.testing.assert_allclose(ov, ref, rtol=0, atol=bound, err_msg=f"{spec}: bound {bound:.2e}")


def test_the_runtime_network_is_rebuilt_when_the_weights_change(checkpoint):
    pol = policy.load(checkpoint)
    before = _eps(pol, "openvino", 2)
    with torch.no_grad():
        for p in pol.net.parameters():
            p.mul_(1.01)  # in place, as an optimizer step or load_state_dict would
    after, ref = _eps(pol, "openvino", 2), _eps(pol, "torch", 2)
    assert (after - before).abs().max() > 1e-4
    assert ((after - ref).abs().max() / ref.abs().max()).item() <= 1e-5


@pytest.mark.parametrize("changes, message", [
    ({"backend": "onnx"}, "sampler.backend: 'onnx' is not one of auto, torch, openvino"),
    ({"backend": "openvino", "precision": "bf16"}, "openvino runs the network in fp32"),
    ({"backend": "openvino", "capture": "graph"}, "capture=graph is for torch on CUDA"),
])
def test_backends_that_cannot_run_a_setting_are_refused_in_one_line(checkpoint, changes, message):
    pol = policy.load(checkpoint)
    with pytest.raises(UserError, match=message):
        pol.sampler = SamplerConfig(name="ddim", steps=5, **changes)


def test_openvino_is_refused_on_a_gpu_and_auto_takes_torch_there():
    with pytest.raises(UserError, match="openvino runs on the CPU; this policy is on cuda:0"):
        check_device("openvino", torch.device("cuda", 0))
    check_device("auto", torch.device("cuda", 0))


def test_auto_leaves_16_bit_weights_on_torch_without_measuring(checkpoint, monkeypatch):
    """OpenVINO runs fp32 only: auto must not trade a bf16 request for a faster fp32 call."""
    from policy import backends

    monkeypatch.setattr(backends, "call_ms", lambda *a, **k: pytest.fail("measured"))
    pol = policy.load(checkpoint)
    pol.sampler = SamplerConfig(name="ddim", steps=4, backend="auto", precision="bf16")
    assert pol.backend == "torch"


def test_a_missing_runtime_is_one_line(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_openvino(name, *args, **kwargs):
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_openvino)
    from policy import backends

    with pytest.raises(UserError, match=r"sampler.backend: openvino is not installed here \(pip install "
                                        r"openvino\)"):
        backends.check("openvino")


def test_auto_is_measured_once_and_cached_per_rows(checkpoint):
    pol = policy.load(checkpoint)
    pol.sampler = sampler_preset("ddim5:backend=auto")
    chosen = pol.backend
    assert chosen in ("torch", "openvino")
    table = json.loads(Path(os.environ["PARAPOLICY_CACHE"]).read_text())
    entries = [v for k, v in table.items() if json.loads(k).get("backend-auto") == 1]
    assert entries and entries[-1]["backend"] == chosen and set(entries[-1]["ms"]) == {"torch", "openvino"}
    again = policy.load(checkpoint)
    again.sampler = sampler_preset("ddim5:backend=auto")
    calls = []
    import policy.backends as backends

    original = backends.call_ms
    backends.call_ms = lambda *a, **k: calls.append(a) or original(*a, **k)
    try:
        assert again.backend == chosen and calls == []  # from the cache, not measured again
    finally:
        backends.call_ms = original


@pytest.mark.parametrize("damage", [
    {"backend": "bogus"}, {"backend": None}, {"backend": 3}, {"ms": {"torch": "fast", "openvino": 1.0}},
    {"ms": {"torch": float("nan"), "openvino": 1.0}}, {"ms": {"torch": 1.0}}, {"ms": []}, {"rows": 0},
    "openvino", None,
])
def test_a_cached_backend_that_does_not_validate_is_measured_again(checkpoint, tmp_path, monkeypatch, damage):
    """A cached backend "bogus" was blamed on sampler.backend, an option the user never set."""
    import policy.backends as backends

    cache = tmp_path / "window-auto.json"
    monkeypatch.setenv("PARAPOLICY_CACHE", str(cache))
    calls = []
    monkeypatch.setattr(backends, "call_ms", lambda policy, name, rows: calls.append(name) or
                        {"torch": 2.0, "openvino": 1.0}[name])
    pol = policy.load(checkpoint)
    pol.sampler = sampler_preset("ddim5:backend=auto")
    k = backends.choice_key(pol, 1)
    good = {"backend": "torch", "rows": 1, "ms": {"torch": 1.0, "openvino": 2.0}}
    cache.write_text(json.dumps({k: {**good, **damage} if isinstance(damage, dict) else damage}))
    assert pol.backend == "openvino" and calls == ["torch", "openvino"]  # measured (here: made up) again
    assert json.loads(cache.read_text())[k] == {"backend": "openvino", "rows": 1,
                                                "ms": {"torch": 2.0, "openvino": 1.0}}


def test_dp_serve_starts_past_a_cache_file_that_is_a_json_list(checkpoint, tmp_path, monkeypatch):
    """A cache file holding a JSON list stopped dp-serve at start-up with a traceback."""
    import policy.autowindow as aw
    import policy.backends as backends
    from commands import dp, one_line_error
    from test_autowindow import MEASURED

    cache = tmp_path / "window-auto.json"
    monkeypatch.setenv("PARAPOLICY_CACHE", str(cache))
    monkeypatch.setattr(backends, "call_ms", lambda policy, name, rows: {"torch": 1.0, "openvino": 2.0}[name])
    monkeypatch.setattr(aw, "measure", lambda *a, **k: MEASURED)  # the measurements, made instant
    cache.write_text("[1, 2, 3]")
    r = dp("dp-serve", f"checkpoint={checkpoint}", "sampler=paraddpm100", "sampler.steps=20",
           "sampler.backend=auto", "host=no-such-host.invalid", "port=0")
    # past the cache (window and backend measured) to the listening socket, the next thing it does
    one_line_error(r, "dp-serve", "host: cannot listen on 'no-such-host.invalid'")
    assert "window=auto chose 8" in r.stdout
    table = json.loads(cache.read_text())
    assert isinstance(table, dict) and any(json.loads(k).get("backend-auto") for k in table)


def _histories(n: int) -> torch.Tensor:
    """The first `n` closed-loop observation histories shipped with zoo/lift_image (real frames)."""
    return torch.as_tensor(np.load(ZOO / "lift_image" / "histories.npz")["obs"][:n])


def test_the_image_encoder_plans_on_openvino_as_on_torch():
    pol = policy.load(ZOO / "lift_image")
    obs = _histories(3)
    with torch.no_grad():
        ref = pol.condition(obs)
        pol.sampler = sampler_preset("ddim10:backend=openvino")
        for rows in (1, 3):
            ov = pol.condition(obs[:rows])
            assert ((ov - ref[:rows]).abs().max() / ref[:rows].abs().max()).item() <= 1e-5, rows
    assert pol._encoder_runtime is not None  # it ran on the runtime, not on torch
    assert pol.condition(obs[:1]).requires_grad  # with a gradient asked for: torch


def test_an_image_policy_plans_the_same_chunk_on_openvino_and_torch():
    obs = _histories(1)[0].numpy()
    plans = {}
    for backend in ("torch", "openvino"):
        pol = policy.load(ZOO / "lift_image")
        pol.sampler = sampler_preset(f"ddim10:backend={backend}")
        pol.seed(0)
        plans[backend] = pol.plan(obs).actions
    np.testing.assert_allclose(plans["openvino"], plans["torch"], atol=1e-4)


def test_the_runtime_encoder_is_rebuilt_when_its_weights_change():
    pol = policy.load(ZOO / "lift_image")
    pol.sampler = sampler_preset("ddim10:backend=openvino")
    obs = _histories(1)
    with torch.no_grad():
        before = pol.condition(obs)
        for p in pol.encoder.parameters():
            p.mul_(1.01)  # in place, as an optimizer step or load_state_dict would
        after = pol.condition(obs)
        pol.sampler = sampler_preset("ddim10:backend=torch")
        ref = pol.condition(obs)
    assert (after - before).abs().max() > 1e-4
    assert ((after - ref).abs().max() / ref.abs().max()).item() <= 1e-5


@pytest.mark.parametrize("spec", ["paraddpm100:steps=30,window=8", "paraddim15:window=6,anderson=0",
                                  "piadm15", "ddim10", "paraddim15:window=6,capture=pad"])
def test_prepare_compiles_every_call_shape_a_plan_uses(checkpoint, spec, monkeypatch):
    """After `prepare`, no plan (cold or warm) compiles a shape on its first call: a control loop's
    plan never pays OpenVINO's compile, and `call_rows` lists exactly the row counts plans use."""
    from policy.samplers import call_rows

    pol = policy.load(checkpoint)
    pol.sampler = sampler_preset(f"{spec},backend=openvino" if ":" in spec else f"{spec}:backend=openvino")
    pol.prepare()
    net = pol.denoiser._runtime._built[1]
    compiled = set(net.requests)
    seen = set()
    call = type(net).__call__
    monkeypatch.setattr(type(net), "__call__", lambda self, *a: (seen.add(a[0].shape[0]), call(self, *a))[1])
    obs = pol.neutral_obs()[0].numpy()
    for seed in range(4):
        pol.seed(seed)
        for step in range(3):
            pol.plan(obs + 0.05 * step, advance=None if step == 0 else pol.cfg.n_action_steps)
    assert set(net.requests) == compiled
    assert seen and seen <= set(call_rows(pol.sampler, pol.sample_options(),
                                          pol.cfg.schedule.num_train_timesteps))


def test_a_plan_on_a_runtime_holds_torch_to_one_thread_and_gives_the_threads_back(checkpoint, monkeypatch):
    """Inside a plan on OpenVINO torch's own ops run on one thread (its spinning workers would take
    the runtime's cores) while the runtime keeps the caller's; after it, and after a failing plan,
    torch has its threads again."""
    import policy.samplers.solvers as solvers

    pol = policy.load(checkpoint)
    pol.sampler = SamplerConfig(name="ddim", steps=5, backend="openvino")
    torch.set_num_threads(2)
    inside = []
    step_rows = solvers.step_rows
    monkeypatch.setattr("policy.samplers.sequential.step_rows",
                        lambda *a, **k: (inside.append(torch.get_num_threads()), step_rows(*a, **k))[1])
    pol.plan(pol.neutral_obs()[0].numpy())
    assert inside == [1] * 5 and torch.get_num_threads() == 2
    assert pol.denoiser._runtime._built[0][2] == 2  # compiled for the caller's threads
    monkeypatch.setattr("policy.samplers.sequential.step_rows", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        pol.plan(pol.neutral_obs()[0].numpy())
    assert torch.get_num_threads() == 2
    pol.sampler = SamplerConfig(name="ddim", steps=5, backend="torch")
    inside.clear()
    monkeypatch.setattr("policy.samplers.sequential.step_rows",
                        lambda *a, **k: (inside.append(torch.get_num_threads()), step_rows(*a, **k))[1])
    pol.plan(pol.neutral_obs()[0].numpy())
    assert inside == [2] * 5  # torch's own calls keep every thread


def test_a_plan_after_the_weights_changed_runs_the_new_weights(checkpoint):
    """A plan checks the weights once, on its first call: the next plan sees an in-place change."""
    pol = policy.load(checkpoint)
    obs = pol.neutral_obs()
    noise = torch.randn((1, pol.cfg.horizon, pol.action_dim), generator=torch.Generator().manual_seed(0))

    def chunk(backend):
        pol.sampler = SamplerConfig(name="ddim", steps=5, backend=backend)
        return pol.sample(obs, noise=noise)[0]

    before = chunk("openvino")
    with torch.no_grad():
        for p in pol.net.parameters():
            p.mul_(1.02)
    after = chunk("openvino")
    assert (after - before).abs().max() > 1e-4
    assert (after - chunk("torch")).abs().max() <= 1e-4
