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

from dataclasses import dataclass

import torch

from policy.samplers.acceptance import Rule
from policy.samplers.anderson import TriangularAnderson
from policy.samplers.chain import Chain
from policy.samplers.result import SampleResult
from policy.samplers.solvers import new_history, step_rows


def paradigms(denoiser, cond: torch.Tensor, chain: Chain, *, window: int = 16, rule: Rule = Rule(),
              max_iters: int | None = None, anderson: int = 0, pad: bool = False,
              callback=None) -> SampleResult:
    """Picard-iterate `chain` until `rule` accepts every point (`acceptance.py`), `window` steps per
    sample per iteration, at most `max_iters` iterations; `anderson` > 0 mixes the guesses of the
    window's unaccepted points over that many past rounds; `pad` evaluates every round at the full
    window's [B * window] rows, the rows past the chain's end masked (fixed shapes for a captured
    denoiser, `policy.denoiser`; the counts are the unmasked rows'). With committed actions
    (`chain.pull`) a step is `x_{k+1} = pull(step(x_k) + z_k)` (or, guided, the step of a bent noise
    estimate), which Picard iteration solves the same way."""
    picard = PicardWindow(chain, window, rule, anderson, pad)
    while picard.running(max_iters):
        picard.round(denoiser, cond, callback)
    return picard.result()


@dataclass
class Rows:
    """One round's windows: which sample rows, steps and points each window row is."""

    active: torch.Tensor  # [B] samples whose window has not reached the chain's end
    k: torch.Tensor  # [B, p] the steps of each window
    valid: torch.Tensor  # [B, p] window rows inside the chain, of active samples
    after: torch.Tensor  # [B, p] the points the window's steps make (k + 1, clamped to n)
    n_valid: torch.Tensor  # [B]
    b: torch.Tensor  # [M] the sample of each evaluated row
    j: torch.Tensor  # [M] its place in the window
    keep: torch.Tensor | None  # [M] padded: which evaluated rows count


class PicardWindow:
    """The state of one ParaDiGMS call, a round at a time: every sample's chain guess (points 0..n
    and a spare point n + 1 that masked writes go to, so every write of a round is one fixed-shape
    scatter with no host-side selection of rows: a GPU round's only host synchronisation is the
    loop's convergence test), its window's first point, and its evaluations."""

    def __init__(self, chain: Chain, window: int, rule: Rule, anderson: int, pad: bool):
        noise, n, B = chain.noise, chain.n, chain.batch
        self.c, self.n, self.p, self.pad = chain, n, min(window, n), pad
        self.z = chain.step_noise.transpose(0, 1)  # [B, n, ...]
        self.samples = chain.samples
        self.offsets = torch.arange(self.p, device=noise.device)
        self.points = self._first_guess()
        self.history = new_history(chain.plan, noise)
        self.accel = TriangularAnderson(anderson) if anderson else None
        # Squared norms against squared bounds: no square roots per point.
        self.accept = rule.bounds(chain.plan, noise[0].numel(), self.p)
        self.bound = torch.cat([self.accept.point_bound, self.accept.point_bound[-1:]])  # [n + 2]
        self.point_ids = torch.arange(n + 2, device=noise.device)[None]
        self.begin = torch.zeros(B, dtype=torch.long, device=noise.device)
        self.evals = torch.zeros(B, dtype=torch.long, device=noise.device)
        self.iters = 0
        # padded: every round evaluates the same rows, those of the whole window
        self.pad_rows = (self.samples.repeat_interleave(self.p), self.offsets.repeat(B)) if pad else None

    def _first_guess(self) -> torch.Tensor:
        """Points 0..n+1 [B, n + 2, ...]: copies of x_T, or the chain guess (its last point twice)."""
        c = self.c
        first = c.pull(c.noise, 0, self.samples)
        if c.init is None:
            return first[:, None].repeat(1, self.n + 2, *([1] * (c.noise.dim() - 1)))
        points = torch.cat([c.init, c.init[:, -1:]], 1)
        points[:, 0] = first
        return points

    def running(self, max_iters: int | None) -> bool:
        return bool((self.begin < self.n).any()) and (max_iters is None or self.iters < max_iters)

    def round(self, denoiser, cond: torch.Tensor, callback=None) -> None:
        """One Picard iteration: evaluate every window in one call, propose new guesses of the
        points after each window's steps, slide each window past its accepted run."""
        rows = self.rows()
        new, guess, change = self.propose(self.evaluate(denoiser, cond, rows), rows)
        accepted = (change <= self.bound[rows.after]) & rows.valid
        advance = self.advance(change, accepted, rows)
        self.commit(new, guess, rows, advance)
        self.slide(rows, advance)
        if callback is not None:
            callback({"iter": self.iters, "begin": self.begin, "chain": self.points[:, : self.n + 1],
                      "evals": self.evals, "change": change, "accepted": accepted, "points": rows.after,
                      "valid": rows.valid})

    def rows(self) -> Rows:
        active = self.begin < self.n
        k = self.begin[:, None] + self.offsets  # [B, p] steps of each sample's window
        valid = (k < self.n) & active[:, None]
        if self.pad:  # every row of the window; those past the end (or of finished samples) are masked
            (b, j), keep = self.pad_rows, valid.flatten()
        else:  # only the window's rows inside the chain
            (b, j), keep = valid.nonzero(as_tuple=True), None
        return Rows(active, k, valid, (k + 1).clamp(max=self.n), valid.sum(1), b, j, keep)

    def evaluate(self, denoiser, cond: torch.Tensor, rows: Rows) -> torch.Tensor:
        """One denoiser call over the windows' rows: each row's (pulled) step as a move from its
        point, [B, p, ...] (zero where a window has no row): the cumulative sums telescope to it."""
        c, b = self.c, rows.b
        k = rows.k[b, rows.j].clamp(max=self.n - 1)
        x = self.points[b, k]
        step = step_rows(c.plan, denoiser, cond, x, k, b, self.history, keep=rows.keep, guide=c.pull.guide)
        step = c.pull.move(step, self.z[b, k], x, k + 1, b)
        shape = (c.batch, self.p, *c.noise.shape[1:])
        if self.pad:
            return torch.where(c.spread(rows.keep), step, 0.0).reshape(shape)
        move = c.noise.new_zeros(shape)
        move[b, rows.j] = step
        return move

    def propose(self, move: torch.Tensor, rows: Rows):
        """New guesses of the points after each window's steps (its first point plus the summed
        moves), this round's guesses of them and the squared change [B, p]."""
        start = self.points[self.samples, self.begin.clamp(max=self.n)]
        new = start[:, None] + move.cumsum(1)
        guess = self.points[self.samples[:, None], rows.after]
        return new, guess, (new - guess).square().flatten(2).sum(-1)

    def advance(self, change: torch.Tensor, accepted: torch.Tensor, rows: Rows) -> torch.Tensor:
        """How far each window slides: past its accepted run (invalid rows stop the run), at least
        one point (the point after its first is exact); the chunk rule's end test can take it all."""
        first_rejected = torch.where(~accepted.all(1), (~accepted).int().argmax(1), self.p)
        advance = torch.minimum(first_rejected + 1, rows.n_valid)
        if self.accept.final_bound is not None:  # chunk rule: the whole window's end is the chain's end
            final_change = change[self.samples, (rows.n_valid - 1).clamp(min=0)]
            advance = torch.where(rows.active & (final_change <= self.accept.final_bound), rows.n_valid,
                                  advance)
        return advance

    def commit(self, new: torch.Tensor, guess: torch.Tensor, rows: Rows, advance: torch.Tensor) -> None:
        """Write the new guesses; with Anderson, the points past the new window's first get the
        mixed guesses for the next round."""
        trash, at = self.n + 1, self.samples[:, None]
        self.points[at, torch.where(rows.valid, rows.after, trash)] = new
        if self.accel is not None:
            mixed = self.accel.mix(guess, new, rows.after, rows.valid, self.c.plan.var)
            mix = rows.valid & (self.offsets[None] >= advance[:, None])
            self.points[at, torch.where(mix, rows.after, trash)] = mixed

    def slide(self, rows: Rows, advance: torch.Tensor) -> None:
        """Move each window; points entering it start from the window's last point (unless a chain
        guess gave them one)."""
        end, new_begin = self.begin + rows.n_valid, self.begin + advance
        if self.c.init is None:
            new_end = (new_begin + self.p).clamp(max=self.n)
            entering = ((self.point_ids > end[:, None]) & (self.point_ids <= new_end[:, None])
                        & rows.active[:, None])
            last = self.points[self.samples, end.clamp(max=self.n)][:, None]
            trailing = [1] * (self.c.noise.dim() - 1)
            self.points = torch.where(entering.reshape(*entering.shape, *trailing), last, self.points)
        self.evals += rows.n_valid
        self.begin = torch.where(rows.active, new_begin, self.begin)
        self.iters += 1

    def result(self) -> SampleResult:
        per_sample = self.evals.tolist()
        n = self.n
        return SampleResult(x=self.points[:, n], model_evals=max(per_sample), parallel_iters=self.iters,
                            converged=bool((self.begin >= n).all()), evals_per_sample=per_sample,
                            chain=self.points[:, : n + 1])
