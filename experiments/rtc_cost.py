"""Planning cost of RTC inpainting per plan, free vs replace vs guide
(zoo/square, 1 thread; docs/realtime.md).
Run from the repository root: uv run python experiments/rtc_cost.py (writes outputs/rtc_cost.json)."""
import json, os, time

import numpy as np
import torch

torch.set_num_threads(1)
from policy import load
from policy.samplers import SamplerConfig
pol = load("zoo/square")
rng = np.random.default_rng(0)
obs = rng.normal(size=(2, pol.obs_dim)).astype(np.float32) * 0.1
pol.sampler = SamplerConfig(name="ddim", steps=10); pol.seed(7)
committed = pol.plan(obs, n_actions=8).actions[:8]
rows = []
for name, extra in (("ddim", dict(steps=10)), ("paraddim", dict(steps=15, window=15, tol=0.05))):
    for mode in (None, "replace", "guide"):
        pol.sampler = SamplerConfig(name=name, inpaint=mode, **extra)
        kw = {} if mode is None else dict(committed=committed, frozen=3)
        for _ in range(3): pol.plan(obs, n_actions=15, **kw)
        ts = []; info = None
        for i in range(20):
            pol.seed(i); t0 = time.perf_counter(); p = pol.plan(obs, n_actions=15, **kw)
            ts.append(time.perf_counter() - t0)
        r = dict(sampler=f"{name}{extra['steps']}", inpaint=mode or "free",
                 plan_ms_p50=round(1e3*float(np.median(ts)), 1))
        for k in ("model_evals", "parallel_iters"):
            v = getattr(p, k, None) if hasattr(p, k) else None
            if v is None and hasattr(p, "info"): v = p.info.get(k)
            r[k] = v
        rows.append(r); print(r, flush=True)
os.makedirs("outputs", exist_ok=True)
json.dump(dict(date=time.strftime("%Y-%m-%d"), machine="2-core x86_64 CPU, 1 torch thread", rows=rows),
          open("outputs/rtc_cost.json", "w"), indent=1)
