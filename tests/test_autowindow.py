"""`sampler.window=auto` (policy/autowindow.py): the window that the measured batch curve and the
measured rounds make cheapest, cached per device, checkpoint and sampler setting."""

import json

import numpy as np
import pytest
import torch

from common.errors import UserError
from policy.autowindow import candidates, cost_ratio, measure
from policy.checkpoint import load_policy
from rollouts.presets import sampler_preset


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "window-auto.json"
    monkeypatch.setenv("PARAPOLICY_CACHE", str(path))
    return path


def _policy(checkpoint, spec):
    pol = load_policy(checkpoint)
    pol.sampler = sampler_preset(spec)
    return pol


def test_the_choice_follows_the_device_curve(checkpoint):
    """A flat curve (a GPU: a window costs what a row costs) picks the fewest rounds; a linear one
    (cost grows with the rows) the fewest evaluations; the predicted cost is rounds x cost(rows)."""
    pol = _policy(checkpoint, "paraddpm100:steps=40,window=auto")
    cond = pol.condition(torch.zeros(1, 2, pol.obs_dim))
    flat = [{"batch": b, "ratio": 1.0} for b in (1, 64)]
    linear = [{"batch": b, "ratio": float(b)} for b in (1, 64)]
    on_gpu = measure(pol, pol.sampler, cond, plans=2, curve=flat)
    on_cpu = measure(pol, pol.sampler, cond, plans=2, curve=linear)
    assert [r["window"] for r in on_gpu["rows"]] == candidates(40, "paper") == [4, 8, 16, 32, 40]
    # same noise, same rounds
    assert [r["rounds"] for r in on_gpu["rows"]] == [r["rounds"] for r in on_cpu["rows"]]
    for r in on_gpu["rows"]:
        assert r["cost"] == pytest.approx(r["rounds"])
    for r in on_cpu["rows"]:
        assert r["cost"] == pytest.approx(r["evals"])
    assert on_gpu["window"] == min(on_gpu["rows"], key=lambda r: (r["rounds"], r["window"]))["window"]
    assert on_cpu["window"] == min(on_cpu["rows"], key=lambda r: (r["evals"], r["window"]))["window"]
    rounds = {r["window"]: r["rounds"] for r in on_gpu["rows"]}
    assert rounds[40] < rounds[4]  # wider windows take fewer rounds: the flat curve's pick is wide
    assert on_gpu["window"] > on_cpu["window"]
    assert cost_ratio(linear, 128) == pytest.approx(128.0)  # beyond the curve: proportional


def test_auto_window_is_measured_once_cached_and_used(checkpoint, cache, monkeypatch):
    import policy.autowindow as aw

    calls = []
    real = aw.measure
    monkeypatch.setattr(aw, "measure", lambda *a, **k: calls.append(1) or real(*a, **k))
    pol = _policy(checkpoint, "paraddpm100:steps=30,window=auto")
    obs = np.zeros((2, pol.obs_dim), np.float32)
    first = pol.plan(obs)
    chosen = pol.sample_options()["window"]
    assert chosen in candidates(30, "paper") and calls == [1]
    entry = json.loads(cache.read_text())
    assert len(entry) == 1 and next(iter(entry.values()))["window"] == chosen
    pol.sampler = sampler_preset("paraddpm100:steps=30,window=auto")  # set again: no new measurement
    pol.plan(obs)
    other = _policy(checkpoint, "paraddpm100:steps=30,window=auto")  # another process: the file cache
    other.plan(obs)
    assert calls == [1] and other.sample_options()["window"] == chosen
    # the same plan as the fixed window it chose, on the same noise
    fixed = _policy(checkpoint, f"paraddpm100:steps=30,window={chosen}")
    pol.seed(3), fixed.seed(3)
    np.testing.assert_array_equal(pol.plan(obs).actions, fixed.plan(obs).actions)
    assert first.parallel_iters >= 1
    _policy(checkpoint, "paraddpm100:steps=30,window=auto,tol=0.2").plan(obs)  # another setting: measured
    assert calls == [1, 1] and len(json.loads(cache.read_text())) == 2


def test_auto_window_errors_and_the_chunk_rule(checkpoint, cache):
    with pytest.raises(UserError, match="sampler.window: 'wide' is not a number of steps or auto"):
        sampler_preset("paraddpm100:window=wide")
    pol = _policy(checkpoint, "paraddpm100:steps=20,window=auto,rule=chunk,tol=0.01")
    pol.plan(np.zeros((2, pol.obs_dim), np.float32))
    assert pol.sample_options()["window"] == 20  # the chunk rule takes only the whole chain


def test_dp_bench_measures_auto_windows_before_timing_and_shows_them(checkpoint, cache, tmp_path):
    from rollouts.bench import BenchConfig, run_bench

    cfg = BenchConfig(checkpoint=str(checkpoint), plans=4, threads=1, warmup=0, overhead_plans=1,
                      batch_sizes=[1, 4], samplers=["paraddpm100:steps=20,window=auto"])
    results, context = run_bench(cfg)
    row = next(r for r in results if r["name"] == "paraddpm100:steps=20,window=auto")
    entry = context["window_auto"]["paraddpm100:steps=20,window=auto"]
    assert row["window"] == entry["window"] and {r["window"] for r in entry["rows"]} == {4, 8, 16, 20}


def test_a_server_or_loop_chooses_the_window_before_its_first_plan(checkpoint, cache):
    """`choose_window()` with no observation measures on the normalizer's centre observation, so
    dp-serve and the local real-time planner pay it at start-up; the first plan then measures nothing."""
    from rollouts.realtime import LocalPlanner

    pol = _policy(checkpoint, "paraddpm100:steps=20")  # the preset: window auto
    assert pol.sample_options()["window"] is None
    LocalPlanner(pol)
    chosen = pol.sample_options()["window"]
    assert chosen in {4, 8, 16, 20} and json.loads(cache.read_text())  # measured and cached
    measured = dict(pol._windows)
    pol.plan(np.zeros((2, pol.obs_dim), np.float32))
    assert pol._windows == measured and pol.sample_options()["window"] == chosen
    assert _policy(checkpoint, "paraddpm100paper:steps=20").choose_window() is None  # a fixed window


# --- the cache file is not trusted: what does not validate is measured again and written over -------

SPEC = "paraddpm100:steps=20,window=auto"
MEASURED = {"window": 8,
            "rows": [{"window": w, "rounds": 5.0, "evals": 40.0, "rows_per_round": 8.0, "cost": 9.0}
                     for w in (4, 8, 16, 20)],
            "curve": [{"batch": 1, "ms": 1.0, "ratio": 1.0}], "machine": "cpu", "threads": 1}


@pytest.fixture
def measured(monkeypatch):
    """The measurement, counted and made instant (what is tested is what the cache lets through)."""
    import policy.autowindow as aw

    calls = []
    monkeypatch.setattr(aw, "measure", lambda *a, **k: calls.append(1) or json.loads(json.dumps(MEASURED)))
    return calls


@pytest.mark.parametrize("damage", [
    {"window": 0}, {"window": -3}, {"window": "x"}, {"window": None}, {"window": 2.5}, {"window": True},
    {"window": 7},  # not a window that was tried
    {"rows": "many"}, {"rows": [{"window": 4, "rounds": "nan"}]}, {"curve": []}, {"machine": 3},
    {"threads": 0}, "a string", [4, 8],
])
def test_a_cached_window_that_does_not_validate_is_measured_again_and_written_over(
        checkpoint, cache, measured, damage):
    import policy.autowindow as aw

    pol = _policy(checkpoint, SPEC)
    k = aw.key(pol, pol.sampler)
    hostile = {**MEASURED, "window": 4, **damage} if isinstance(damage, dict) else damage
    cache.write_text(json.dumps({k: hostile, "other": 1}))
    entry = pol.prepare()  # dp-serve's start-up; a plan, dp-bench and the loops take the same path
    assert measured == [1] and entry["window"] == 8 == pol.sample_options()["window"]
    assert np.isfinite(pol.plan(np.zeros((2, pol.obs_dim), np.float32)).actions).all()
    table = json.loads(cache.read_text())
    assert table == {k: MEASURED, "other": 1}  # written over; the rest of the file kept
    again = _policy(checkpoint, SPEC)
    assert again.prepare() == MEASURED and measured == [1]  # a valid entry is used as it is


@pytest.mark.parametrize("text", ["[1, 2, 3]", "null", "42", '"window"', "{not json", "\x00\xff",
                                  "[" * 100000])
def test_a_cache_file_that_is_not_a_json_object_is_measured_again_and_replaced(checkpoint, cache, measured,
                                                                                text):
    cache.write_text(text)
    assert _policy(checkpoint, SPEC).prepare() == MEASURED and measured == [1]
    assert list(json.loads(cache.read_text()).values()) == [MEASURED]


def test_dp_bench_on_openvino_with_a_cached_window_of_zero_measures_again(checkpoint, cache, tmp_path):
    """A cached window of 0 reached OpenVINO as a zero-row call: heap corruption, exit 134."""
    import policy.autowindow as aw
    from commands import dp

    spec = "paraddpm100:steps=10,window=auto,backend=openvino"
    pol = _policy(checkpoint, spec)
    cache.write_text(json.dumps({aw.key(pol, pol.sampler): {**MEASURED, "window": 0}}))
    r = dp("dp-bench", f"checkpoint={checkpoint}", f"samplers=['{spec}']", "plans=2", "warmup=0",
           "batch_sizes=[1]", "overhead_plans=1", "threads=1", f"out={tmp_path / 'bench'}")
    assert r.returncode == 0, r.stderr[-2000:]
    chosen = json.loads(cache.read_text())[aw.key(pol, pol.sampler)]
    assert chosen["window"] in candidates(10, "paper") and chosen["threads"] == 1  # measured here
    assert f"window=auto chose {chosen['window']}" in r.stdout
