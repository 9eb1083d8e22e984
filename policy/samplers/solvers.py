"""The step math every sampler shares: one denoising step of DDPM, DDIM or DPM-Solver++(2M),
batched over rows that may each sit at a different step.

A `Plan` is a solver's coefficient table for one timestep list. Every step is linear in the
current point `x`, the denoiser's noise estimate `eps`, its (clipped) data estimate `x0` and, for
the multistep solver, the previous step's data estimate:

    mean_k = cx[k] * x + c0[k] * x0 + ce[k] * eps + c1[k] * x0_prev
    x_{k+1} = mean_k + std[k] * z_k          (z_k drawn up front; std = 0 for the ODE solvers)

The coefficients are computed from diffusers' `alphas_cumprod` (the single source of the
schedule) along the actual timestep list, so no sampler assumes a fixed stride between steps.
diffusers' schedulers step one shared timestep at a time; the samplers here need many
different steps in one batch (a Picard window), which is why this table exists. Tests check it
against diffusers' own `step()` loops.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from common.errors import UserError

SPACINGS = ("trailing", "leading", "linspace", "quadratic", "logsnr", "uniform")
# SOLVERS, the solver names, is defined below with the coefficient builder of each (`_COEFFICIENTS`).


def canonical_spacing(spacing: str) -> str:
    """`uniform` (the aligner paper's name for evenly spaced steps) is diffusers' `trailing`."""
    return "trailing" if spacing == "uniform" else spacing


@dataclass(frozen=True)
class Plan:
    solver: str
    timesteps: np.ndarray  # [n] descending: the step times the coefficients are computed at
    t: torch.Tensor  # [n] float, the denoiser's input `t` at each step: the timesteps, or the
    #                  aligned taus of the DPM-Aligner (the coefficients stay those of `timesteps`)
    sqrt_a: torch.Tensor  # [n] sqrt(alpha_bar_t): x0 = (x - sqrt_1ma * eps) / sqrt_a
    sqrt_1ma: torch.Tensor
    cx: torch.Tensor
    c0: torch.Tensor
    ce: torch.Tensor
    c1: torch.Tensor
    std: torch.Tensor  # [n] ancestral noise scale (0 everywhere for ODE solvers)
    noisy: tuple[bool, ...]  # steps that draw noise (DDPM: t > 0, as diffusers draws it)
    var: torch.Tensor  # [n + 1] tolerance scale of each point of the chain (see `_point_variance`)
    linear: torch.Tensor  # [n] d mean / d x with the data estimate held fixed (exponential integrators)
    clip: bool

    @property
    def point_sqrt_a(self) -> torch.Tensor:
        """[n + 1] sqrt(alpha_bar) of the chain's points: point i < n sits at step i's level, point n
        is clean."""
        return torch.cat([self.sqrt_a, self.sqrt_a.new_ones(1)])

    @property
    def n(self) -> int:
        return len(self.timesteps)

    @property
    def multistep(self) -> bool:
        return self.solver == "dpmsolver"

    def draw_noise(self, shape: torch.Size, generator: torch.Generator | None, device, dtype) -> torch.Tensor:
        """All the steps' noise [n, *shape], scaled, drawn before any denoiser call: the stochastic
        sampler becomes a deterministic map, and draws follow diffusers' order (one per noisy step)."""
        z = torch.zeros((self.n, *shape), device=device, dtype=dtype)
        for k in range(self.n):
            if self.noisy[k]:
                z[k] = self.std[k] * torch.randn(shape, generator=generator, device=device, dtype=dtype)
        return z

    def denoise(self, k: torch.Tensor | int, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The data estimate x0 at step(s) k, clipped to the normalized action range when the
        schedule clips. For DPM-Solver this is diffusers' `thresholding` with `sample_max_value=1`
        (its threshold s is clamped to [1, 1], so it clips to [-1, 1]); without it, x0 at high
        noise divides the network's error by alpha_t ~ 0.003 and Picard iterations on the
        multistep chain barely contract."""
        x0 = (x - _at(self.sqrt_1ma, k, x) * eps) / _at(self.sqrt_a, k, x)
        return x0.clamp(-1.0, 1.0) if self.clip else x0

    def mean(self, k, x, eps, x0, x0_prev=None) -> torch.Tensor:
        """The noiseless part of step(s) k from x."""
        out = _at(self.cx, k, x) * x + _at(self.c0, k, x) * x0 + _at(self.ce, k, x) * eps
        if self.multistep and x0_prev is not None:
            out = out + _at(self.c1, k, x) * x0_prev
        return out


def _at(c: torch.Tensor, k, x: torch.Tensor) -> torch.Tensor:
    """Coefficient(s) of step(s) k shaped to broadcast against x (one row per k)."""
    if isinstance(k, int):
        return c[k]
    return c[k].reshape(-1, *([1] * (x.dim() - 1)))


def timesteps(scheduler, steps: int, spacing: str) -> np.ndarray:
    """`steps` integer timesteps, descending, of the given spacing over the training steps.

    trailing/leading/linspace are diffusers' own definitions (DDPMScheduler.set_timesteps);
    quadratic is uniform in sqrt(t); logsnr is uniform in log signal-to-noise ratio. The last two
    are rounded to integers and kept strictly decreasing.
    """
    T = scheduler.config.num_train_timesteps
    spacing = canonical_spacing(spacing)
    if not isinstance(steps, int) or not 1 <= steps <= T:
        raise UserError(f"sampler.steps: {steps!r} is not a step count in 1..{T}")
    if spacing in ("trailing", "leading", "linspace"):
        from diffusers import DDPMScheduler

        sched = DDPMScheduler.from_config(scheduler.config, timestep_spacing=spacing)
        sched.set_timesteps(steps)
        return sched.timesteps.numpy().astype(np.int64)
    if spacing == "quadratic":
        t = (T - 1) * (np.arange(steps, 0, -1) / steps) ** 2
    elif spacing == "logsnr":
        abar = scheduler.alphas_cumprod.double().numpy()
        lam = 0.5 * np.log(abar / (1 - abar))  # increasing as t falls
        grid = np.linspace(lam[T - 1], lam[0], steps)
        t = np.interp(grid, lam[::-1], np.arange(T - 1, -1, -1, dtype=np.float64))
    else:
        raise UserError(f"sampler.spacing: unknown spacing {spacing!r}; known: {', '.join(SPACINGS)}")
    t = np.clip(np.round(t), 0, T - 1).astype(np.int64)
    t[0] = T - 1
    for i in range(1, steps):  # strictly decreasing where rounding made dense ends coincide,
        t[i] = min(t[i], t[i - 1] - 1)
    return np.maximum(t, np.arange(steps - 1, -1, -1))  # and never below 0 (steps <= T)


def _point_variance(abar: np.ndarray, abar_next: np.ndarray) -> np.ndarray:
    """Tolerance scale of the chain's points 0..n: the DDPM posterior variance of the step that
    produced each point (point 0, the initial noise, is never checked). The final point's step
    has variance 0; it gets the last non-zero one instead, so its check is tol-relative like
    every other (never 0 * inf)."""
    var = (1 - abar_next) / (1 - abar) * (1 - abar / abar_next)
    out = np.concatenate([[1.0], var])
    positive = out[1:][out[1:] > 0]
    floor = positive.min() if len(positive) else 1.0
    return np.where(out > 0, out, floor)


@dataclass(frozen=True)
class _Coefficients:
    """One solver's float64 coefficient rows along the timesteps (the `Plan` fields of the same names)."""
    sqrt_a: np.ndarray
    sqrt_1ma: np.ndarray
    cx: np.ndarray
    c0: np.ndarray
    ce: np.ndarray
    c1: np.ndarray
    std: np.ndarray
    noisy: tuple[bool, ...]


def _coefficients(a: np.ndarray, **given) -> _Coefficients:
    """The coefficients `given`, the rest at their defaults: zero, no noise, sqrt(a) and sqrt(1 - a)."""
    n = len(a)
    fields = dict(sqrt_a=np.sqrt(a), sqrt_1ma=np.sqrt(1 - a), noisy=(False,) * n)
    fields.update({name: np.zeros(n) for name in ("cx", "c0", "ce", "c1", "std")})
    fields.update(given)
    return _Coefficients(**fields)


def _ddpm(a: np.ndarray, ap: np.ndarray, ts: np.ndarray) -> _Coefficients:
    """DDPM posterior mean and variance (diffusers' "fixed_small")."""
    cur_alpha = a / ap
    cur_beta = 1 - cur_alpha
    c0 = np.sqrt(ap) * cur_beta / (1 - a)
    cx = np.sqrt(cur_alpha) * (1 - ap) / (1 - a)
    std = np.sqrt(np.maximum((1 - ap) / (1 - a) * cur_beta, 1e-20))
    return _coefficients(a, cx=cx, c0=c0, std=std, noisy=tuple(bool(t > 0) for t in ts))


def _ddim(a: np.ndarray, ap: np.ndarray, ts: np.ndarray) -> _Coefficients:
    """eta = 0, the raw eps (diffusers' default use_clipped_model_output=False)."""
    return _coefficients(a, c0=np.sqrt(ap), ce=np.sqrt(1 - ap))


def _float32_alpha_sigma(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """alpha_t, sigma_t rounded along diffusers' float32 route (via sigma = sqrt((1 - a) / a)):
    at t = T - 1, x0 = (x - sigma_t eps) / alpha_t divides by alpha_t ~ 0.003, which turns an ulp
    of difference into 1e-5 in the result."""
    a32 = a.astype(np.float32)
    sig = np.sqrt((np.float32(1) - a32) / a32)
    alpha = (np.float32(1) / np.sqrt(sig * sig + np.float32(1))).astype(np.float64)
    sigma = (sig * alpha.astype(np.float32)).astype(np.float64)
    return alpha, sigma


def _dpmsolver(a: np.ndarray, ap: np.ndarray, ts: np.ndarray) -> _Coefficients:
    """DPM-Solver++ 2M, midpoint, first order at the first and the final (sigma 0) step."""
    alpha, sigma = _float32_alpha_sigma(a)
    n = len(a)
    cx, c0, c1 = np.zeros(n), np.zeros(n), np.zeros(n)
    alpha_n, sigma_n = np.append(alpha[1:], 1.0), np.append(sigma[1:], 0.0)
    lam = np.log(alpha) - np.log(sigma)
    c0[n - 1] = 1.0  # sigma_next = 0: lambda_next = inf, the update is x0 itself
    for k in range(n - 1):
        lam_n = np.log(alpha_n[k]) - np.log(sigma_n[k])
        h = lam_n - lam[k]
        phi = alpha_n[k] * -np.expm1(-h)  # alpha_t (1 - e^{-h})
        cx[k] = sigma_n[k] / sigma[k]
        if k == 0:
            c0[k] = phi
        else:
            r0 = (lam[k] - lam[k - 1]) / h
            c0[k] = phi * (1 + 0.5 / r0)
            c1[k] = -phi * 0.5 / r0
    return _coefficients(a, sqrt_a=alpha, sqrt_1ma=sigma, cx=cx, c0=c0, c1=c1)


def consistency_scalings(t):
    """A consistency function's boundary scalings at step(s) `t`: f(x, t) = c_skip x + c_out x0(x, t),
    with f(x, 0) = x. Latent Consistency Models' discrete-time form, computed by diffusers'
    `LCMScheduler` (its default timestep scaling 10 and sigma_data 0.5), so that the student
    trains (`policy.consistency`) and samples with one definition."""
    return _lcm().get_scalings_for_boundary_condition_discrete(t)


@lru_cache(maxsize=1)
def _lcm():
    from diffusers import LCMScheduler

    return LCMScheduler()


def _consistency(a: np.ndarray, ap: np.ndarray, ts: np.ndarray) -> _Coefficients:
    """Multistep consistency sampling: each step's consistency estimate f = c_skip x + c_out x0,
    noised again to the next step's level (none after the last: the plan ends at f)."""
    c_skip, c_out = consistency_scalings(ts)
    return _coefficients(a, cx=np.sqrt(ap) * c_skip, c0=np.sqrt(ap) * c_out, std=np.sqrt(1 - ap),
                         noisy=tuple(bool(v < 1.0) for v in ap))


_COEFFICIENTS = {"ddpm": _ddpm, "ddim": _ddim, "dpmsolver": _dpmsolver, "consistency": _consistency}
SOLVERS = tuple(_COEFFICIENTS)


def build_plan(scheduler, solver: str, ts, device="cpu", dtype=torch.float32) -> Plan:
    """The coefficient table of `solver` along timesteps `ts` (descending; integers or floats,
    alpha_bar linearly interpolated between training steps)."""
    if solver not in SOLVERS:
        raise UserError(f"sampler.solver: unknown solver {solver!r}; known: {', '.join(SOLVERS)}")
    ts = np.asarray(ts, dtype=np.float64)
    T = scheduler.config.num_train_timesteps
    abar_train = scheduler.alphas_cumprod.double().numpy()
    a = np.interp(ts, np.arange(T), abar_train)
    ap = np.concatenate([a[1:], [1.0]])  # after the last step: clean data (alpha_bar 1)
    co = _COEFFICIENTS[solver](a, ap, ts)
    linear = co.cx + co.ce / co.sqrt_1ma  # eps = (x - sqrt(a) x0_raw) / sqrt(1 - a)

    def tensor(v):
        return torch.as_tensor(np.asarray(v, dtype=np.float64), device=device).to(dtype)

    return Plan(
        solver=solver, timesteps=ts, t=tensor(ts), sqrt_a=tensor(co.sqrt_a), sqrt_1ma=tensor(co.sqrt_1ma),
        cx=tensor(co.cx), c0=tensor(co.c0), ce=tensor(co.ce), c1=tensor(co.c1), std=tensor(co.std),
        noisy=co.noisy, var=tensor(_point_variance(a, ap)), linear=tensor(linear),
        clip=bool(scheduler.config.clip_sample),
    )


@lru_cache(maxsize=64)
def _cached_plan(config_json: str, solver: str, steps: int, spacing: str, device: str, dtype,
                 taus: tuple[float, ...] | None) -> Plan:
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(json.loads(config_json))
    plan = build_plan(scheduler, solver, timesteps(scheduler, steps, spacing), device, dtype)
    if taus is None:
        return plan
    if len(taus) != plan.n:
        raise UserError(f"sampler.aligner: {len(taus)} aligned timesteps for a chain of {plan.n} steps")
    return dataclasses.replace(plan, t=torch.tensor(taus, device=device, dtype=dtype))


def get_plan(scheduler, solver: str, steps: int | None, spacing: str, device, dtype=torch.float32,
             taus: tuple[float, ...] | None = None) -> Plan:
    """The plan for a sampler setting, built once and reused: building costs milliseconds that a
    control loop would otherwise pay on every plan. `taus` (DPM-Aligner) replaces the denoiser's
    input timestep of each step and nothing else."""
    steps = scheduler.config.num_train_timesteps if steps is None else steps
    config = json.dumps(dict(scheduler.config), sort_keys=True, default=list)
    taus = None if taus is None else tuple(float(v) for v in taus)
    return _cached_plan(config, solver, steps, canonical_spacing(spacing), str(device), dtype, taus)


def step_rows(plan: Plan, denoiser, cond: torch.Tensor, x: torch.Tensor, k: torch.Tensor, b: torch.Tensor,
              history: torch.Tensor | None, t: torch.Tensor | None = None,
              keep: torch.Tensor | None = None, guide=None) -> torch.Tensor:
    """One denoiser call on rows `x` [M, ...] sitting at steps `k` [M] of samples `b` [M], and the
    noiseless step each row takes. `history` [B, n + 1, ...] keeps every step's data estimate for
    the multistep solver: this call writes its rows there and reads each row's previous step; rows
    not in `keep` [M] (padding) write to the spare slot n instead. `t` [M] overrides the denoiser's
    input timesteps (the aligner trains them through this call). `guide` (`inpaint.BoundInpaint`
    in guidance mode) bends the noise estimates toward committed actions."""
    t = plan.t[k] if t is None else t
    eps = denoiser(x, t, cond[b]) if guide is None else guide.eps(denoiser, x, t, cond[b], k, b)
    x0 = plan.denoise(k, x, eps)
    x0_prev = None
    if history is not None:
        history[b, k if keep is None else torch.where(keep, k, plan.n)] = x0
        x0_prev = history[b, (k - 1).clamp(min=0)]
    return plan.mean(k, x, eps, x0, x0_prev)


def new_history(plan: Plan, x: torch.Tensor) -> torch.Tensor | None:
    """The data-estimate buffer `step_rows` needs (None for one-step solvers): one slot per step,
    and a spare one that padding rows write to."""
    return x.new_zeros((x.shape[0], plan.n + 1, *x.shape[1:])) if plan.multistep else None
