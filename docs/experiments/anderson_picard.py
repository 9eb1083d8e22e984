"""Measurement script for issue 8, not product code (run: uv run python docs/experiments/anderson_picard.py; needs outputs/lift): full-chain Picard on DDPM-100 vs Anderson-accelerated Picard, cold and warm,
counting iterations until every point changes within ParaDiGMS's tolerance (0.1 of its step's noise)."""
import torch, numpy as np
import policy
from policy.samplers import SamplerConfig, get_sampler
from policy.samplers.solvers import get_plan, step_rows
from policy.windows import episode_sequences
torch.set_num_threads(2)
pol = policy.load('outputs/lift')
obs, first = episode_sequences(pol, pol.meta['data'], 'val', 6)
plan = get_plan(pol.scheduler, 'ddpm', 100, 'trailing', 'cpu')
n = plan.n
pol.sampler = SamplerConfig(name='paraddpm', steps=100, window=16, tol=0.1, warm=True)
pol.seed(0)
for i in range(3): pol.plan(obs[i], advance=8 if i else None)
noise, z, init = pol.warm.prepare(plan, (1,16,7), pol.generator, 'cpu', torch.float32, 8)
cond = pol.condition(torch.as_tensor(obs[3])[None])
bound = (0.1**2) * noise[0].numel() * plan.var  # [n+1]
ks = torch.arange(n)
zero = torch.zeros(n, dtype=torch.long)

@torch.no_grad()
def F(X):  # X [n+1, 16, 7] -> Picard image
    x = X[:-1]
    move = step_rows(plan, pol.net, cond.expand(n, -1), x, ks, zero * 0 + torch.arange(n) * 0, None) - x + z[:, 0]
    out = X.clone()
    out[1:] = X[0] + move.cumsum(0)
    return out

def run(X, m, max_it=60):
    X = X.clone(); Fs, Gs = [], []
    for it in range(1, max_it + 1):
        FX = F(X)
        change = (FX - X).square().flatten(1).sum(-1)
        if bool((change <= bound).all()):
            return it, FX
        G = FX - X
        if m > 0:
            Fs.append(FX.flatten()); Gs.append(G.flatten())
            Fs, Gs = Fs[-(m + 1):], Gs[-(m + 1):]
            if len(Gs) > 1:
                dG = torch.stack([Gs[i + 1] - Gs[i] for i in range(len(Gs) - 1)], 1)
                dF = torch.stack([Fs[i + 1] - Fs[i] for i in range(len(Fs) - 1)], 1)
                gamma = torch.linalg.lstsq(dG.double(), G.flatten().double()[:, None]).solution.float()
                Xn = (FX.flatten() - (dF @ gamma)[:, 0]).reshape(X.shape)
                Xn[0] = X[0]
                X = Xn
                continue
        X = FX
    return max_it, X

cold = noise[None].repeat(n + 1, 1, 1, 1)[:, 0]
ref = get_sampler('ddpm')(pol.net, cond, pol.scheduler, noise, None, step_noise=z, steps=100).x[0]
for name, X0 in (('cold', cold), ('warm', init[0])):
    for m in (0, 2, 4, 8):
        it, X = run(X0, m)
        print(name, 'anderson m=%d' % m, 'iters', it, 'max|x-seq|', float((X[-1] - ref).detach().abs().max()))
