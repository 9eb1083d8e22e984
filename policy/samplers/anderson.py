"""Triangular Anderson acceleration of the Picard update (ParaTAA: Tang et al., ICML 2024), for
the sliding window of `paradigms`.

Picard iteration maps a guess X of the window's points to F(X), and stops at the fixed point
X = F(X). Anderson acceleration (type II) keeps the last `m` rounds' guesses and images and takes
as the next guess

    X' = F(X) - dF @ gamma,   gamma = argmin |G - dG @ gamma|^2   (G = F(X) - X, d: round differences),

the combination of past images whose residual is smallest, in place of F(X). Point i of the
denoising chain depends only on the points before it, so the system is triangular; ParaTAA's
triangular variant solves a separate least-squares problem for each point over the residuals of
the points up to it, so no point's guess is pulled by the error of points it does not depend on.
Residuals are weighed by each point's noise scale, the same scale the tolerance uses.

Hand-written because no maintained library offers Anderson mixing over a batched, triangular,
sliding set of unknowns (torch has none; scipy's `anderson` is a dense CPU root finder).

The mixed points are only the next round's guesses: the caller keeps the window's first point
(computed from accepted points, so exact) and every accepted point at its Picard value, so the
sliding window's guarantees stand: it moves by at least one point a round, and at tol = 0 it
ends on the sequential chain.
"""

from __future__ import annotations

import torch


class TriangularAnderson:
    """History of one sampler call, kept at absolute chain points so it follows the window: the
    last `memory` + 1 rounds' guesses and Picard images in ring buffers [memory + 1, B, n + 1, d].
    Only the points a round iterated are written; a point's older entries are never read (see `age`)."""

    def __init__(self, memory: int, reg: float = 1e-8):
        if memory < 1:
            raise ValueError(f"anderson memory {memory} must be at least 1")
        self.memory, self.reg, self.rounds = memory, reg, 0
        self.x = self.f = None  # guesses and their images, by round slot
        self.age: torch.Tensor | None = None  # [B, n + 1] rounds each point has been iterated (the window
        #                                        only moves forward, so a point's rounds are the last ones)

    def mix(self, guess: torch.Tensor, image: torch.Tensor, after: torch.Tensor, valid: torch.Tensor,
            scale: torch.Tensor) -> torch.Tensor:
        """Next guesses [B, p, ...] of the window points `after` [B, p] (valid: [B, p]) given this
        round's guesses and Picard images of those points (`guess`, `image`: [B, p, ...]); `scale`
        [n + 1] divides each point's residual. Returns the image where there is no history yet."""
        B, p = after.shape
        d = image[0, 0].numel()
        points = scale.shape[0]  # n + 1; one more, a spare point, takes the invalid rows' writes
        if self.x is None:
            self.x = image.new_zeros((self.memory + 1, B, points + 1, d))
            self.f = torch.zeros_like(self.x)
            self.age = torch.zeros((B, points + 1), dtype=torch.long, device=after.device)
        slot = self.rounds % (self.memory + 1)
        rows = torch.arange(B, device=after.device)[:, None]
        at = torch.where(valid, after, points)  # fixed-shape writes: no host-side row selection
        self.x[slot, rows, at] = guess.flatten(2)
        self.f[slot, rows, at] = image.flatten(2)
        self.age[rows, at] += 1
        self.rounds += 1
        r = min(self.rounds, self.memory + 1)
        if r < 2:
            return image
        order = (torch.arange(r, device=after.device) + self.rounds - r) % (self.memory + 1)
        x = self.x[order][:, rows, after].transpose(0, 1)  # [B, r, p, d], oldest round first
        f = self.f[order][:, rows, after].transpose(0, 1)
        w = (valid / scale[after].sqrt())[..., None]  # [B, p, 1]: invalid rows weigh nothing
        g = (f - x) * w[:, None]
        dg, df = g[:, 1:] - g[:, :-1], f[:, 1:] - f[:, :-1]  # [B, m', p, d]
        # Per point i, the least-squares problem over points 0..i of the window: cumulative normal equations.
        gram = torch.einsum("bipd,bjpd->bpij", dg, dg).double().cumsum(1)  # [B, p, m', m']
        rhs = torch.einsum("bipd,bpd->bpi", dg, g[:, -1]).double().cumsum(1)  # [B, p, m']
        # A point uses only the round differences it was iterated in (ParaTAA's per-point memory);
        # the points before it in the window are older, so their rows cover the same rounds.
        m = dg.shape[1]
        # [B, p, m']
        use = (m - 1 - torch.arange(m, device=after.device)) < (self.age[rows, after] - 1)[..., None]
        pair = use[..., :, None] & use[..., None, :]
        eye = torch.eye(m, dtype=gram.dtype, device=gram.device)
        ridge = self.reg * (gram.diagonal(dim1=-2, dim2=-1) * use).sum(-1).clamp(min=1e-30)[..., None, None]
        gram = torch.where(pair, gram, 0.0) + torch.where(use[..., None], ridge, 1.0) * eye
        # solve_ex: no error check, which would wait for the device (the ridge keeps `gram` regular)
        # [B, p, m']
        gamma = torch.linalg.solve_ex(gram, torch.where(use, rhs, 0.0)[..., None])[0][..., 0].to(f.dtype)
        mixed = f[:, -1] - torch.einsum("bpi,bipd->bpd", gamma, df)
        return mixed.reshape(image.shape)
