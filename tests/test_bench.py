"""dp-bench on a small trained policy: interleaved sampler runs, baselines, files on disk."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import UserError
from policy.samplers import SamplerConfig
from rollouts.presets import baseline_of, known_presets, sampler_preset

from commands import dp

EXE = Path(sys.executable).with_name("dp-bench")


def test_presets_load_with_overrides_and_name_their_baseline():
    assert {"ddpm100", "paraddpm100", "ddim15", "paraddim15", "dpmsolver15", "paradpmsolver15",
            "piadm15"} <= set(known_presets())
    cfg = sampler_preset("paraddpm100:window=8,tol=0.05")
    assert (cfg.name, cfg.steps, cfg.window, cfg.tol) == ("paraddpm", 100, 8, 0.05)
    assert baseline_of(cfg) == SamplerConfig(name="ddpm", steps=100)
    assert baseline_of(sampler_preset("piadm15")) == SamplerConfig(name="ddim", steps=15)
    with pytest.raises(UserError, match="samplers: unknown preset 'nope'"):
        sampler_preset("nope")
    with pytest.raises(UserError, match="sampler.tol: not an option of ddim"):
        sampler_preset("ddim15:tol=0.1")
    with pytest.raises(UserError, match="samplers: 'ddim15:wndow=3'"):
        sampler_preset("ddim15:wndow=3")


def test_dp_bench_writes_results_table_and_plot(checkpoint, tmp_path):
    out = tmp_path / "bench"
    r = subprocess.run([str(EXE), f"checkpoint={checkpoint}", "plans=4", "threads=1",
                        f"out={out}", "warmup=1", "overhead_plans=2", "batch_sizes=[1,4]",
                        "samplers=[ddim5,'paraddim15:steps=5,window=5,tol=0',piadm15]"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    results = json.loads((out / "results.json").read_text())
    by = {e["name"]: e for e in results}
    # the asked-for samplers, then the baseline piadm15 needed (ddim15), added by the bench
    assert list(by) == ["ddim5", "paraddim15:steps=5,window=5,tol=0", "piadm15", "ddim15"]
    for e in results:
        assert {"name", "latency_ms_p50", "latency_ms_p90", "model_evals_mean",
                "parallel_iters_mean", "speedup", "baseline"} <= set(e)
        assert e["latency_ms_p90"] >= e["latency_ms_p50"] > 0
    par = by["paraddim15:steps=5,window=5,tol=0"]
    assert par["baseline"] == "ddim5" and par["action_max_abs_diff"] <= 1e-5  # tol 0: the sequential result
    assert (by["ddim5"]["speedup"] == by["ddim5"]["speedup_bound"] == 1.0
            and by["ddim5"]["model_evals_mean"] == 5)
    assert by["piadm15"]["baseline"] == "ddim15" and by["piadm15"]["parallel_iters_mean"] == 9
    assert not by["ddim15"]["requested"]
    context = json.loads((out / "context.json").read_text())
    assert ([b["batch"] for b in context["batch_scaling"]] == [1, 4]
            and context["batch_scaling"][0]["ratio"] == 1.0)
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "results.csv").read_text().count("\n") == 5
    assert "paraddim15:steps=5,window=5,tol=0" in r.stdout and "batch scaling" in r.stdout


def test_dp_bench_bad_sampler_is_one_line(checkpoint, tmp_path):
    r = dp("dp-bench", f"checkpoint={checkpoint}", "samplers=[ddim15,fast9]", f"out={tmp_path}")
    assert r.returncode == 2 and r.stderr.strip().startswith("dp-bench: samplers: unknown preset 'fast9'")


def test_dp_bench_checks_that_out_can_be_written_before_timing(checkpoint, tmp_path, monkeypatch):
    from rollouts import bench

    def prepare(self, obs):
        raise AssertionError("timed before out= was checked")

    monkeypatch.setattr(bench.Trials, "prepare", prepare)
    (tmp_path / "file").write_text("not a folder")
    r = dp("dp-bench", f"checkpoint={checkpoint}", "samplers=[ddim2]", f"out={tmp_path / 'file' / 'bench'}")
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip() == (f"dp-bench: out: {tmp_path / 'file'}: not a folder, so nothing can be "
                                "written under it; choose another out=")


def test_dp_report_given_a_dp_bench_folder_says_so_in_one_line(checkpoint, tmp_path):
    out = tmp_path / "bench"
    r = dp("dp-bench", f"checkpoint={checkpoint}", "samplers=[ddim2]", "plans=2", "warmup=0",
           "overhead_plans=1", "batch_sizes=[1]", "threads=1", f"out={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    r = dp("dp-report", f"inputs=[{out}]", f"out={tmp_path / 'report'}")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert "results.json: a dp-bench results.json" in r.stderr
    assert "dp-report merges dp-eval folders" in r.stderr
    assert not (tmp_path / "report").exists()
