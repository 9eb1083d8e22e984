"""Probes of the newer commands' options (issue 30, items 8, 9, 10 and 15's device), kept as tests:
every numeric option is checked finite and in range at start-up, in one place per part, and
refused in one line naming it before anything is written. Item numbers refer to the issue."""

import json
import time

import pytest

from common.errors import UserError
from policy.samplers import SamplerConfig, resolve
from rollouts.realtime import LoopConfig, run_loop

from commands import dp
from rollouts.report import read_rows

NAN, INF = float("nan"), float("inf")


def one_line_error(r, command: str, *fragments: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout[-1000:], r.stderr[-2000:])
    lines = [x for x in r.stderr.splitlines() if x.startswith(f"{command}: ")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    for f in fragments:
        assert f in lines[0], lines[0]


# --- 8: sampler options: finite and in range, in SamplerConfig's one check ----------------------

@pytest.mark.parametrize("option, value, says", [
    ("tol", NAN, "not a finite number"), ("tol", INF, "not a finite number"), ("tol", -INF, "not a finite"),
    ("tol", 1e300, "must be <= 10"), ("tol", -0.1, "must be >= 0"), ("tol", "0.1", "is not a number"),
    ("floor", NAN, "not a finite number"), ("floor", INF, "not a finite number"),
    ("floor", 2.0, "must be <= 1"),
    ("anderson", 10**9, "must be <= 1000"), ("anderson", 2.5, "is not an integer"),
    ("window", 2.5, "is not an integer"), ("max_iters", True, "is not an integer"),
    ("max_iters", 0, "at least 1"),
])
def test_a_sampler_option_not_finite_or_out_of_range_is_refused_naming_it(option, value, says):
    with pytest.raises(UserError, match=rf"^sampler\.{option}: .*{says}"):
        resolve(SamplerConfig(name="paraddpm", steps=100, **{option: value}))


def test_sampler_options_in_range_still_resolve():
    _, options = resolve(SamplerConfig(name="paraddpm", steps=100, window="auto", tol=10.0, floor=1.0,
                                       anderson=4))
    assert options["tol"] == 10.0 and options["window"] == "auto"
    # tol 0: the sequential chain
    _, options = resolve(SamplerConfig(name="paraddpm", steps=100, tol=0, floor=0))
    assert options["tol"] == 0


@pytest.mark.parametrize("args", [["samplers=['paraddpm100:tol=nan']"], ["samplers=['paraddpm100:tol=inf']"],
                                  ["samplers=[paraddpm100]", "options.tol=nan"],
                                  ["samplers=[paraddpm100]", "options.floor=inf"]])
def test_dp_eval_refuses_a_non_finite_sampler_option_before_writing(checkpoint, tmp_path, args):
    out = tmp_path / "eval"
    r = dp("dp-eval", f"checkpoint={checkpoint}", *args, "episodes=1", "workers=1", "progress=false",
           f"out={out}")
    option = "floor" if "floor" in args[-1] else "tol"
    one_line_error(r, "dp-eval", f"sampler.{option}:", "not a finite number")
    assert not out.exists()


def test_dp_rollout_refuses_sampler_tol_nan(checkpoint, tmp_path):
    r = dp("dp-rollout", f"checkpoint={checkpoint}", "sampler=paraddpm100", "sampler.tol=nan", "episodes=1")
    one_line_error(r, "dp-rollout", "sampler.tol:", "not a finite number")


# --- 9: ray_address: host:port checked, an unreachable head refused in seconds ------------------

@pytest.mark.parametrize("address, says", [
    ("127.0.0.1:99999", "port 99999"), ("127.0.0.1:0", "port 0"), ("HEAD", "is not host:port"),
    (":6379", "is not host:port"), ("head:abc", "is not host:port"), ("head:", "is not host:port"),
])
def test_a_ray_address_that_is_not_host_and_port_is_refused(address, says):
    from rollouts.cluster import parse_address

    with pytest.raises(UserError, match=rf"^ray_address: .*{says}"):
        parse_address(address)


def test_ray_addresses_parse():
    from rollouts.cluster import parse_address

    assert parse_address("10.0.0.2:6379") == ("10.0.0.2", 6379)
    assert parse_address("ray://head.example:10001") == ("head.example", 10001)
    assert parse_address("[::1]:6379") == ("::1", 6379)


@pytest.mark.parametrize("address, says", [("127.0.0.1:1", "nothing listens at 127.0.0.1:1"),
                                           ("127.0.0.1:99999", "port 99999")])
def test_dp_eval_refuses_an_unreachable_ray_head_in_seconds_before_writing(tmp_path, address, says):
    """Port 1 of this machine: nothing listens (Ray's own join retried it for 829 s). Ray need
    not be running, nor installed: the address is checked first."""
    out = tmp_path / "eval"
    start = time.monotonic()
    r = dp("dp-eval", f"checkpoint={tmp_path / 'never-read'}", "launcher=ray", f"ray_address={address}",
           "episodes=1", "progress=false", f"out={out}")
    one_line_error(r, "dp-eval", "ray_address:", says)
    assert time.monotonic() - start < 30
    assert not out.exists()


def test_a_silent_ray_head_is_refused_within_the_probe_timeout(monkeypatch):
    """A host that drops packets (no refusal): the probe's timeout bounds the wait."""
    import socket

    from rollouts import cluster

    waited = []

    def silent(address, timeout=None):
        waited.append(timeout)
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket, "create_connection", silent)
    with pytest.raises(UserError,
                       match=r"^ray_address: cannot join .*no answer from 10.9.9.9:6379 within 5 s"):
        cluster.check_address("10.9.9.9:6379")
    assert waited == [cluster.PROBE_TIMEOUT_S] and cluster.PROBE_TIMEOUT_S <= 10


# --- 10: the real-time loop's settings: finite and in range, checked once ------------------------

@pytest.mark.parametrize("key, value, says", [
    ("rate_hz", NAN, "not a finite number"), ("rate_hz", INF, "not a finite number"),
    ("rate_hz", 1e9, "must be <= 1000"), ("rate_hz", 0.0, "must be positive"), ("rate_hz", -20.0, "positive"),
    ("extra_delay_ms", NAN, "not a finite number"), ("extra_delay_ms", INF, "not a finite number"),
    ("extra_delay_ms", 1e12, "must be <= 60000"), ("extra_delay_ms", -1.0, "must be >= 0"),
    ("merge_alpha", NAN, "not a finite number"), ("act_m", NAN, "not a finite number"),
    ("act_m", -1.0, "must be >= 0"), ("replan_every", 0, "at least 1"), ("n_actions", 2.5, "not an integer"),
])
def test_a_loop_setting_not_finite_or_out_of_range_is_refused_naming_it(key, value, says):
    with pytest.raises(UserError, match=rf"^loop\.{key}: .*{says}"):
        LoopConfig(**{key: value}).check()


def test_loop_settings_in_range_pass():
    LoopConfig(rate_hz=1000.0, extra_delay_ms=300.0, merge="act", act_m=0.0, replan_every=1,
               n_actions=15).check()


def test_run_loop_refuses_a_bad_setting_before_it_plans():
    from test_realtime import CountingRobot, SleepyPlanner

    planner = SleepyPlanner(0.0)
    with pytest.raises(UserError, match=r"^loop\.extra_delay_ms: nan"):
        run_loop(CountingRobot(0.02), planner, LoopConfig(extra_delay_ms=NAN), max_steps=5)
    assert planner.count == 0


@pytest.mark.parametrize("setting, key", [("loop.rate_hz=nan", "loop.rate_hz"),
                                          ("loop.rate_hz=1e9", "loop.rate_hz"),
                                          ("loop.extra_delay_ms=nan", "loop.extra_delay_ms")])
def test_dp_eval_realtime_refuses_a_bad_loop_setting_before_writing(checkpoint, tmp_path, setting, key):
    out = tmp_path / "eval"
    r = dp("dp-eval", f"checkpoint={checkpoint}", "samplers=[ddim10]", "realtime=true", setting, "episodes=1",
           "progress=false", f"out={out}")
    one_line_error(r, "dp-eval", f"{key}:")
    assert not out.exists()


# --- 15: dp-eval's device: checked before anything is written, recorded as used ------------------

def test_dp_eval_refuses_a_device_torch_cannot_reach_before_writing(checkpoint, tmp_path):
    import torch

    out = tmp_path / "eval"
    r = dp("dp-eval", f"checkpoint={checkpoint}", "samplers=[ddim10]",
           f"device=cuda:{torch.cuda.device_count() + 7}", "episodes=1", "workers=1", "progress=false",
           f"out={out}")
    one_line_error(r, "dp-eval", "device:")
    assert not out.exists()


def test_dp_eval_records_the_device_its_workers_were_given(checkpoint, tmp_path):
    from rollouts import worker

    out = tmp_path / "eval"
    r = dp("dp-eval", f"checkpoint={checkpoint}", "samplers=['ddim5:steps=2']", "device=auto", "episodes=1",
           "workers=1", "progress=false", f"out={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    used = worker.state.device  # workers=1 runs the episodes in this process
    assert used != "auto" and json.loads((out / "run.json").read_text())["device"] == used
    assert read_rows(out / "results.json")[0]["device"] == used


# --- the other commands' numbers (round 4): checked once, in the command's typed config, before
# the policy loads and before anything is written -------------------------------------------------

@pytest.mark.parametrize("setting, says", [
    ("threads=0", "threads: 0 must be at least 1"),
    ("batch_sizes=[-4]", "batch_sizes[0]: -4 must be at least 1"),
    ("batch_sizes=[1000000]", "batch_sizes[0]: 1000000 must be <= 10000"),
    ("warmup=-1", "warmup: -1 must be >= 0"),
    ("time_limit_s=nan", "time_limit_s: nan is not a finite number"), ("time_limit_s=0", "must be positive"),
    ("plans=0", "plans: 0 must be at least 1"), ("overhead_plans=0", "overhead_plans: 0 must be at least 1"),
])
def test_dp_bench_refuses_a_bad_number_before_loading_the_policy(tmp_path, setting, says):
    out = tmp_path / "bench"
    r = dp("dp-bench", f"checkpoint={tmp_path / 'never-read'}", setting, f"out={out}")
    one_line_error(r, "dp-bench", says)
    assert not out.exists()


@pytest.mark.parametrize("setting, says", [
    ("threads=0", "threads: 0 must be at least 1"), ("lr=nan", "lr: nan is not a finite number"),
    ("lr=0", "lr: 0.0 must be positive"), ("tol=nan", "tol: nan is not a finite number"),
    ("tol=-1", "tol: -1.0 must be >= 0"), ("min_iters=400", "min_iters: 400 is above max_iters 300"),
    ("seed=-1", "seed: -1 must be >= 0"),
])
def test_dp_align_refuses_a_bad_number_before_loading_the_policy(tmp_path, setting, says):
    r = dp("dp-align", f"checkpoint={tmp_path / 'never-read'}", setting)
    one_line_error(r, "dp-align", says)


@pytest.mark.parametrize("setting, says", [("workers=-1", "workers: -1 must be >= 0"),
                                           ("seed=-1", "seed: -1 must be >= 0"),
                                           ("n_demos=0", "n_demos: 0 must be at least 1"),
                                           ("max_attempts=0", "max_attempts: 0 must be at least 1")])
def test_dp_collect_refuses_a_bad_number_before_starting_workers(tmp_path, setting, says):
    out = tmp_path / "demo.zarr"
    r = dp("dp-collect", setting, f"out={out}")
    one_line_error(r, "dp-collect", says)
    assert not out.exists()


@pytest.mark.parametrize("setting, says", [
    ("episodes=0", "episodes: 0 must be at least 1"), ("steps=0", "steps: 0 must be at least 1"),
    ("samplers=[bogus]", "samplers: unknown preset 'bogus'"), ("samplers=[]", "samplers: empty list"),
    ("samplers=['paraddpm100:tol=nan']", "sampler.tol: nan is not a finite number"),
    ("samplers=[ddim10+aligner]", "uses DPM-Aligner timesteps, which the quick start does not learn"),
    ("workers=0", "workers: 0 must be at least 1"),
])
def test_dp_quickstart_checks_every_stage_before_collecting(tmp_path, monkeypatch, setting, says):
    """The evaluation's settings are refused at start-up, not after collecting and training."""
    import envs.collect

    def collect(*args, **kwargs):
        raise AssertionError("collected before the settings were checked")

    monkeypatch.setattr(envs.collect, "collect", collect)
    out = tmp_path / "quickstart"
    r = dp("dp-quickstart", setting, f"out={out}")
    one_line_error(r, "dp-quickstart", says)
    assert not out.exists()


def test_a_path_hydra_cannot_read_unquoted_says_how_to_quote_it(tmp_path):
    """Hydra's override grammar takes no non-ASCII letter unquoted (a LexerNoViableAltException);
    the line says how to quote the value, and the quoted value reaches the command as it is."""
    data = tmp_path / "dätä" / "lift.zarr"
    r = dp("dp-train", f"data={data}", f"out={tmp_path / 'run'}")
    one_line_error(r, "dp-train", f"data: Hydra cannot read '{data}' unquoted",
                   f"quote it: \"data='{data}'\"")
    r = dp("dp-train", f"data='{data}'", f"out={tmp_path / 'run'}")
    one_line_error(r, "dp-train", f"{data}: no such demonstration store")
    assert not (tmp_path / "run").exists()
