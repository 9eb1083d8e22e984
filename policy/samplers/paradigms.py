"""ParaDiGMS (Shih et al., NeurIPS 2023): the denoising chain as a fixed point, solved by Picard
iteration over a sliding window of steps, one batched denoiser call per iteration.

With all noise drawn up front, the chain x_{k+1} = x_k + d_k(x_k) + z_k is a deterministic map of
its start, and every point satisfies

    x_{k+1} = x_b + sum_{i=b..k} (d_i(x_i) + z_i)        for any earlier point b.

One iteration evaluates the drifts d_i of the `window` points starting at the window's first
point b in one batch, from the current guesses, and replaces the guesses of the points after
them by that cumulative sum. A point is accepted when its change passes the acceptance rule
(`acceptance.py`; the paper's, `rule=paper`, is within tolerance of the noise of its step,

    |x_new - x_old|^2 / (dim * var_k) <= tol^2),

and the window slides to the first point that is not (it always moves by at least one: the
point after b is exact, being computed from b). Points entering the window start as copies of
its last point. With tol = 0 a point is accepted only once it stops changing at all, and the
result is the sequential sampler's (up to float rounding of the sums); window = 1 is the
sequential sampler itself.

`init` [B, n + 1, ...], a guess of the whole chain (the previous control step's chain, shifted:
`policy.warm`), replaces the copies of x_T as the starting point, and points entering the window
keep their guess. The fixed point does not depend on the guess: at tol = 0 the result is the
same; a good guess only lets the window slide further per iteration.

`anderson` = m > 0 replaces the guesses of the window's points past its new first point by
triangular Anderson mixing over the last m rounds (`anderson.py`, ParaTAA); accepted points and
the new first point keep their Picard values, so the guarantees above hold unchanged.

Each sample of a batch keeps its own window, so a sample that converges early stops costing
evaluations while the others go on; all windows still go through one denoiser call.

DPM-Solver++(2M) is multistep: its step from x_k also uses the data estimate of step k-1. Inside
a window that estimate comes from the row before in the same call; for the window's first point
it is the one stored when step k-1 was last evaluated (step k-1 lies in the accepted part of the
chain, so the stored estimate is that of the accepted point). The fixed point is therefore
exactly the sequential DPM-Solver++(2M) chain, first- and last-step order rules included.
"""

from __future__ import annotations

import torch

from policy.samplers.acceptance import acceptance
from policy.samplers.anderson import TriangularAnderson
from policy.samplers.result import SampleResult
from policy.samplers.solvers import get_plan, new_history, step_rows


def paradigms(denoiser, cond: torch.Tensor, scheduler, noise: torch.Tensor, generator: torch.Generator | None = None,
              *, solver: str, steps: int | None = None, spacing: str = "trailing", window: int = 16,
              tol: float = 0.1, max_iters: int | None = None,
              taus: tuple[float, ...] | None = None, step_noise: torch.Tensor | None = None,
              anderson: int = 0, rule: str = "paper", floor: float = 0.0,
              init: torch.Tensor | None = None, pad: bool = False, inpaint=None, callback=None) -> SampleResult:
    """Picard-iterate the `solver` chain of `steps` steps from `noise` [B, horizon, A] to
    tolerance `tol`, `window` steps per sample per iteration, at most `max_iters` iterations;
    `step_noise` [n, B, ...] is the steps' scaled noise, `init` [B, n + 1, ...] a chain guess;
    `anderson` > 0 mixes the guesses of the window's unaccepted points over that many past rounds;
    `rule` and `floor` choose when a point is accepted (`acceptance.py`); `pad` evaluates every
    round at the full window's [B * window] rows, the rows past the chain's end masked (fixed
    shapes for a captured denoiser, `policy.denoiser`; the counts are the unmasked rows'); `inpaint`
    (`inpaint.Inpaint`) pulls every point toward a committed prefix, a step then being
    `x_{k+1} = pull(step(x_k) + z_k)` (or, guided, the step of a bent noise estimate), which
    Picard iteration solves the same way."""
    plan = get_plan(scheduler, solver, steps, spacing, noise.device, noise.dtype, taus)
    n, B, dev = plan.n, noise.shape[0], noise.device
    if window < 1:
        raise ValueError(f"sampler.window: {window} must be at least 1")
    p = min(window, n)
    if step_noise is None:
        step_noise = plan.draw_noise(noise.shape, generator, dev, noise.dtype)
    z = step_noise.transpose(0, 1)  # [B, n, ...]
    # Points 0..n of each sample, and a spare point n + 1 that masked writes go to: every write of
    # a round is one fixed-shape scatter, with no host-side selection of rows (a GPU round's only
    # host synchronisation is the loop's convergence test).
    trash = n + 1
    samples = torch.arange(B, device=dev)
    offsets = torch.arange(p, device=dev)
    pull = None if inpaint is None else inpaint.bind(plan, noise)
    guide = None if pull is None else pull.guide
    first_point = noise if pull is None else pull(noise, 0, samples)
    if init is None:
        chain = first_point[:, None].repeat(1, n + 2, *([1] * (noise.dim() - 1)))
    else:
        if init.shape != (B, n + 1, *noise.shape[1:]):
            raise ValueError(f"init: shape {tuple(init.shape)}, expected {(B, n + 1, *noise.shape[1:])}")
        chain = torch.cat([init, init[:, -1:]], 1)
        chain[:, 0] = first_point
    history = new_history(plan, noise)
    if anderson < 0:
        raise ValueError(f"sampler.anderson: {anderson} must be >= 0")
    accel = TriangularAnderson(anderson) if anderson else None
    # Squared norms against squared bounds: no square roots per point.
    accept = acceptance(plan, rule, tol, floor, noise[0].numel(), p)
    bound = torch.cat([accept.point_bound, accept.point_bound[-1:]])  # [n + 2]
    points = torch.arange(n + 2, device=dev)[None]
    begin = torch.zeros(B, dtype=torch.long, device=dev)
    evals = torch.zeros(B, dtype=torch.long, device=dev)
    shape = (B, p, *noise.shape[1:])
    pad_rows = (samples.repeat_interleave(p), offsets.repeat(B)) if pad else None  # the same every round
    iters = 0
    while bool((begin < n).any()) and (max_iters is None or iters < max_iters):
        active = begin < n
        k = begin[:, None] + offsets  # [B, p] steps of each sample's window
        valid = (k < n) & active[:, None]
        if pad:  # every row of the window; those past the end (or of finished samples) are masked
            (b_rows, j_rows), keep = pad_rows, valid.flatten()
        else:  # only the window's rows inside the chain
            (b_rows, j_rows), keep = valid.nonzero(as_tuple=True), None
        k_rows = k[b_rows, j_rows].clamp(max=n - 1)
        x_rows = chain[b_rows, k_rows]
        if pull is None:
            step = step_rows(plan, denoiser, cond, x_rows, k_rows, b_rows, history, keep=keep) - x_rows + z[b_rows, k_rows]
        else:  # the pulled step, as a move from x_k: the cumulative sums below telescope to it
            step = pull(step_rows(plan, denoiser, cond, x_rows, k_rows, b_rows, history, keep=keep, guide=guide)
                        + z[b_rows, k_rows],
                        k_rows + 1, b_rows) - x_rows
        if pad:
            move = torch.where(keep.reshape(-1, *([1] * (noise.dim() - 1))), step, 0.0).reshape(shape)
        else:
            move = noise.new_zeros(shape)
            move[b_rows, j_rows] = step
        start = chain[samples, begin.clamp(max=n)]
        new = start[:, None] + move.cumsum(1)  # guesses of points k + 1
        after = (k + 1).clamp(max=n)
        guess = chain[samples[:, None], after]  # this round's guesses of points k + 1
        change = (new - guess).square().flatten(2).sum(-1)  # [B, p]
        accepted = (change <= bound[after]) & valid
        # The window slides past the accepted run; invalid rows (past the end) stop the run.
        first_rejected = torch.where(~accepted.all(1), (~accepted).int().argmax(1), p)
        n_valid = valid.sum(1)
        advance = torch.minimum(first_rejected + 1, n_valid)
        if accept.final_bound is not None:  # chunk rule: the whole window's end is the chain's end
            final_change = change[samples, (n_valid - 1).clamp(min=0)]
            advance = torch.where(active & (final_change <= accept.final_bound), n_valid, advance)
        chain[samples[:, None], torch.where(valid, after, trash)] = new
        if accel is not None:  # the points past the new window's first: Anderson's guesses for the next round
            mixed = accel.mix(guess, new, after, valid, plan.var)
            mix = valid & (offsets[None] >= advance[:, None])
            chain[samples[:, None], torch.where(mix, after, trash)] = mixed
        # Points entering the window start from the window's last point.
        end, new_begin = begin + n_valid, begin + advance
        new_end = (new_begin + p).clamp(max=n)
        if init is None:
            entering = (points > end[:, None]) & (points <= new_end[:, None]) & active[:, None]
            last = chain[samples, end.clamp(max=n)][:, None]
            chain = torch.where(entering.reshape(*entering.shape, *([1] * (noise.dim() - 1))), last, chain)
        evals += n_valid
        begin = torch.where(active, new_begin, begin)
        iters += 1
        if callback is not None:
            callback({"iter": iters, "begin": begin, "chain": chain[:, : n + 1], "evals": evals, "change": change,
                      "accepted": accepted, "points": after, "valid": valid})
    per_sample = evals.tolist()
    return SampleResult(x=chain[:, n], model_evals=max(per_sample), parallel_iters=iters,
                        converged=bool((begin >= n).all()), evals_per_sample=per_sample, chain=chain[:, : n + 1])
