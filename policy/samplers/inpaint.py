"""Inpainting a committed prefix into a sampler's chain (Real-Time Chunking, Black, Galliker and
Levine 2025), by replacement or by guidance.

A control loop that plans the next chunk while the current one executes knows the actions that
will run before the new chunk arrives. The new chunk must agree with them: after every step, each
point of the chain is pulled toward those actions noised to its own level,

    target_i = sqrt(abar_i) * prefix + sqrt(1 - abar_i) * x_T,      x_i <- x_i + w * (target_i - x_i),

with a weight per action of the chunk, `w` in [0, 1] (1 on the frozen actions, decaying over the
overlap, 0 after it). The noise is the chain's own x_T, so the pull is a fixed affine map of each
point: a step followed by it is still a deterministic function of the point before, and Picard
iteration solves the constrained chain as it solves the plain one (ParaDiGMS writes each step as
`x_{k+1} = x_k + (f_k(x_k) - x_k)`, whatever `f_k` is). The chain's end is clean data
(abar = 1), so actions with weight 1 end exactly on the prefix.

Guidance (`mode="guide"`, RTC's own mode, after PiGDM, Song et al. 2023) leaves the points alone
and bends each step's noise estimate instead. With a = sqrt(abar), s = sqrt(1 - abar) and
x0(x) = (x - s eps(x)) / a the step's data estimate, clipped where the schedule clips it (unclipped,
it divides the network's error by a ~ 0.003 at the first step and the guidance blows the chain up
to 1e6; a clipped entry is not pulled), one vector-Jacobian product through the denoiser gives

    g = (d x0 / d x)^T  W (prefix - x0),      eps <- eps - a * min(beta, 1 / (a s)) * g,

which moves the data estimate by s * min(beta, 1 / (a s)) * g. Unclipped, that is the gradient of
log N(prefix; x0, r^2 / W) with PiGDM's r^2 = 1 - abar added to the score; RTC's weight
(1 - tau) / (tau r^2) in flow time tau = a / (a + s) is this 1 / (a s), and its clip at beta = 5
keeps the guidance from blowing up near the noise (a -> 0) and the data (s -> 0). The guided step
is again a deterministic function of its point (the noise is drawn up front), so Picard iteration
solves the guided chain too; it costs one backward pass per denoiser call, and, unlike
replacement, it does not pin the frozen actions exactly.

Hand-written: diffusers' inpainting pipelines are image pipelines over one shared timestep, and
LeRobot's real-time chunking is for flow-matching policies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MODES = ("replace", "guide")
GUIDANCE_CLIP = 5.0  # RTC's beta: the most the guidance weight 1 / (a s) may reach


@dataclass
class Inpaint:
    prefix: torch.Tensor  # [B, horizon, A] committed actions, normalized (rows past the prefix: anything)
    weights: torch.Tensor  # [horizon] pull toward the prefix, in [0, 1]
    mode: str = "replace"  # replace: pull each point; guide: bend each step's noise estimate

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"inpaint: mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.weights.dim() != 1 or self.weights.shape[0] != self.prefix.shape[1]:
            raise ValueError(f"inpaint: weights of shape {tuple(self.weights.shape)} for a horizon of "
                             f"{self.prefix.shape[1]}")
        if bool(((self.weights < 0) | (self.weights > 1)).any()):
            raise ValueError("inpaint: weights must lie in [0, 1]")

    def bind(self, plan, noise: torch.Tensor) -> "BoundInpaint":
        """The pull for the chain of `plan` started from `noise` [B, horizon, A] (its x_T)."""
        if self.prefix.shape != noise.shape:
            raise ValueError(f"inpaint: prefix of shape {tuple(self.prefix.shape)} for chunks "
                             f"of {tuple(noise.shape)}")
        a = plan.point_sqrt_a
        return BoundInpaint(self.prefix.to(noise), self.weights.to(noise)[None, :, None], noise, a,
                            (1 - a * a).clamp(min=0).sqrt(), plan if self.mode == "guide" else None)


@dataclass
class BoundInpaint:
    prefix: torch.Tensor
    w: torch.Tensor  # [1, horizon, 1]
    noise: torch.Tensor
    a: torch.Tensor  # [n + 1] sqrt(abar) of each point (Plan.point_sqrt_a)
    s: torch.Tensor  # [n + 1] sqrt(1 - abar)
    plan: object = None  # guidance: the chain's Plan (its steps' levels); None: replacement

    @property
    def guide(self) -> "BoundInpaint | None":
        """What `solvers.step_rows` takes to guide its noise estimates (None: replacement mode)."""
        return self if self.plan is not None else None

    def eps(self, denoiser, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, k: torch.Tensor,
            rows: torch.Tensor) -> torch.Tensor:
        """The guided noise estimate of rows `x` [M, horizon, A] at steps `k` [M] of samples `rows`
        [M]: one forward and one backward pass of the denoiser over all rows (rows are independent,
        so one vector-Jacobian product of the sum serves them all)."""
        shape = (-1, *([1] * (x.dim() - 1)))
        a, s = self.plan.sqrt_a[k].reshape(shape), self.plan.sqrt_1ma[k].reshape(shape)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            eps = denoiser(xg, t, cond)
            x0 = self.plan.denoise(k, xg, eps)  # clipped where the schedule clips: no pull through a clip
            (g,) = torch.autograd.grad(x0, xg, self.w * (self.prefix[rows] - x0.detach()))
        weight = (1 / (a * s)).clamp(max=GUIDANCE_CLIP)  # RTC's (1 - tau) / (tau r^2), clipped
        return eps.detach() - a * weight * g

    def __call__(self, x: torch.Tensor, points: torch.Tensor | int, rows: torch.Tensor) -> torch.Tensor:
        """Rows `x` [M, horizon, A] that are points `points` [M] (or one int) of samples `rows` [M],
        pulled (replacement; guidance leaves them as they are)."""
        if self.plan is not None:
            return x
        a, s = self.a[points], self.s[points]
        if not isinstance(points, int):
            a, s = a.reshape(-1, 1, 1), s.reshape(-1, 1, 1)
        target = a * self.prefix[rows] + s * self.noise[rows]
        return x + self.w * (target - x)

    def move(self, step: torch.Tensor, z: torch.Tensor, x: torch.Tensor, points: torch.Tensor,
             rows: torch.Tensor) -> torch.Tensor:
        """The pulled step from rows `x` as a move (`step` + `z` pulled, minus `x`): what ParaDiGMS's
        cumulative sums add up."""
        return self(step + z, points, rows) - x


class NoInpaint:
    """No committed actions: every point as the step left it (a do-nothing `BoundInpaint`)."""

    guide = None

    def __call__(self, x: torch.Tensor, points, rows) -> torch.Tensor:
        return x

    def move(self, step: torch.Tensor, z: torch.Tensor, x: torch.Tensor, points, rows) -> torch.Tensor:
        # the unpulled step's arithmetic order (the tol=0 chains are compared bit for bit)
        return step - x + z


NO_INPAINT = NoInpaint()


def rtc_weights(horizon: int, frozen: int, overlap: int, device=None) -> torch.Tensor:
    """Real-Time Chunking's soft mask: 1 on the first `frozen` actions (they execute before the new
    chunk arrives), decaying exponentially to 0 over the rest of the `overlap` with the previous
    chunk, 0 after it (RTC's mask: c_i = (overlap - i) / (overlap - frozen + 1),
    w_i = c_i (e^c_i - 1) / (e - 1))."""
    if not 0 <= frozen <= overlap <= horizon:
        raise ValueError(f"inpaint: need 0 <= frozen ({frozen}) <= overlap ({overlap}) "
                         f"<= horizon ({horizon})")
    i = torch.arange(horizon, dtype=torch.float32, device=device)
    c = ((overlap - i) / (overlap - frozen + 1)).clamp(min=0)
    w = torch.where(i < frozen, torch.ones_like(c), c * torch.expm1(c) / torch.expm1(torch.ones(())))
    return torch.where(i >= overlap, torch.zeros_like(w), w)
