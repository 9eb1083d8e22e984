"""How the policy runs its network (`policy/device.py`, `policy/denoiser.py`): device=auto,
16-bit weights, padded rounds for captured calls. CUDA graphs themselves need a GPU: the device
check measures them (`rollouts/devicecheck.py`); here their refusal off CUDA is tested."""

import numpy as np
import pytest
import torch

from commands import dp
from common.errors import UserError
from policy.denoiser import Denoiser
from policy.device import resolve_device
from policy.network import ConditionalUnet1D, UNetConfig
from policy.samplers import SamplerConfig


def test_device_auto_is_the_cpu_without_a_gpu_and_bad_devices_are_one_line():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto") and resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match=r"device: 'gpu0' is not a device \(auto, cpu, cuda, cuda:N\)"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="device: 'cuda', but torch sees no CUDA device here"):
            resolve_device("cuda")


def test_commands_take_device_auto_and_refuse_a_missing_gpu_in_one_line(checkpoint):
    res = dp("dp-bench", f"checkpoint={checkpoint}", "samplers=[ddim5]", "plans=2", "device=auto",
                      "overhead_plans=1", "batch_sizes=[1]")
    assert res.returncode == 0, res.stderr
    if not torch.cuda.is_available():
        res = dp("dp-rollout", f"checkpoint={checkpoint}", "episodes=1", "device=cuda")
        assert res.returncode != 0 and res.stderr.strip().splitlines()[-1].endswith(
            "device: 'cuda', but torch sees no CUDA device here (device=auto uses the CPU)")


def _net():
    torch.manual_seed(0)
    return ConditionalUnet1D(7, 12, UNetConfig(down_dims=[16, 32], step_embed_dim=16, n_groups=4)).eval()


def test_a_16_bit_denoiser_answers_in_float32_close_to_the_network_and_follows_its_weights():
    net = _net()
    x, t, cond = torch.randn(5, 16, 7), torch.tensor([0.0, 10.0, 37.5, 80.0, 99.0]), torch.randn(5, 12)
    with torch.no_grad():
        ref = net(x, t, cond)
        for precision in ("bf16", "fp16"):
            eps = Denoiser(net, precision)(x, t, cond)
            assert eps.dtype == torch.float32 and eps.shape == ref.shape
            err = ((eps - ref).norm() / ref.norm()).item()
            assert 0 < err < (0.03 if precision == "bf16" else 0.005), (precision, err)
        den = Denoiser(net, "bf16")
        before = den(x, t, cond)
        for p in net.parameters():  # as an optimizer step does: in place, so the parameters' versions move
            p.mul_(1.5)
        after = den(x, t, cond)
    assert not torch.allclose(before, after)  # a stale copy would answer as before
    assert ((after - net(x, t, cond)).norm() / after.norm()).item() < 0.03


def test_graph_capture_is_refused_off_cuda_in_one_line(checkpoint):
    from policy import load

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the device check captures graphs")
    with pytest.raises(UserError, match="sampler.capture: graph needs a CUDA device"):
        Denoiser(_net(), capture="graph")
    pol = load(checkpoint)
    with pytest.raises(UserError, match="sampler.capture: graph needs a CUDA device"):
        pol.sampler = SamplerConfig(name="paraddpm", steps=20, capture="graph")
    with pytest.raises(UserError, match="sampler.capture: 'cudagraph' is not one of auto, none, pad, graph"):
        pol.sampler = SamplerConfig(name="ddpm", capture="cudagraph")
    with pytest.raises(UserError, match="sampler.precision: 'int8' is not one of fp32, bf16, fp16"):
        pol.sampler = SamplerConfig(name="ddpm", precision="int8")


def test_a_padded_policy_plans_what_the_eager_one_plans(checkpoint):
    """capture=pad (what graphs need) gives the same plans, rounds and counts as capture=none,
    warm starts included, along one episode's plans."""
    from policy import load

    pol = load(checkpoint)
    rng = np.random.default_rng(3)
    history = [rng.normal(size=(2, pol.obs_dim)).astype(np.float32) for _ in range(4)]
    plans = {}
    for capture in ("none", "pad"):
        pol.sampler = SamplerConfig(name="paraddpm", steps=30, window=30, tol=0.5, floor=1e-2, anderson=4,
                                    warm=True, capture=capture)
        pol.seed(0)
        plans[capture] = [pol.plan(h, advance=None if i == 0 else 8) for i, h in enumerate(history)]
    for a, b in zip(plans["none"], plans["pad"]):
        assert (a.model_evals, a.parallel_iters) == (b.model_evals, b.parallel_iters)
        np.testing.assert_allclose(a.actions, b.actions, atol=1e-4)
