"""Statistics of success rates: one sampler's interval, two samplers compared on the seeds both
ran, and the sampler to pick for a planning deadline.

Every sampler of an evaluation runs the same seeds, so two samplers are compared pair by pair: a
seed both solve or both fail says nothing about which is better; only the seeds where they
disagree do. With `b` seeds only this sampler solved and `c` only the reference solved:

- McNemar's exact test: with no difference, each of the `b + c` disagreements goes either way
  with probability 1/2, so p = min(1, 2 P(X <= min(b, c))), X ~ Binomial(b + c, 1/2).
- Newcombe's square-and-add interval for the paired difference (Newcombe 1998, method 10;
  Fagerland, Lydersen & Laake, "Statistical Analysis of Contingency Tables", ch. 8): the two
  rates' Wilson intervals combined with their correlation over the seeds, much narrower than two
  independent intervals when the samplers mostly agree.

Written out here (a few lines each) rather than imported: scipy has the binomial test but no
paired interval, and statsmodels, which has McNemar's, is not otherwise needed; the tests check
the p-values against scipy's exact binomial test and the interval's coverage by simulation.
"""

from __future__ import annotations

import math

SIGNIFICANT = 0.05  # a difference with a paired p below this is called real


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a success rate (sound at 0 % and 100 %, unlike p ± 2 se)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # The interval contains p; in floating point centre + half can land a hair below 1.0 at
    # p = 1 (and centre - half above 0.0 at p = 0), so the bounds are clamped to include p.
    return (min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half)))


def mcnemar_p(only_this: int, only_reference: int) -> float:
    """Exact two-sided McNemar p-value from the discordant seeds' counts."""
    m = only_this + only_reference
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(min(only_this, only_reference) + 1)) / 2**m
    return min(1.0, 2 * tail)


def paired_diff_ci(both: int, only_this: int, only_reference: int, neither: int) -> tuple[float, float]:
    """95 % interval of (this sampler's success rate) - (the reference's) over paired seeds."""
    n = both + only_this + only_reference + neither
    if n == 0:
        return (-1.0, 1.0)
    s1, s2 = both + only_this, both + only_reference  # each sampler's successes
    p1, p2 = s1 / n, s2 / n
    (l1, u1), (l2, u2) = wilson(s1, n), wilson(s2, n)
    margins = s1 * (n - s1) * s2 * (n - s2)
    a = both * neither - only_this * only_reference
    # the rates' correlation over the seeds, continuity-corrected as Newcombe's method 10 has it
    phi = 0.0 if margins == 0 or 0 <= a <= n / 2 else (a - n / 2 if a > 0 else a) / math.sqrt(margins)
    d = p1 - p2
    low = d - math.sqrt(max(0.0, (p1 - l1) ** 2 + (u2 - p2) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2)))
    high = d + math.sqrt(max(0.0, (p2 - l2) ** 2 + (u1 - p1) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1)))
    return (max(-1.0, low), min(1.0, high))


def paired(this: dict[int, bool], reference: dict[int, bool], reference_label: str) -> dict:
    """This sampler against the reference over the seeds both ran (seed -> success of each)."""
    seeds = sorted(set(this) & set(reference))
    both = sum(this[s] and reference[s] for s in seeds)
    only_this = sum(this[s] and not reference[s] for s in seeds)
    only_ref = sum(reference[s] and not this[s] for s in seeds)
    neither = len(seeds) - both - only_this - only_ref
    return {"reference": reference_label, "seeds": len(seeds), "only_this": only_this,
            "only_reference": only_ref, "diff": (only_this - only_ref) / len(seeds) if seeds else 0.0,
            "p_value": mcnemar_p(only_this, only_ref),
            "diff_ci95": list(paired_diff_ci(both, only_this, only_ref, neither))}


def recommend(rows: list[dict], deadline_ms: float) -> dict:
    """The fastest sampler whose p95 planning latency fits `deadline_ms` and whose success is not
    significantly below that of the best sampler that fits (paired p >= 0.05 on their shared
    seeds), with the reason. `rows`: summary rows with `sampler`, `success_rate`,
    `latency_ms.p95` and `outcomes` ({"seeds": [...], "success": [...]})."""
    p95 = {r["sampler"]: r["latency_ms"]["p95"] for r in rows}
    fits = [r for r in rows if math.isfinite(p95[r["sampler"]]) and p95[r["sampler"]] <= deadline_ms]
    out = {"deadline_ms": deadline_ms, "sampler": None, "success_rate": None, "latency_p95_ms": None}
    if not fits:
        fastest = min((v for v in p95.values() if math.isfinite(v)), default=math.nan)
        return out | {"reason": f"no sampler's p95 planning latency fits {deadline_ms:g} ms "
                                f"(the fastest's is {fastest:.0f} ms)"}
    best = max(fits, key=lambda r: (r["success_rate"], -r["latency_ms"]["p95"]))
    for r in sorted(fits, key=lambda r: r["latency_ms"]["p95"]):
        test = paired(row_outcomes(r), row_outcomes(best), best["sampler"])
        if r is not best and _decided_below(r, rows) and not _decided_below(best, rows):
            # a sequential run stopped both early, so their shared seeds may be too few to
            # separate them; its own test already found this one below the reference
            continue
        if r is best or r["success_rate"] >= best["success_rate"] or test["p_value"] >= SIGNIFICANT:
            break
    if len(fits) == 1:
        reason = f"the only sampler whose p95 fits {deadline_ms:g} ms"
    elif r is best:
        sequential = any(_decided_below(f, rows) for f in fits)
        faster = sum(f["latency_ms"]["p95"] < r["latency_ms"]["p95"] for f in fits)
        reason = (f"the most successful of the {len(fits)} samplers whose p95 fits {deadline_ms:g} ms"
                  + (f"; the {faster} faster ones are significantly less successful "
                     f"(paired p < {SIGNIFICANT:g}"
                     + (", or below the reference by the sequential test)" if sequential else ")")
                     if faster else ", and the fastest of them"))
    else:
        reason = (f"the fastest sampler whose p95 fits {deadline_ms:g} ms and whose success is not "
                  f"significantly below the best that fits ({best['sampler']} {best['success_rate']:.0%}; "
                  f"paired p = {test['p_value']:.2g} over {test['seeds']} seeds)")
    return out | {"sampler": r["sampler"], "success_rate": r["success_rate"],
                  "latency_p95_ms": r["latency_ms"]["p95"], "reason": reason}


def _decided_below(row: dict, rows: list[dict]) -> bool:
    """Whether `stop=sequential` decided that `row` differs from the reference, and below it."""
    ref = next((r for r in rows if (r.get("sequential") or {}).get("decision") == "reference"), None)
    return ((row.get("sequential") or {}).get("decision") == "differs" and ref is not None
            and row["success_rate"] < ref["success_rate"])


def row_outcomes(row: dict) -> dict[int, bool]:
    """Seed -> success from a summary row's `outcomes`."""
    o = row.get("outcomes") or {"seeds": [], "success": []}
    return {int(s): bool(v) for s, v in zip(o["seeds"], o["success"])}


def loop_deadline_ms(n_actions: int, replan_every: int, rate_hz: float) -> float:
    """What a real-time loop allows a plan: the time the current chunk still covers when the next
    plan is requested (its `n_actions` actions, `replan_every` of them executed by then)."""
    return max(0, n_actions - replan_every) * 1e3 / rate_hz


# -- sequential paired testing (dp-eval stop=sequential) ------------------------------------------
# Seeds run in blocks, every sampler on the same ones; after each block a sampler's comparison
# with the reference is looked at again, and the sampler stops once it is decided:
# - "differs": an e-process over its discordant seeds reached 1/alpha. A betting e-process is
#   anytime-valid (Ville's inequality: under no difference it ever reaches 1/alpha with
#   probability at most alpha, however often it is looked at), so stopping there keeps the
#   stated error rate (Waudby-Smith & Ramdas 2024, "Estimating means of bounded random variables
#   by betting"; as a test of two policies: STEP, Snyder et al. 2025).
# - "no difference": it can hardly reach 1/alpha in the seeds left: the predictive probability
#   that it would (its discordance so far continued, `predictive_power`) is under `futility`.
#   Stopping for futility never makes a false "differs" more likely.
# Written out here: no maintained library offers a betting e-process for paired binary outcomes.
MAX_BET = 0.6  # the largest fraction of its wealth a bettor stakes on one discordant seed


def e_path(signs: list[int]) -> list[float]:
    """The two-sided e-process before and after each of the discordant seeds `signs` (+1: only
    this sampler solved the seed, -1: only the reference): the mean of two bettors, one on each
    direction, each staking (predictably, from the seeds before) the share its direction has won
    so far. Starts at 1."""
    up = down = 1.0
    total, path = 0, [1.0]
    for t, x in enumerate(signs):
        lean = total / (t + 1)  # shrunk towards 0: the first seed gets no bet
        up *= 1 + min(MAX_BET, max(0.0, lean)) * x
        down *= 1 - min(MAX_BET, max(0.0, -lean)) * x
        total += x
        path.append(0.5 * (up + down))
    return path


def e_value(signs: list[int]) -> float:
    """The e-process after the discordant seeds `signs` (`e_path`'s last value)."""
    return e_path(signs)[-1]


def predictive_power(signs: list[int], seeds_run: int, seeds_left: int, alpha: float,
                     draws: int = 400) -> float:
    """The probability that the e-process reaches 1/alpha within `seeds_left` more seeds, if they
    behave as the `seeds_run` so far suggest: discordance rate and direction drawn from their
    Beta(1 + hits, 1 + misses) posteriors. Reproducible (its generator is seeded by the counts)."""
    import numpy as np

    ups = sum(x > 0 for x in signs)
    rng = np.random.default_rng([seeds_run, len(signs), ups, seeds_left])
    reached = 0
    for _ in range(draws):
        rate = rng.beta(1 + len(signs), 1 + seeds_run - len(signs))
        up = rng.beta(1 + ups, 1 + len(signs) - ups)
        n = rng.binomial(seeds_left, rate)
        future = np.where(rng.random(n) < up, 1, -1).tolist()
        reached += max(e_path(signs + future)[len(signs):]) >= 1 / alpha
    return reached / draws


def sequential_decision(this: dict[int, bool], reference: dict[int, bool], seeds_left: int,
                        alpha: float = SIGNIFICANT, futility: float = 0.1, min_seeds: int = 20) -> dict:
    """Where a sampler's sequential comparison with the reference stands after the seeds both ran
    (seed -> success): `decision` "differs", "no difference" or None (run more), and why."""
    seeds = sorted(set(this) & set(reference))
    signs = [1 if this[s] else -1 for s in seeds if this[s] != reference[s]]
    e = max(e_path(signs))  # it stops at its first crossing
    out = {"seeds": len(seeds), "discordant": len(signs), "e_value": e, "alpha": alpha}
    if e >= 1 / alpha:
        return out | {"decision": "differs", "reason": f"e-value {e:.1f} >= 1/alpha = {1 / alpha:g}"}
    if seeds_left <= 0:
        return out | {"decision": "no difference", "reason": "every seed run"}
    power = predictive_power(signs, len(seeds), seeds_left, alpha) if len(seeds) >= min_seeds else 1.0
    if power < futility:
        return out | {"decision": "no difference", "predictive_power": power,
                      "reason": f"{power:.0%} predictive chance of a difference in the {seeds_left} "
                                "seeds left"}
    return out | {"decision": None, "predictive_power": power}
