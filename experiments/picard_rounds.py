"""Measurement script for issue 8, not product code: Picard rounds, evaluations and the cost in
sequential-step units (from the 2-core batch-scaling curve in the README) of ParaDiGMS variants
along closed-loop observation sequences (consecutive plans are real neighbours, 8 steps apart).
Counts only; wall-clock speed is dp-bench's job.

    uv run python experiments/picard_rounds.py outputs/lift 24 \\
        paraddpm:steps=100,window=16,tol=0.1 paraddpm:steps=100,window=16,tol=0.1,anderson=4,warm=true
"""
import sys

import numpy as np
import torch

import policy
from policy.samplers import SamplerConfig
from policy.windows import episode_sequences

# cost(batch p) / cost(batch 1), lift UNet, 2 cores
CURVE = {1: 1.0, 2: 2.16, 4: 2.41, 8: 3.07, 16: 3.99, 32: 5.76}


def cost(rows: int) -> float:
    xs = sorted(CURVE)
    return float(np.interp(rows, xs, [CURVE[x] for x in xs]))


def parse(spec: str) -> SamplerConfig:
    name, _, opts = spec.partition(":")
    kw = {}
    for item in filter(None, opts.split(",")):
        k, v = item.split("=")
        kw[k] = float(v) if k == "tol" else (v == "true") if k == "warm" else int(v)
    return SamplerConfig(name=name, **kw)


def main(checkpoint: str, n: int, specs: list[str]) -> None:
    torch.set_num_threads(1)
    pol = policy.load(checkpoint)
    obs, first = episode_sequences(pol, pol.meta["data"], "val", n)
    for spec in specs:
        cfg = parse(spec)
        pol.sampler = cfg
        pol.seed(0)
        evals_after_round: list[int] = []
        pol._sample_options["callback"] = lambda d: evals_after_round.append(int(d["evals"][0]))
        iters, evals, costs = [], [], []
        for i in range(n):
            advance = None if first[i] or not cfg.warm else pol.cfg.n_action_steps
            _, res = pol.sample(torch.as_tensor(obs[i])[None], advance=advance)
            rows = np.diff([0] + evals_after_round)
            evals_after_round.clear()
            iters.append(res.parallel_iters)
            evals.append(res.model_evals)
            costs.append(sum(cost(r) for r in rows))
        print(f"{spec:60s} rounds {np.mean(iters):5.1f} (max {max(iters)})  evaluations "
              f"{np.mean(evals):6.1f}  cost {np.mean(costs):5.1f} sequential steps", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
