"""dp-eval and dp-report: short real evaluations of a tiny policy in the simulator."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.errors import UserError
from rollouts.evaluate import EvalConfig, SamplerOptions, evaluate, read_log, sampler_specs
from rollouts.report import pareto_front, read_rows
from rollouts.stats import wilson

from commands import dp

BIN = Path(sys.executable).parent
FAST = ["ddim5:steps=2", "paraddim15:steps=2,window=2"]
# Episodes of 40 control steps, not lift's 400: a policy of 20 training steps lifts nothing in either,
# and a test's episode costs a tenth as much (dp-eval's `horizon`).
SHORT = "horizon=40"


def samplers(*specs):
    return "samplers=[" + ",".join(f"'{s}'" for s in specs) + "]"  # quoted: Hydra's grammar reserves = and :


def run(cmd, **kw):
    return subprocess.run([str(BIN / cmd[0]), *cmd[1:]], capture_output=True, text=True, **kw)


def test_short_evaluation_writes_every_report_file(checkpoint, tmp_path):
    out = tmp_path / "eval"
    r = run(["dp-eval", f"checkpoint={checkpoint}", samplers(*FAST), "episodes=1",
             "workers=1", "videos=1", SHORT, f"out={out}"])
    assert r.returncode == 0, r.stderr
    results = read_rows(out / "results.json")
    assert [e["sampler"] for e in results] == FAST
    for e in results:
        assert e["episodes"] == 1 and e["success_rate"] == 0.0  # 20 training steps lift nothing
        lo, hi = e["success_ci95"]
        assert lo == 0.0 and 0.7 < hi < 0.85  # Wilson's upper bound for 0 of 1
        assert set(e["latency_ms"]) == {"p50", "p95", "mean"} and e["latency_ms"]["p50"] > 0
        assert e["model_evals_per_plan"] > 0 and e["parallel_iters_per_plan"] > 0 and "reward_mean" in e
        assert e["threads"] == 1 and e["workers"] == 1 and e["errors"] == []
        assert e["backend"] in ("torch", "openvino")  # backend=auto, resolved by measurement
    assert results[0]["model_evals_per_plan"] == results[0]["parallel_iters_per_plan"] == 2
    episodes = (out / "episodes.csv").read_text().splitlines()
    assert episodes[0].startswith("sampler,seed,episode,success") and len(episodes) == 3
    plans = (out / "plans.csv").read_text().splitlines()
    assert plans[0] == "sampler,seed,step,latency_ms,model_evals,parallel_iters,converged,encode_ms"
    assert len(plans) == 1 + 2 * 5  # 40 steps (horizon=40, not lift's 400), a plan every 8
    assert json.loads((out / "run.json").read_text())["horizon"] == 40
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    videos = sorted(p.name for p in (out / "videos").iterdir())
    assert videos == ["ddim5_steps_2-100000.mp4", "paraddim15_steps_2_window_2-100000.mp4"]
    import cv2

    cap = cv2.VideoCapture(str(out / "videos" / videos[0]))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 41
    assert "paraddim15:steps=2,window=2" in r.stdout and "95% CI" in r.stdout and "backend" in r.stdout


def test_interrupted_run_keeps_finished_episodes_and_continues(checkpoint, tmp_path):
    out = tmp_path / "eval"
    args = ["dp-eval", f"checkpoint={checkpoint}", samplers(FAST[0]), "episodes=5", "workers=1",
            "horizon=100", f"out={out}"]
    proc = subprocess.Popen([str(BIN / args[0]), *args[1:]], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True,
                            # a shell's background job inherits SIGINT ignored; Ctrl-C is what we test
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    log = out / "episodes.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 1):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        # Once in a loaded full run a first Ctrl-C went unanswered (the run finished, exit 0): press it
        # again, as a user would; a dp-eval that answers none still fails here
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted: the finished episodes are in" in err
    first = log.read_text().splitlines()
    assert 1 <= len(first) < 5
    r = run(args)
    assert r.returncode == 0, r.stderr
    assert f"continuing {out}: {len(first)} episodes done, {5 - len(first)} to run" in r.stderr
    lines = log.read_text().splitlines()
    assert lines[: len(first)] == first and len(lines) == 5  # nothing redone
    assert sorted(json.loads(x)["seed"] for x in lines) == list(range(100000, 100005))


def test_a_cut_log_line_is_ignored_and_that_episode_rerun(checkpoint, tmp_path):
    out = tmp_path / "eval"
    cfg = EvalConfig(checkpoint=str(checkpoint), samplers=[FAST[0]], episodes=2, workers=1, out=str(out),
                     progress=False, horizon=40)
    evaluate(cfg)
    lines = (out / "episodes.jsonl").read_text().splitlines()
    (out / "episodes.jsonl").write_text(lines[0] + "\n" + lines[1][:40])  # a kill mid-write
    assert len(read_log(out / "episodes.jsonl")) == 1
    evaluate(cfg)
    again = read_log(out / "episodes.jsonl")
    assert [r["seed"] for r in again] == [100000, 100001] and json.dumps(again[0]) == lines[0]
    assert [r["length"] for r in again] == [40, 40]  # horizon=40: truncated there
    cfg.horizon = None  # the task's 400: not the same evaluation
    with pytest.raises(UserError, match="holds an evaluation with horizon=40, not None"):
        evaluate(cfg)


# A full disk (simulated by a file-size limit): an episode's log line is 7 kB, pareto.png 30 kB.
@pytest.mark.parametrize("limit, file", [(2_000, "episodes.jsonl"), (20_000, "pareto.png")])
def test_a_full_disk_is_one_line_naming_the_file_and_leaves_whole_lines_only(checkpoint, tmp_path, limit,
                                                                              file):
    from commands import file_size_limit, one_line_error

    out = tmp_path / "eval"
    with file_size_limit(limit):
        r = dp("dp-eval", f"checkpoint={checkpoint}", samplers(FAST[0]), "episodes=1", "workers=1",
               "progress=false", f"out={out}")
    one_line_error(r, "dp-eval", f"{out / file}: File too large (the disk is full or a file-size limit")
    log = (out / "episodes.jsonl").read_text()
    assert log.count("\n") == len(read_log(out / "episodes.jsonl")) and (log == "" or log.endswith("\n"))
    assert not [p for p in out.iterdir() if ".tmp" in p.name] and not (out / "pareto.png").exists()


def test_crashing_episode_is_recorded_with_its_reason(checkpoint, tmp_path, monkeypatch):
    """The sampler is made to return a NaN chunk for one seed (the real way a diverged policy
    crashes an episode); `plan` refuses it, and everything else is real."""
    from policy.diffusion import DiffusionPolicy

    real_sample, real_seed = DiffusionPolicy.sample, DiffusionPolicy.seed

    def seed(self, s):
        self._episode_seed = s
        return real_seed(self, s)

    def sample(self, obs, *args, **kwargs):
        chunk, result = real_sample(self, obs, *args, **kwargs)
        if getattr(self, "_episode_seed", None) == 100001:
            chunk[:] = float("nan")
        return chunk, result

    monkeypatch.setattr(DiffusionPolicy, "seed", seed)
    monkeypatch.setattr(DiffusionPolicy, "sample", sample)
    out = tmp_path / "eval"
    evaluate(EvalConfig(checkpoint=str(checkpoint), samplers=[FAST[0]], episodes=2, workers=1, out=str(out),
                        progress=False))
    results = read_rows(out / "results.json")
    assert results[0]["episodes"] == 2
    assert results[0]["errors"] == [{"seed": 100001, "error": "non-finite action at step 0"}]
    assert "non-finite action at step 0" in (out / "episodes.csv").read_text()


def external_policy(checkpoint, dest: Path) -> Path:
    """A copy of the tiny policy that says it was trained on an imported dataset (task=external)."""
    import shutil

    shutil.copytree(checkpoint, dest)
    meta = json.loads((dest / "policy.json").read_text())
    features = {"features": {}, "obs": None, "action": "action", "fps": 20}
    meta["meta"].update(task="external", features=features)
    (dest / "policy.json").write_text(json.dumps(meta))
    return dest


def test_dp_eval_refuses_a_policy_of_an_imported_dataset_before_writing(checkpoint, tmp_path):
    out = tmp_path / "eval"
    r = dp("dp-eval", f"checkpoint={external_policy(checkpoint, tmp_path / 'ext')}", samplers(FAST[0]),
           "episodes=1", "workers=1", f"out={out}")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert "trained on an imported dataset (task=external)" in r.stderr and "dp-serve" in r.stderr
    assert not out.exists()


def test_seeds_of_the_demonstrations_are_refused(checkpoint, tmp_path):
    r = dp("dp-eval", f"checkpoint={checkpoint}", "seed=1", "episodes=2", f"out={tmp_path}")
    assert r.returncode == 2
    assert r.stderr.strip().startswith("dp-eval: seed: evaluation seeds 1.. overlap the 2 seeds")


def test_options_apply_where_taken_and_are_refused_where_not():
    specs = sampler_specs(["ddpm100", "paraddpm100"], {"tol": 0.05, "window": None})
    assert list(specs) == ["ddpm100", "paraddpm100:tol=0.05"] and specs["paraddpm100:tol=0.05"].tol == 0.05
    with pytest.raises(UserError, match=r"options.blocks: taken by none of the samplers"):
        sampler_specs(["ddpm100"], {"blocks": 2})
    assert "tol" in {f for f in SamplerOptions.__dataclass_fields__}


def test_every_command_plans_on_auto_unless_the_spec_or_an_option_names_a_backend():
    """What dp-eval times is what dp-serve runs: the same default, and a label that names a
    backend only where the user did."""
    from policy.samplers.spec import on_command_backend
    from rollouts.serve import ServeConfig

    specs = sampler_specs(["ddim10", "ddim10:backend=torch"], {})
    assert {k: v.backend for k, v in specs.items()} == {"ddim10": "auto", "ddim10:backend=torch": "torch"}
    forced = sampler_specs(["ddim10"], {"backend": "torch"})
    assert {k: v.backend for k, v in forced.items()} == {"ddim10:backend=torch": "torch"}
    assert on_command_backend(ServeConfig().sampler).backend == "auto"
    assert specs["ddim10"].baseline().label(100) == "ddim10"  # a twin's label does not spell the default


def test_multirun_sweep_and_report_merge(checkpoint, tmp_path):
    out = tmp_path / "sweep"
    r = run(["dp-eval", "-m", f"checkpoint={checkpoint}", "samplers=[paraddim15]", "options.steps=2",
             "options.window=1,2", "episodes=1", "workers=1", SHORT, f"out={out}/w" + "${options.window}"],
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for w in (1, 2):
        (entry,) = read_rows(out / f"w{w}" / "results.json")
        assert entry["sampler"] == f"paraddim15:steps=2,window={w}"
    assert not (tmp_path / "multirun").exists() and not Path("multirun").exists()
    assert not (tmp_path / "multirun.yaml").exists()  # the sweep writes nothing where it runs
    merged = run(["dp-report", f"inputs=[{out}/w1,{out}/w2]", f"out={tmp_path}/report"])
    assert merged.returncode == 0, merged.stderr
    entries = read_rows(tmp_path / "report" / "results.json")
    assert [e["sampler"] for e in entries] == ["paraddim15:steps=2,window=1", "paraddim15:steps=2,window=2"]
    assert (tmp_path / "report" / "pareto.png").exists() and "window=2" in merged.stdout
    bad = dp("dp-report", f"inputs=[{tmp_path}/nothing]")
    assert bad.returncode == 2 and "no such file" in bad.stderr


def test_wilson_interval_and_pareto_front():
    lo, hi = wilson(50, 50)
    assert hi == 1.0 and 0.92 < lo < 0.93
    lo, hi = wilson(0, 20)
    assert lo == 0.0 and 0.16 < hi < 0.17
    s = [{"sampler": n, "success_rate": p, "latency_ms": {"p50": l}} for n, p, l in
         [("a", 0.9, 300), ("b", 0.8, 50), ("c", 0.7, 60), ("d", 0.95, 400), ("e", 0.8, 100)]]
    assert [x["sampler"] for x in pareto_front(s)] == ["b", "a", "d"]


def test_quickstart_runs_the_whole_path_and_reuses_it(tmp_path):
    out = tmp_path / "qs"
    args = ["dp-quickstart", "n_demos=2", "steps=4", "episodes=1", "samplers=['ddim5:steps=2']", "workers=1",
            f"out={out}"]
    r = run(args)
    assert r.returncode == 0, r.stderr
    assert "[1/3] collecting 2 scripted lift demonstrations" in r.stdout
    assert "[3/3] evaluating ddim5:steps=2 on 1 episodes each" in r.stdout and "min left in all" in r.stdout
    (entry,) = read_rows(out / "eval" / "results.json")
    # on the fastest backend here (every command's default), which the row names
    assert entry["sampler"] == "ddim5:steps=2" and entry["episodes"] == 1
    assert entry["backend"] in ("torch", "openvino") and entry["backend"] in r.stdout
    assert (out / "eval" / "pareto.png").exists() and (out / "train" / "checkpoints" / "latest").exists()
    assert "deadline 350 ms: use ddim5:steps=2" in r.stdout  # 20 Hz, 15 actions, a plan every 8
    again = run(args)
    assert again.returncode == 0, again.stderr
    assert ("reusing the store already there" in again.stdout
            and "reusing" in again.stdout.split("[2/3] done")[0])
    assert "continuing" in again.stderr and "0 to run" in again.stderr


def test_a_sampler_whose_episodes_all_crashed_still_gets_a_report(tmp_path):
    """No plans, so no latency: the table and files are written, and the plot leaves it out."""
    from rollouts.report import summarize, table, write_report

    crashed = [{"sampler": "a", "seed": s, "success": False, "max_reward": 0.0, "return_": 0.0, "length": 0,
                "plans": [], "error": "simulator error at step 0"} for s in (1, 2)]
    summary = summarize(crashed, ["a"])
    write_report(tmp_path, summary)
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert summary[0]["plans"] == 0 and len(summary[0]["errors"]) == 2 and "a" in table(summary)


def test_sequential_stopping_runs_blocks_and_reports_each_decision_and_its_episodes(checkpoint, tmp_path):
    out = tmp_path / "eval"
    r = run(["dp-eval", f"checkpoint={checkpoint}", samplers(*FAST), "episodes=2", "block=1",
             "stop=sequential", "workers=1", SHORT, f"out={out}"])
    assert r.returncode == 0, r.stderr
    rows = {row["sampler"]: row for row in read_rows(out / "results.json")}
    ref, other = rows[FAST[0]], rows[FAST[1]]
    assert ref["sequential"] == {"decision": "reference", "episodes": 2}
    # both fail every episode: nothing to tell them apart, decided only when the seeds run out
    assert other["sequential"]["decision"] == "no difference" and other["sequential"]["episodes"] == 2
    assert other["sequential"]["discordant"] == 0 and other["episodes"] == 2
    assert "sequential: 4 episodes of the 4 a fixed-size run takes" in r.stdout
    assert len(read_log(out / "episodes.jsonl")) == 4
    bad = run(["dp-eval", f"checkpoint={checkpoint}", "stop=early", f"out={tmp_path}/x"])
    assert bad.returncode == 2 and "stop: 'early' is not one of fixed, sequential" in bad.stderr
