"""Shipped reference policies (`policy.zoo`, `zoo/<task>`): 16-bit export of a checkpoint, loading
it like a checkpoint, recording its evaluation, and every policy the repository ships."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from common.errors import UserError
import policy
from policy.samplers import SamplerConfig
from policy.zoo import HISTORIES, MAX_MB, WEIGHTS, export, record

from commands import dp

ZOO = Path(__file__).resolve().parent.parent / "zoo"
SHIPPED = sorted(p for p in ZOO.glob("*") if (p / "policy.json").is_file()) if ZOO.is_dir() else []


def test_export_writes_16_bit_weights_that_plan_like_the_checkpoint(checkpoint, tmp_path):
    out = export(checkpoint, tmp_path / "zoo" / "lift", command="dp-train task=lift")
    with safe_open(str(out / WEIGHTS), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert sorted(p.name for p in out.iterdir()) == [HISTORIES, "normalizer.safetensors", "policy.json",
                                                     WEIGHTS]
    with np.load(out / HISTORIES) as f:  # the store's validation episodes, for dp-bench without the store
        assert f["obs"].shape[1:] == (2, policy.load(checkpoint).obs_dim) and f["first"][0]
    meta = json.loads((out / "policy.json").read_text())
    assert meta["zoo"]["weights_dtype"] == "float16" and meta["zoo"]["command"] == "dp-train task=lift"
    assert meta["meta"]["seeds_used"] == [0, 1, 2]  # the tiny policy's three demonstrations
    full, half = policy.load(checkpoint), policy.load(out)
    obs = np.random.default_rng(0).normal(size=(2, full.obs_dim)).astype(np.float32)
    full.seed(0), half.seed(0)
    a, b = full.plan(obs).actions, half.plan(obs).actions
    assert np.abs(a - b).max() < 1e-2 and not np.array_equal(a, b)  # rounded, not copied
    again = export(checkpoint, out)  # a zoo policy is replaced
    assert (again / WEIGHTS).is_file()


def test_export_carries_the_aligner_but_not_its_lock(checkpoint, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint, ckpt)
    (ckpt / "aligner").mkdir()
    (ckpt / "aligner" / "ddim-5-uniform.json").write_text("{}")
    (ckpt / "aligner" / ".lock").write_text('{"command": "dp-align"}')  # what a dp-align run leaves
    out = export(ckpt, tmp_path / "zoo" / "lift")
    assert sorted(p.name for p in (out / "aligner").iterdir()) == ["ddim-5-uniform.json"]


def test_export_refuses_to_replace_what_is_not_a_zoo_policy(checkpoint, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="not a zoo policy"):
        export(checkpoint, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").exists()


def test_evaluation_of_a_zoo_policy_refuses_its_demonstration_seeds_and_is_recorded(checkpoint, tmp_path):
    out = export(checkpoint, tmp_path / "lift")
    meta = json.loads((out / "policy.json").read_text())
    meta["meta"]["data"] = str(tmp_path / "gone.zarr")  # as in a fresh clone: the store is not there
    (out / "policy.json").write_text(json.dumps(meta))
    bad = dp("dp-eval", f"checkpoint={out}", "seed=1", "episodes=1", f"out={tmp_path / 'e'}")
    assert bad.returncode == 2 and "overlap the 1 seeds the policy's training store used" in bad.stderr
    ev = tmp_path / "eval"
    r = dp("dp-eval", f"checkpoint={out}", "samplers=['ddim5:steps=2']", "episodes=1",
           "workers=1", f"out={ev}", "progress=false")
    assert r.returncode == 0, r.stderr
    r = dp("dp-export", f"out={out}", f"measured={ev}")
    assert r.returncode == 0 and "ddim5:steps=2 0% of 1" in r.stdout, r.stderr
    measured = json.loads((out / "policy.json").read_text())["zoo"]["measured"]
    assert measured["seed"] == 100000 and measured["results"][0]["episodes"] == 1
    other = tmp_path / "other"
    shutil.copytree(out, other)
    with pytest.raises(UserError, match="not an evaluation of"):
        record(other, ev)
    cut = tmp_path / "cut"  # the same evaluation with its episodes cut short: no shipped figure
    shutil.copytree(ev, cut)
    run = json.loads((cut / "run.json").read_text())
    (cut / "run.json").write_text(json.dumps({**run, "horizon": 40}))
    with pytest.raises(UserError, match="cut at horizon=40"):
        record(out, cut)


@pytest.mark.parametrize("zoo", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_policy_loads_plans_and_says_what_it_measured(zoo):
    size = sum(p.stat().st_size for p in zoo.rglob("*") if p.is_file()) / 2**20
    assert size <= MAX_MB
    pol = policy.load(zoo)
    pol.seed(0)
    r = pol.plan(np.zeros((pol.cfg.n_obs_steps, pol.obs_dim), np.float32))
    assert r.actions.shape == (pol.cfg.n_action_steps, pol.action_dim) and np.isfinite(r.actions).all()
    info = json.loads((zoo / "policy.json").read_text())["zoo"]
    assert info["weights_dtype"] == "float16" and info["command"]
    suffix = ("_image" if pol.obs_config.image else "") + ("_mh" if pol.meta.get("demos") == "mh" else "")
    assert info["measured"]["results"] and zoo.name == pol.meta["task"] + suffix
    for chain in sorted((zoo / "aligner").glob("ddim-*-trailing.json")):  # shipped DPM-Aligner timesteps
        steps = int(chain.stem.split("-")[1])
        pol.sampler = SamplerConfig.parse(f"ddim{steps}+aligner")
        pol.seed(0)
        aligned = pol.plan(np.zeros((pol.cfg.n_obs_steps, pol.obs_dim), np.float32)).actions
        pol.sampler = SamplerConfig.parse(f"ddim{steps}")
        pol.seed(0)
        plain = pol.plan(np.zeros((pol.cfg.n_obs_steps, pol.obs_dim), np.float32)).actions
        assert np.isfinite(aligned).all() and not np.allclose(aligned, plain)  # its timesteps are used
