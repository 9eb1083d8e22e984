"""Rounds per plan of warm-started ParaDiGMS with RTC along consecutive plans (zoo/square; docs/realtime.md).
Run from the repository root: uv run python experiments/rtc_rounds.py 6 (writes outputs/rtcrounds.json)."""
import json, os, sys, time

import numpy as np
import torch

torch.set_num_threads(1)
from policy import load
from policy.samplers import SamplerConfig
pol = load("zoo/square")
rng = np.random.default_rng(0)
obs0 = rng.normal(size=(2, pol.obs_dim)).astype(np.float32) * 0.1
rows = []
for name, extra in (("paraddim15", dict(name="paraddim", steps=15, window=15, anderson=4, tol=0.5,
                                        floor=0.01)),
                    ("paraddpm100", dict(name="paraddpm", steps=100, window=16, anderson=4, tol=1.0,
                                         floor=0.03))):
    for mode in (None, "replace", "guide"):
        pol.sampler = SamplerConfig(warm=True, inpaint=mode, **extra); pol.seed(0)
        it, ev, ms = [], [], []
        prev = None
        for k in range(int(sys.argv[1])):
            obs = obs0 + 0.01 * k
            kw = {} if (mode is None or prev is None) else dict(committed=prev[8:15], frozen=3)
            t0 = time.perf_counter()
            p = pol.plan(obs, n_actions=15, advance=None if prev is None else 8, **kw)
            ms.append(1e3 * (time.perf_counter() - t0))
            if prev is not None: it.append(p.parallel_iters); ev.append(p.model_evals)
            prev = p.actions
        r = dict(sampler=name, inpaint=mode or "free", rounds=round(float(np.mean(it)), 1),
                 evals=round(float(np.mean(ev)), 1), plan_ms_p50=round(float(np.median(ms[1:])), 1))
        rows.append(r); print(r, flush=True)
os.makedirs("outputs", exist_ok=True)
json.dump(dict(date=time.strftime("%Y-%m-%d"), machine="2-core x86_64 CPU, 1 torch thread", rows=rows),
          open("outputs/rtcrounds.json", "w"), indent=1)
