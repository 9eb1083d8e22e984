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
    """History of one sampler call: positions are absolute chain points, so it follows the window."""

    def __init__(self, memory: int, reg: float = 1e-8):
        if memory < 1:
            raise ValueError(f"anderson memory {memory} must be at least 1")
        self.memory, self.reg = memory, reg
        self.x: list[torch.Tensor] = []  # guesses of the rounds, [B, n + 1, ...] (the window part changes)
        self.f: list[torch.Tensor] = []  # their Picard images
        self.age: torch.Tensor | None = None  # [B, n + 1] rounds each point has been iterated (the window
        #                                        only moves forward, so a point's rounds are its last ones)

    def mix(self, guess: torch.Tensor, image: torch.Tensor, after: torch.Tensor, valid: torch.Tensor,
            scale: torch.Tensor) -> torch.Tensor:
        """Next guesses [B, p, ...] of the window points `after` [B, p] (valid: [B, p]) given this
        round's `guess` and Picard `image` of the whole chain [B, n + 1, ...]; `scale` [n + 1]
        divides each point's residual. Returns the image where there is no history yet."""
        self.x = (self.x + [guess])[-(self.memory + 1):]
        self.f = (self.f + [image])[-(self.memory + 1):]
        B, p = after.shape
        rows = torch.arange(B, device=after.device)[:, None]
        if self.age is None:
            self.age = torch.zeros(image.shape[:2], dtype=torch.long, device=image.device)
        self.age[rows.expand_as(after)[valid], after[valid]] += 1
        f_now = image[rows, after].flatten(2)  # [B, p, d]
        if len(self.x) < 2:
            return f_now.reshape(image[rows, after].shape)
        w = (valid / scale[after].sqrt())[..., None]  # [B, p, 1]: invalid rows weigh nothing
        x = torch.stack([h[rows, after].flatten(2) for h in self.x], 1)  # [B, r, p, d]
        f = torch.stack([h[rows, after].flatten(2) for h in self.f], 1)
        g = (f - x) * w[:, None]
        dg, df = g[:, 1:] - g[:, :-1], f[:, 1:] - f[:, :-1]  # [B, m', p, d]
        # Per point i, the least-squares problem over points 0..i of the window: cumulative normal equations.
        gram = torch.einsum("bipd,bjpd->bpij", dg, dg).double().cumsum(1)  # [B, p, m', m']
        rhs = torch.einsum("bipd,bpd->bpi", dg, g[:, -1]).double().cumsum(1)  # [B, p, m']
        # A point uses only the round differences it was iterated in (ParaTAA's per-point memory);
        # the points before it in the window are older, so their rows cover the same rounds.
        m = dg.shape[1]
        use = (m - 1 - torch.arange(m, device=after.device)) < (self.age[rows, after] - 1)[..., None]  # [B, p, m']
        pair = use[..., :, None] & use[..., None, :]
        eye = torch.eye(m, dtype=gram.dtype, device=gram.device)
        ridge = self.reg * (gram.diagonal(dim1=-2, dim2=-1) * use).sum(-1).clamp(min=1e-30)[..., None, None]
        gram = torch.where(pair, gram, 0.0) + torch.where(use[..., None], ridge, 1.0) * eye
        gamma = torch.linalg.solve(gram, torch.where(use, rhs, 0.0)[..., None])[..., 0].to(f.dtype)  # [B, p, m']
        mixed = f_now - torch.einsum("bpi,bipd->bpd", gamma, df)
        return mixed.reshape(image[rows, after].shape)
