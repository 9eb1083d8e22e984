"""DPM-Aligner: learned taus lower their loss; the toggle feeds them to the network (and only
then); a missing aligner names the command that makes it; dp-align writes its evidence."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.errors import UserError
from policy.aligner import AlignSettings, aligner_file, learn, load_taus
from policy.checkpoint import load_policy

from commands import dp
from policy.samplers import SamplerConfig, aligner_choice
from policy.windows import sample_windows
from rollouts.presets import baseline_of, sampler_preset

EXE = Path(sys.executable).with_name("dp-align")


@pytest.fixture
def ckpt(checkpoint, tmp_path):
    """A private copy of the tiny policy's checkpoint (aligner files are written into it)."""
    dst = tmp_path / "ckpt"
    shutil.copytree(checkpoint, dst)
    return dst


def _data(policy) -> str:
    return policy.meta["data"]


def _write_taus(ckpt: Path, solver: str, steps: int, taus: list[float], strategy: str = "sequential") -> None:
    path = aligner_file(ckpt, solver, steps, "trailing")
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = json.loads(path.read_text()) if path.is_file() else {"strategies": {}}
    doc["strategies"][strategy] = {"taus": taus}
    doc["strategy"] = strategy
    path.write_text(json.dumps(doc))


class Recorder(torch.nn.Module):
    """The network, recording the timesteps it is called with."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, x, t, cond):
        self.calls.append(t.detach().clone())
        return self.net(x, t, cond)


class GaussianDenoiser(torch.nn.Module):
    """The exact noise prediction for data x0 ~ N(0, s^2 I), at continuous t (alpha_bar
    interpolated). The tiny trained network's loss is nearly flat in tau (it has seen 20 steps of
    training), so whether learning lowers the loss is asked of a denoiser whose loss has shape."""

    def __init__(self, scheduler, s: float = 0.5):
        super().__init__()
        self.abar, self.s = scheduler.alphas_cumprod.float(), s
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)  # policy.device reads one

    def forward(self, x, t, cond):
        lo = t.clamp(0, len(self.abar) - 1).floor().long().clamp(max=len(self.abar) - 2)
        frac = (t - lo).reshape(-1, 1, 1)
        a = self.abar[lo].reshape(-1, 1, 1) * (1 - frac) + self.abar[lo + 1].reshape(-1, 1, 1) * frac
        return (1 - a).sqrt() * x / (a * self.s**2 + 1 - a)


@pytest.mark.parametrize("strategy", ["sequential", "parallel"])
@pytest.mark.parametrize("solver", ["ddim", "dpmsolver"])
def test_aligned_taus_lower_the_loss_they_were_trained_on(ckpt, strategy, solver):
    policy = load_policy(ckpt)
    policy.net = GaussianDenoiser(policy.scheduler)
    obs, action = sample_windows(policy, _data(policy), "train", 64, 0)
    s = AlignSettings(solver=solver, steps=4, strategy=strategy, batch_size=16, max_iters=60, min_iters=20,
                      window=10, lr=1.0)
    out = learn(policy, obs, action, s, progress=False)
    before, after = np.array(out["loss_before"]), np.array(out["loss_after"])
    assert len(out["taus"]) == 4 and out["timesteps"] == [99.0, 74.0, 49.0, 24.0]
    assert after[:3].sum() < 0.9 * before[:3].sum()  # the aligned steps
    assert out["taus"][3] == 24.0 and after[3] == pytest.approx(before[3])  # the last is left alone
    assert all(0 <= t <= 99 for t in out["taus"])


def test_the_tiny_networks_taus_are_learned_in_range(ckpt):
    policy = load_policy(ckpt)
    obs, action = sample_windows(policy, _data(policy), "train", 32, 0)
    out = learn(policy, obs, action,
                AlignSettings(steps=3, batch_size=8, max_iters=10, min_iters=5, window=3), progress=False)
    assert np.isfinite(out["loss_after"]).all() and all(0 <= t <= 99 for t in out["taus"])
    assert out["taus"][:2] != out["timesteps"][:2] and out["iters"][2] == 0


def test_ddpm_aligner_runs_with_its_step_noise(ckpt):
    policy = load_policy(ckpt)
    obs, action = sample_windows(policy, _data(policy), "train", 32, 0)
    s = AlignSettings(solver="ddpm", steps=3, batch_size=8, max_iters=10, min_iters=5, window=3)
    out = learn(policy, obs, action, s, progress=False)
    assert np.isfinite(out["loss_after"]).all() and len(out["taus"]) == 3


@pytest.mark.parametrize("name", ["ddim", "paraddim", "piadm"])
def test_the_toggle_feeds_the_network_the_aligned_timesteps(ckpt, name):
    taus = [90.5, 70.25, 41.0, 20.0, 3.5]
    _write_taus(ckpt, "ddim", 5, taus)
    policy = load_policy(ckpt)
    rec = Recorder(policy.net)
    policy.net = rec
    extra = ({"window": 3} if name == "paraddim" else {"blocks": 2, "picard_iters": 2} if name == "piadm"
             else {})
    policy.sampler = SamplerConfig(name=name, steps=5, aligner="true", **extra)
    policy.sample(torch.zeros(2, 2, policy.obs_dim), generator=torch.Generator().manual_seed(0))
    seen = torch.cat(rec.calls)
    assert set(np.round(seen.numpy(), 4)) == set(np.round(np.float32(taus), 4))  # each step its own tau
    rec.calls.clear()
    policy.sampler = SamplerConfig(name=name, steps=5, **extra)
    policy.sample(torch.zeros(2, 2, policy.obs_dim), generator=torch.Generator().manual_seed(0))
    assert set(torch.cat(rec.calls).tolist()) == {99.0, 79.0, 59.0, 39.0, 19.0}


@pytest.mark.parametrize("name", ["ddim", "paraddpm", "dpmsolver"])
def test_aligner_off_reproduces_the_plain_sampler_exactly(ckpt, name):
    _write_taus(ckpt, name.removeprefix("para"), 6, [95.0, 80.0, 60.0, 45.0, 22.0, 16.0])
    policy = load_policy(ckpt)
    obs = torch.randn(3, 2, policy.obs_dim, generator=torch.Generator().manual_seed(1))
    outs = {}
    for label, aligner in [("none", None), ("false", "false"), ("on", "true")]:
        policy.sampler = SamplerConfig(name=name, steps=6, aligner=aligner)
        outs[label] = policy.sample(obs, generator=torch.Generator().manual_seed(7))[0]
    assert torch.equal(outs["none"], outs["false"])
    assert not torch.allclose(outs["none"], outs["on"])


def test_parallel_sampler_with_aligner_reproduces_its_aligned_twin_at_tol_0(ckpt):
    _write_taus(ckpt, "ddpm", 12, list(np.linspace(97, 3, 12)))
    policy = load_policy(ckpt)
    obs = torch.randn(2, 2, policy.obs_dim, generator=torch.Generator().manual_seed(3))
    outs = []
    for name, extra in [("ddpm", {}), ("paraddpm", {"window": 5, "tol": 0.0})]:
        policy.sampler = SamplerConfig(name=name, steps=12, aligner="true", **extra)
        outs.append(policy.sample(obs, generator=torch.Generator().manual_seed(5))[0])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)


def test_missing_aligner_names_the_command_to_run(ckpt):
    policy = load_policy(ckpt)
    with pytest.raises(UserError, match=rf"make them with: dp-align checkpoint={ckpt.resolve()} sampler=ddim "
                                        r"steps=7 spacing=trailing$"):
        policy.sampler = SamplerConfig(name="paraddim", steps=7, aligner="true")
    _write_taus(ckpt, "ddim", 7, [90.0] * 7, strategy="sequential")
    with pytest.raises(UserError, match="has no parallel taus .* strategy=parallel$"):
        load_taus(ckpt, "ddim", 7, "trailing", "parallel")
    with pytest.raises(UserError, match="sampler.aligner: 'maybe' is not true, false"):
        policy.sampler = SamplerConfig(name="ddim", steps=7, aligner="maybe")


def test_aligned_preset_spec_and_its_baseline():
    cfg = sampler_preset("paraddim15+aligner:tol=0.05")
    assert (cfg.name, cfg.steps, aligner_choice(cfg), cfg.tol) == ("paraddim", 15, "default", 0.05)
    base = baseline_of(cfg)
    assert (base.name, base.steps, aligner_choice(base)) == ("ddim", 15, "default")
    assert aligner_choice(sampler_preset("ddim5:aligner=parallel")) == "parallel"
    assert aligner_choice(sampler_preset("ddim5:aligner=false")) is None


def test_dp_align_writes_taus_evidence_and_summary(ckpt):
    common = [f"checkpoint={ckpt}", "sampler=ddim", "steps=3", "spacing=uniform", "chunks=48", "batch_size=8",
              "max_iters=12", "min_iters=4", "eval_samples=8", "threads=1", "progress=false"]
    for strategy in ("sequential", "parallel"):
        r = subprocess.run([str(EXE), *common, f"strategy={strategy}"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    d = ckpt / "aligner"
    doc = json.loads((d / "ddim-3-trailing.json").read_text())
    assert doc["strategy"] == "parallel" and set(doc["strategies"]) == {"sequential", "parallel"}
    for key in ("taus", "loss_before_total", "loss_after_total", "data", "time_s"):
        assert key in doc
    seq = doc["strategies"]["sequential"]
    assert len(seq["taus"]) == 3 and len(seq["gap"]) == 3 and len(doc["gap_plain"]) == 3
    assert seq["data"]["chunks"] == 48 and seq["settings"]["strategy"] == "sequential"
    rows = json.loads((d / "summary.json").read_text())
    assert [r["strategy"] for r in rows] == ["sequential", "parallel"]
    for png in ("aligner_gap.png", "ddim-3-trailing-sequential-loss.png",
                "ddim-3-trailing-parallel-loss.png"):
        assert (d / png).read_bytes()[:4] == b"\x89PNG"
    assert "ddim-3-trailing" in r.stdout and "parallel" in r.stdout
    # what dp-align made, the toggle uses: aligner=true takes the strategy learned last
    policy = load_policy(ckpt)
    assert load_taus(ckpt, "ddim", 3, "trailing") == tuple(doc["strategies"]["parallel"]["taus"])
    policy.sampler = SamplerConfig(name="ddim", steps=3, spacing="trailing", aligner="sequential")

    # dp-bench: the aligned variants are rows of their own, each with its aligned twin as baseline
    out = ckpt.parent / "bench"
    r = subprocess.run([str(EXE.with_name("dp-bench")), f"checkpoint={ckpt}", "plans=3", "threads=1",
                        f"out={out}",
                        "warmup=1", "overhead_plans=1", "batch_sizes=[1]",
                        "samplers=[ddim3,ddim3+aligner,'paraddim15+aligner:steps=3,window=3,tol=0']"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    by = {e["name"]: e for e in json.loads((out / "results.json").read_text())}
    assert set(by) == {"ddim3", "ddim3+aligner", "paraddim15+aligner:steps=3,window=3,tol=0"}
    para = by["paraddim15+aligner:steps=3,window=3,tol=0"]
    assert para["baseline"] == "ddim3+aligner" and para["action_max_abs_diff"] < 1e-4
    assert by["ddim3+aligner"]["baseline"] == "ddim3+aligner"


def test_dp_eval_refuses_a_missing_aligner_in_one_line(ckpt, tmp_path):
    r = subprocess.run([str(EXE.with_name("dp-eval")), f"checkpoint={ckpt}", "samplers=[ddim5,ddim5+aligner]",
                        "episodes=1", f"out={tmp_path / 'eval'}"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "no aligned timesteps for ddim-5-trailing" in r.stderr and "make them with: dp-align" in r.stderr
    assert not (tmp_path / "eval" / "episodes.jsonl").exists()


def test_dp_align_bad_input_is_one_line(ckpt):
    r = dp("dp-align", f"checkpoint={ckpt}", "sampler=paraddim")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "dp-align: sampler: 'paraddim' is not a solver" in r.stderr
