"""Action samplers. Every sampler is one function

    sampler(denoiser, cond, scheduler, noise, generator, **options) -> SampleResult

over the denoiser contract `eps = denoiser(x, t, cond)`; all of them report the same stats, so
callers never special-case one. `resolve(cfg)` turns a `SamplerConfig` (a preset from
`conf/sampler/` plus overrides) into the function and its options, refusing options the sampler
does not take.

| name | what |
|---|---|
| ddpm, ddim, dpmsolver | sequential DDPM (ancestral), DDIM (eta 0), DPM-Solver++(2M); `warm` + `start`: Falcon |
| paraddpm, paraddim, paradpmsolver | ParaDiGMS Picard iteration over the same chains |
| piadm | PIADM: blocks of fixed parallel Picard iterations (solver=ddim: ODE, ddpm: SDE) |

`aligner=true` (any sampler) feeds the denoiser the DPM-Aligner's learned timesteps of the
sampler's chain (solver, steps, spacing) in place of the chain's own; the policy loads them from
its checkpoint (`policy.aligner`) and hands them to the sampler as `taus`.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from functools import partial
from typing import Callable

from common.errors import UserError
from policy.samplers.result import SampleResult


@dataclass
class SamplerConfig:
    """A sampler and its options; None means the sampler's own default."""

    name: str = "ddpm"
    steps: int | None = None  # denoising steps (None: every training step)
    spacing: str | None = None  # trailing | leading | linspace | quadratic | logsnr
    solver: str | None = None  # piadm only: ddim (ODE) | ddpm (SDE) | dpmsolver
    window: int | str | None = None  # ParaDiGMS: steps evaluated per sample per iteration, or auto (policy/autowindow.py)
    tol: float | None = None  # ParaDiGMS: accepted change, relative to each step's noise
    max_iters: int | None = None  # ParaDiGMS: cap on parallel iterations
    anderson: int | None = None  # ParaDiGMS: Anderson memory (rounds) of the Picard update; 0 is plain Picard
    rule: str | None = None  # ParaDiGMS: acceptance rule, paper | x0 | chunk (samplers/acceptance.py)
    floor: float | None = None  # ParaDiGMS paper/x0 rules: lower bound on each point's tolerance scale
    blocks: int | None = None  # PIADM: blocks the chain is cut into
    picard_iters: int | None = None  # PIADM: parallel iterations per block
    aligner: str | None = None  # DPM-Aligner timesteps: true (the last learned), sequential, parallel
    warm: bool | None = None  # start from the previous control step's chain (policy.warm)
    start: int | None = None  # sequential, warm: the step a warm plan begins at (Falcon; samplers/sequential.py)
    capture: str | None = None  # denoiser calls: auto | none | pad | graph (policy/denoiser.py; auto: graph on CUDA)
    precision: str | None = None  # denoiser weights: fp32 | bf16 | fp16 (the chain's arithmetic stays fp32)
    inpaint: str | None = None  # committed actions (Real-Time Chunking): replace (default) | guide (samplers/inpaint.py)
    backend: str | None = None  # denoiser calls: torch (default) | openvino | auto (policy/backends.py)


# What the policy applies around the sampler function: where the network runs and what it feeds it.
POLICY_OPTIONS = ("name", "aligner", "warm", "capture", "precision", "inpaint", "backend")
ALIGNER_OFF, ALIGNER_ON = ("false", "no", "off", "0", "none"), ("true", "yes", "on", "1")
ALIGNER_STRATEGIES = ("sequential", "parallel")


def aligner_choice(cfg: SamplerConfig) -> str | None:
    """None (off), "default" (the strategy learned last) or a strategy name."""
    value = "false" if cfg.aligner is None else str(cfg.aligner).strip().lower()
    if value in ALIGNER_OFF:
        return None
    if value in ALIGNER_ON:
        return "default"
    if value in ALIGNER_STRATEGIES:
        return value
    raise UserError(f"sampler.aligner: {cfg.aligner!r} is not true, false, {' or '.join(ALIGNER_STRATEGIES)}")


def solver_of(cfg: SamplerConfig) -> str:
    """The sequential sampler whose chain `cfg` walks: ParaDiGMS and PIADM walk their sequential
    twin's chain (so they must reproduce it, and share its aligned timesteps)."""
    name = cfg.name[4:] if cfg.name.startswith("para") else cfg.name
    return (cfg.solver or "ddim") if name == "piadm" else name


def chain_of(cfg: SamplerConfig, num_train_timesteps: int) -> tuple[str, int, str]:
    """(solver, steps, spacing) of the chain a sampler walks, defaults filled in."""
    from policy.samplers.solvers import canonical_spacing

    return solver_of(cfg), cfg.steps or num_train_timesteps, canonical_spacing(cfg.spacing or "trailing")


def call_rows(cfg: SamplerConfig, options: dict, num_train_timesteps: int) -> list[int]:
    """Every row count a one-observation plan's denoiser calls can have, given the sampler
    function's `options` (the window resolved): 1 in a sequential chain; 1..window in ParaDiGMS
    (the window at its chain's end, or the whole window when padded); PIADM's shrinking blocks."""
    import numpy as np

    n = chain_of(cfg, num_train_timesteps)[1]
    defaults = inspect.signature(get_sampler(cfg.name)).parameters  # the sampler's own defaults

    def option(key: str):
        return options.get(key, defaults[key].default)

    if cfg.name.startswith("para"):
        p = min(options.get("window") or n, n)
        return [p] if options.get("pad") else list(range(1, p + 1))
    if cfg.name == "piadm":
        sizes = {len(b) for b in np.array_split(np.arange(n), option("blocks"))}
        return sorted({m - it for m in sizes for it in range(min(option("picard_iters"), m))})
    return [1]


def _registry() -> dict[str, Callable[..., SampleResult]]:
    from policy.samplers.paradigms import paradigms
    from policy.samplers.piadm import piadm
    from policy.samplers.sequential import sequential

    out = {}
    for solver in ("ddpm", "ddim", "dpmsolver"):
        out[solver] = partial(sequential, solver=solver)
        out[f"para{solver}"] = partial(paradigms, solver=solver)
    out["piadm"] = piadm
    return out


def get_sampler(name: str) -> Callable[..., SampleResult]:
    samplers = _registry()
    try:
        return samplers[name]
    except KeyError:
        raise UserError(f"sampler.name: unknown sampler {name!r}; known: {', '.join(sorted(samplers))}") from None


def _parameters(fn: Callable):
    return inspect.signature(fn.func if isinstance(fn, partial) else fn).parameters


def options_of(fn: Callable) -> set[str]:
    """The keyword options a sampler function takes (those not fixed by its registry entry)."""
    fixed = set(fn.keywords) if isinstance(fn, partial) else set()
    internal = {"callback", "taus", "step_noise", "init", "pad", "inpaint"}  # set by the caller, not by a config
    return {p.name for p in _parameters(fn).values() if p.kind is p.KEYWORD_ONLY and p.name not in fixed | internal}


def takes_init(fn: Callable) -> bool:
    """Whether a sampler starts from a chain guess (`init`), so it can be warm-started."""
    return "init" in _parameters(fn)


def takes_inpaint(fn: Callable) -> bool:
    """Whether a sampler can pull its chain toward committed actions (`samplers.inpaint`)."""
    return "inpaint" in _parameters(fn)


def takes_pad(fn: Callable) -> bool:
    """Whether a sampler can pad its rounds to a fixed shape (for a captured denoiser)."""
    return "pad" in _parameters(fn)


def resolve(cfg: SamplerConfig) -> tuple[Callable[..., SampleResult], dict]:
    """The sampler function `cfg` names and the options it sets. An option the sampler does not
    take, or a value out of range, is a one-line `UserError` naming the field. The aligner
    switch is checked here but applied by the policy, which knows its checkpoint; so are `capture`,
    `precision` and `backend`, which say how the policy runs its network (`policy.denoiser`)."""
    from policy import backends, denoiser

    fn = get_sampler(cfg.name)
    allowed = options_of(fn)
    aligner_choice(cfg)
    denoiser.check(cfg.capture, cfg.precision)
    backends.check(cfg.backend, cfg.precision, cfg.capture)
    from policy.samplers.inpaint import MODES

    if cfg.inpaint is not None and cfg.inpaint not in MODES:
        raise UserError(f"sampler.inpaint: {cfg.inpaint!r} is not one of {', '.join(MODES)}")
    if cfg.warm and not takes_init(fn):
        raise UserError(f"sampler.warm: {cfg.name} has no chain to warm-start (the ParaDiGMS and PIADM samplers have)")
    if "start" in allowed and bool(cfg.warm) != bool(cfg.start):
        raise UserError("sampler.start: a sequential sampler warm-starts part-way down its chain: set both "
                        f"sampler.warm=true and sampler.start > 0 (now warm={cfg.warm}, start={cfg.start})")
    options = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in POLICY_OPTIONS or value is None:  # applied by the policy, not the sampler function
            continue
        if f.name not in allowed:
            raise UserError(f"sampler.{f.name}: not an option of {cfg.name} (its options: {', '.join(sorted(allowed))})")
        options[f.name] = value
    _check(cfg.name, options)
    return fn, options


# The numeric options and their ranges, checked here and nowhere else (`resolve`): a value that
# is not a number of the option's kind, not finite, or outside its range is a one-line error
# naming the option. `nan` passes every `<` test and `inf` accepts every round (a 1-round plan of
# unconverged actions reported converged), so finiteness is checked first. Upper bounds are far
# above any measured setting; past them a value only costs memory (anderson) or means nothing.
INTS = {"steps": (1, None), "window": (1, None), "max_iters": (1, None), "blocks": (1, None),
        "picard_iters": (1, None), "start": (0, None), "anderson": (0, 1000)}
FLOATS = {"tol": (0.0, 10.0), "floor": (0.0, 1.0)}


def _check_number(key: str, value, integer: bool, low, high) -> None:
    import math
    import numbers

    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise UserError(f"sampler.{key}: {value!r} is not {'an integer' if integer else 'a number'}")
    if not math.isfinite(value):
        raise UserError(f"sampler.{key}: {value!r} is not a finite number")
    if value < low:
        raise UserError(f"sampler.{key}: {value!r} must be " + ("at least 1" if low == 1 else f">= {low:g}"))
    if high is not None and value > high:
        raise UserError(f"sampler.{key}: {value!r} must be <= {high:g}")


def _check(name: str, options: dict) -> None:
    from policy.samplers.solvers import SOLVERS, SPACINGS

    def bad(key, why):
        raise UserError(f"sampler.{key}: {options[key]!r} {why}")

    if options.get("spacing", "trailing") not in SPACINGS:
        bad("spacing", f"is not a spacing; known: {', '.join(SPACINGS)}")
    if options.get("solver", "ddim") not in SOLVERS:
        bad("solver", f"is not a solver; known: {', '.join(SOLVERS)}")
    if isinstance(options.get("window"), str) and options["window"] != "auto":
        bad("window", "is not a number of steps or auto")
    for key, value in options.items():
        if key in INTS and not (key == "window" and value == "auto"):
            _check_number(key, value, True, *INTS[key])
        elif key in FLOATS:
            _check_number(key, value, False, *FLOATS[key])
    from policy.samplers.acceptance import RULES

    if options.get("rule", "paper") not in RULES:
        bad("rule", f"is not an acceptance rule; known: {', '.join(RULES)}")
    if options.get("rule") == "chunk" and options.get("window", 16) != "auto" and \
            options.get("window", 16) < options.get("steps", 10**9):
        bad("window", "is shorter than the chain: the chunk rule needs a whole-chain window (window >= steps)")


__all__ = ["SampleResult", "SamplerConfig", "aligner_choice", "chain_of", "get_sampler", "options_of", "resolve",
           "solver_of", "takes_inpaint", "takes_pad"]
