"""Paired comparisons and the deadline recommendation (`rollouts.stats`, issue 32): McNemar's exact
p against scipy's exact binomial test, the paired interval's coverage by simulation, and the
recommendation's choice on constructed evaluations; then dp-eval and dp-report end to end."""

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from rollouts.report import _title, compare, read_rows, seed_note
from rollouts.stats import (e_path, e_value, loop_deadline_ms, mcnemar_p, paired, paired_diff_ci,
                            predictive_power, recommend, sequential_decision, wilson)

from commands import dp


@pytest.mark.parametrize("only_this", range(0, 21, 3))
@pytest.mark.parametrize("only_reference", range(0, 21, 4))
def test_mcnemar_p_is_scipys_exact_binomial_test_on_the_discordant_seeds(only_this, only_reference):
    m = only_this + only_reference
    expected = 1.0 if m == 0 else binomtest(only_this, m, 0.5).pvalue
    assert mcnemar_p(only_this, only_reference) == pytest.approx(expected, rel=1e-9, abs=1e-15)


def _table(rng, n, p1, p2, rho):
    """Paired Bernoulli outcomes with marginals p1, p2 and correlation rho (of the indicators)."""
    both = p1 * p2 + rho * math.sqrt(p1 * (1 - p1) * p2 * (1 - p2))
    probs = [both, p1 - both, p2 - both, 1 - p1 - p2 + both]
    return rng.multinomial(n, probs)


@pytest.mark.parametrize("p1, p2, rho",
                         [(0.8, 0.8, 0.6), (0.9, 0.8, 0.5), (0.6, 0.5, 0.2), (0.95, 0.85, 0.3)])
def test_the_paired_interval_covers_the_true_difference_about_95_percent_of_the_time(p1, p2, rho):
    rng = np.random.default_rng(0)
    trials, n = 3000, 50
    cover = 0
    for _ in range(trials):
        lo, hi = paired_diff_ci(*_table(rng, n, p1, p2, rho))
        cover += lo <= p1 - p2 <= hi
    assert 0.925 <= cover / trials <= 0.99, cover / trials  # Newcombe's method 10: close to nominal


def test_the_paired_interval_is_narrower_than_two_independent_ones_when_samplers_agree():
    both, only_this, only_ref, neither = 30, 2, 6, 12  # 64 % against 72 %, 42 of 50 seeds agree
    lo, hi = paired_diff_ci(both, only_this, only_ref, neither)
    n = 50
    assert lo <= (only_this - only_ref) / n <= hi
    l1, u1 = wilson(both + only_this, n)
    l2, u2 = wilson(both + only_ref, n)
    p1, p2 = (both + only_this) / n, (both + only_ref) / n
    # Newcombe's independent-samples width
    unpaired = math.hypot(p1 - l1, u2 - p2) + math.hypot(p2 - l2, u1 - p1)
    assert hi - lo < 0.8 * unpaired
    swapped = paired_diff_ci(both, only_ref, only_this, neither)
    assert swapped == pytest.approx((-hi, -lo))  # the comparison the other way round is its mirror


def test_paired_counts_only_the_seeds_both_ran():
    this = {1: True, 2: True, 3: False, 4: True, 9: True}
    ref = {1: True, 2: False, 3: True, 4: False, 5: False}
    out = paired(this, ref, "ref")
    assert out["seeds"] == 4 and out["only_this"] == 2 and out["only_reference"] == 1
    assert out["diff"] == pytest.approx(0.25) and out["p_value"] == 1.0 and out["reference"] == "ref"


def _row(name, p95, wins):
    """A summary row over seeds 0..len(wins)-1."""
    return {"sampler": name, "latency_ms": {"p50": p95 / 1.2, "p95": p95},
            "success_rate": sum(wins) / len(wins),
            "outcomes": {"seeds": list(range(len(wins))), "success": [int(w) for w in wins]}}


def test_the_recommendation_is_the_fastest_that_fits_and_is_not_significantly_worse():
    n = 60
    good = [1] * 54 + [0] * 6  # 90 %
    close = [1] * 50 + [0] * 10  # 83 %: fails 4 seeds the good one solves, p = 0.125
    poor = [1] * 30 + [0] * 30  # 50 %: fails 24 seeds the good one solves
    rows = [_row("slow-best", 300, good), _row("fast-poor", 20, poor), _row("mid-close", 60, close),
            _row("too-slow", 900, [1] * n)]
    rec = recommend(compare(rows), 400)
    assert rec["sampler"] == "mid-close" and rec["latency_p95_ms"] == 60 and rec["deadline_ms"] == 400
    assert "slow-best" in rec["reason"] and "p = 0.12" in rec["reason"]
    # a deadline only the poor one fits; then one none fits
    assert recommend(rows, 30)["sampler"] == "fast-poor"
    none = recommend(rows, 10)
    assert none["sampler"] is None and "no sampler" in none["reason"] and "20 ms" in none["reason"]
    # without the close one, the fast poor sampler is significantly worse: the best that fits wins
    rec = recommend([r for r in rows if r["sampler"] != "mid-close"], 400)
    assert rec["sampler"] == "slow-best" and "significantly less successful" in rec["reason"]


def test_a_sampler_the_sequential_test_found_below_the_reference_is_not_recommended():
    """As on can mh: DDIM-2 stopped 'differs' (below DDPM-100), DDIM-3 stopped 'no difference'
    after 20 seeds, too few for DDIM-2 to be significantly below DDIM-3 on their own."""
    ref = _row("ddpm100", 300, [1] * 40)
    ddim2 = _row("ddim2", 12, [1] * 30 + [0] * 10)
    ddim3 = _row("ddim3", 16, [1] * 20)
    ref["sequential"] = {"decision": "reference"}
    ddim2["sequential"], ddim3["sequential"] = {"decision": "differs"}, {"decision": "no difference"}
    rows = [ref, ddim2, ddim3]
    assert recommend(rows, 50)["sampler"] == "ddim3"
    for r in rows:
        del r["sequential"]  # the same rows from a fixed-size run: the paired test alone decides
    assert recommend(rows, 50)["sampler"] == "ddim2"


def test_compare_names_an_unknown_reference_and_says_when_seeds_differ():
    rows = [_row("a", 10, [1, 0, 1]), _row("b", 20, [1, 1, 1, 0])]
    compare(rows, "b")
    assert rows[1]["paired"] is None and rows[0]["paired"]["seeds"] == 3
    assert "seeds differ" in seed_note(rows)
    with pytest.raises(Exception, match="reference: 'c' is not one of the samplers"):
        compare(rows, "c")
    with pytest.raises(Exception, match="reference: '' is not one of the samplers"):  # not the first
        compare(rows, "")


def test_a_merged_report_title_names_each_runs_settings():
    rows = [{"task": "square", "episodes": 50, "workers": 2, "threads": 1, "device": "cpu"},
            {"task": "square", "episodes": 50, "workers": 1, "threads": 1, "device": "cpu"}]
    assert _title(rows) == "square: 50 episodes per sampler; 2 or 1 workers x 1 torch threads, cpu"
    assert _title(rows[:1]) == "square: 50 episodes per sampler; 2 workers x 1 torch threads, cpu"


def test_the_loop_allows_a_plan_what_the_current_chunk_still_covers():
    assert loop_deadline_ms(15, 8, 20.0) == pytest.approx(350.0)
    assert loop_deadline_ms(8, 8, 20.0) == 0.0


def test_dp_eval_compares_each_sampler_with_the_reference_and_recommends_for_a_deadline(checkpoint, tmp_path):
    out = tmp_path / "eval"
    specs = ["ddim5:steps=2", "ddim5:steps=3"]
    r = dp("dp-eval", f"checkpoint={checkpoint}", "samplers=[" + ",".join(f"'{s}'" for s in specs) + "]",
           "episodes=2", "workers=1", "horizon=40", f"out={out}", "reference='ddim5:steps=3'",
           "deadline_ms=1000")
    assert r.returncode == 0, r.stderr
    rows = read_rows(out / "results.json")
    first, ref = rows
    assert ref["paired"] is None
    assert first["paired"]["reference"] == "ddim5:steps=3" and first["paired"]["seeds"] == 2
    assert first["outcomes"]["seeds"] == [100000, 100001]
    import json

    doc = json.loads((out / "results.json").read_text())
    rec = doc["recommendation"]
    assert doc["reference"] == "ddim5:steps=3" and rec["deadline_ms"] == 1000
    # both fail every episode: equal, so the fastest
    fastest = min(rows, key=lambda e: e["latency_ms"]["p95"])
    assert rec["sampler"] == fastest["sampler"] and "deadline 1000 ms: use" in r.stdout
    assert "vs ref" in r.stdout
    merged = dp("dp-report", f"inputs=[{out}]", f"out={tmp_path}/report", "deadline_ms=0.001")
    assert merged.returncode == 0, merged.stderr
    assert "no recommendation" in merged.stdout


@pytest.mark.parametrize("args, message", [
    (["reference=ddpm100"], "reference: 'ddpm100' is not one of the samplers"),
    (["deadline_ms=-5"], "deadline_ms: -5"),
])
def test_a_bad_reference_or_deadline_is_one_line_before_any_episode(checkpoint, tmp_path, args, message):
    out = tmp_path / "eval"
    r = dp("dp-eval", f"checkpoint={checkpoint}", "samplers=['ddim5:steps=2']", "episodes=1",
           f"out={out}", *args)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (out / "episodes.jsonl").exists()


def test_the_e_process_rarely_crosses_one_over_alpha_when_the_samplers_do_not_differ():
    # anytime-valid: however often it is looked at, under no difference it ever reaches 1/alpha
    # with probability at most alpha (Ville); fair discordant seeds, 50 looks each
    rng = np.random.default_rng(0)
    crossed = [max(e_path(list(rng.choice([-1, 1], 50)))) >= 20 for _ in range(2000)]
    assert np.mean(crossed) <= 0.05


def test_the_e_process_decides_a_one_sided_run_of_discordant_seeds_in_nine():
    assert e_value([1] * 8) < 20 <= e_value([1] * 9)
    assert e_value([-1] * 9) == e_value([1] * 9)  # two-sided
    assert e_path([]) == [1.0] and e_value([1]) == 1.0  # the first seed is not bet on


def _outcomes(pairs):
    this = {s: a for s, (a, _) in enumerate(pairs)}
    return this, {s: b for s, (_, b) in enumerate(pairs)}


def test_a_sequential_comparison_stops_when_decided_and_runs_on_when_not():
    this, ref = _outcomes([(False, True)] * 9 + [(True, True)] * 3)  # only the reference solves 9
    d = sequential_decision(this, ref, seeds_left=38)
    assert d["decision"] == "differs" and d["discordant"] == 9 and d["e_value"] >= 20
    this, ref = _outcomes([(True, True)] * 20)  # agreeing on 20 seeds: cannot become a difference
    d = sequential_decision(this, ref, seeds_left=30)
    assert d["decision"] == "no difference" and d["predictive_power"] < 0.1
    this, ref = _outcomes([(True, True)] * 10)  # too few seeds to give up on it yet
    assert sequential_decision(this, ref, seeds_left=40)["decision"] is None
    this, ref = _outcomes([(True, False)] * 5 + [(False, True)] + [(True, True)] * 14)  # leaning, undecided
    d = sequential_decision(this, ref, seeds_left=30)
    assert d["decision"] is None and d["predictive_power"] >= 0.1
    assert sequential_decision(this, ref, seeds_left=0)["decision"] == "no difference"
    assert predictive_power([1, -1, 1], 23, 27, 0.05) == predictive_power([1, -1, 1], 23, 27, 0.05)
