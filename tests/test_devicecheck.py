"""The GPU device check (`rollouts/devicecheck.py`), dry-run on the CPU: it plans on a policy
with no store, no zarr and no simulator (as on the GPU machine), and writes its tables."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from common.errors import UserError
from rollouts.devicecheck import main, samplers
from rollouts.presets import sampler_preset

ROWS = ["ddpm10:capture=none", "paraddpm100:steps=10,window=10,tol=0.1,capture=none",
        "paraddpm100:steps=10,window=10,tol=0.1,capture=pad",
        "paraddpm100:steps=10,window=10,anderson=4,tol=1.0,floor=0.03,warm=true,capture=pad",
        "ddim10:capture=pad,precision=bf16"]


def test_the_check_rows_are_valid_presets_eager_and_captured():
    for device, captured in ((torch.device("cuda"), "graph"), (torch.device("cpu"), "pad")):
        rows = samplers(device)
        configs = [sampler_preset(r) for r in rows]  # each parses and passes the sampler checks
        assert sum(c.capture == "none" for c in configs) == sum(c.capture == captured and not c.precision
                                                                for c in configs) == 12
        assert {c.precision for c in configs} == {None, "bf16"}
        assert any(c.name == "paraddpm" and c.window == 100 and c.floor for c in configs)  # the new rule
        assert any(c.name == "paraddpm" and c.window == 16 and c.tol == 0.1 and not c.anderson
                   for c in configs)
        assert any(c.name == "paraddpm" and c.window == "auto" for c in configs)


def test_cpu_dry_run_needs_no_store_zarr_or_simulator_and_writes_its_tables(checkpoint, tmp_path):
    from policy import load

    main(["prepare", "--checkpoint", str(checkpoint), "--data", load(checkpoint).meta["data"], "--out",
          str(tmp_path / "prep"), "--plans", "6", "--no-wheels"])
    with np.load(tmp_path / "prep" / "obs.npz") as f:
        assert f["obs"].shape[0] == 6 and f["first"][0]
    out = tmp_path / "check"
    blocked = ("import sys\nfor m in ('zarr', 'numcodecs', 'gymnasium', 'mujoco', 'robosuite'): "
               "sys.modules[m] = None\n")
    args = ["run", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "prep" / "obs.npz"),
            "--out", str(out), "--plans", "3", "--warmup", "0", "--overhead-plans", "1",
            "--batch-sizes", "1,2", "--rows", ";".join(ROWS)]
    code = blocked + f"from rollouts.devicecheck import main\nmain({args!r})\n"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    results = {r["name"]: r for r in json.loads((out / "results.json").read_text())}
    assert set(ROWS) <= set(results)
    eager, padded = results[ROWS[1]], results[ROWS[2]]
    # padding changes the shapes, not the rounds or the chain
    assert eager["parallel_iters_mean"] == padded["parallel_iters_mean"]
    assert eager["model_evals_mean"] == padded["model_evals_mean"]
    assert results[ROWS[4]]["baseline"] == "ddim10:capture=pad"  # 16-bit against float32, called the same way
    summary = (out / "summary.md").read_text()
    assert "target >= 5x" in summary and "Batch scaling" in summary and ROWS[3] in summary
    assert json.loads((out / "host_syncs.json").read_text()) == {}  # counted on CUDA only
    for name in ("results.csv", "context.json", "bench.png"):
        assert (out / name).stat().st_size > 0


def test_saved_histories_are_checked(checkpoint, tmp_path):
    from policy import load
    from rollouts.bench import saved_histories

    pol = load(checkpoint)
    bad = tmp_path / "bad.npz"
    np.savez(bad, obs=np.zeros((4, 3, pol.obs_dim), np.float32), first=np.ones(4, bool))
    with pytest.raises(UserError, match=r"data: .*bad.npz: obs \(4, 3, .*\) and first \(4,\) do not fit"):
        saved_histories(pol, str(bad), 2)
    np.savez(bad, x=np.zeros(2))
    with pytest.raises(UserError, match="needs arrays obs and first"):
        saved_histories(pol, str(bad), 2)
    with pytest.raises(UserError, match="no such file"):
        saved_histories(pol, str(tmp_path / "none.npz"), 2)


def test_the_gpu_side_script_parses():
    from pathlib import Path

    script = Path(__file__).parents[1] / "rollouts" / "devicecheck.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
