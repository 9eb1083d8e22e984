"""Action samplers. Every sampler is one function

    sampler(denoiser, cond, chain, **options) -> SampleResult

over the denoiser contract `eps = denoiser(x, t, cond)` and a prebuilt `chain.Chain` (its step
table, noise, guess and committed actions); all of them report the same stats, so callers never
special-case one. `get_sampler(name)` is the entry that builds the chain from its pieces;
`resolve(cfg)` turns a `SamplerConfig` (`spec.py`: a preset from `conf/sampler/` plus overrides)
into that entry and its options, refusing options the sampler does not take.

| name | what |
|---|---|
| ddpm, ddim, dpmsolver | sequential DDPM (ancestral), DDIM (eta 0), DPM-Solver++(2M); `start`: Falcon |
| consistency | a distilled student's multistep consistency sampling, 1-3 steps (`policy.consistency`) |
| paraddpm, paraddim, paradpmsolver | ParaDiGMS Picard iteration over the same chains |
| piadm | PIADM: blocks of fixed parallel Picard iterations (solver=ddim: ODE, ddpm: SDE) |

`aligner=true` (any sampler) feeds the denoiser the DPM-Aligner's learned timesteps of the
sampler's chain (solver, steps, spacing) in place of the chain's own; the policy loads them from
its checkpoint (`policy.aligner`) and hands them to the sampler as `taus`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

from policy.samplers.result import SampleResult
from policy.samplers.spec import (ALIGNER_OFF, ALIGNER_ON, ALIGNER_STRATEGIES, DISTILLED, FLOATS, INTS,
                                  PARALLEL, POLICY_OPTIONS, SEQUENTIAL, SamplerConfig, aligner_choice,
                                  chain_of, check, check_name, options_of, solver_of)

CHAIN_OPTIONS = ("solver", "steps", "spacing", "taus", "step_noise", "init", "inpaint")  # build_chain's


@dataclass(frozen=True)
class Sampler:
    """A sampler by name: its function over a `Chain` and the chain it walks (`solver` None: the
    `solver` option's, PIADM). Called with the pieces, it builds the chain and runs."""

    name: str
    run: Callable[..., SampleResult]
    solver: str | None

    def __call__(self, denoiser, cond, scheduler, noise, generator=None, **options) -> SampleResult:
        from policy.samplers.chain import build_chain

        pieces = {k: options.pop(k) for k in CHAIN_OPTIONS if k in options}
        pieces["solver"] = self.solver or pieces.get("solver") or "ddim"
        chain = build_chain(scheduler, noise, generator, **pieces)
        if self.name in PARALLEL:
            options = _picard_options(options)
        return self.run(denoiser, cond, chain, **options)

    @property
    def options(self) -> frozenset[str]:
        """The options it takes from a config."""
        return options_of(self.name)

    def default(self, key: str):
        return inspect.signature(self.run).parameters[key].default


def _picard_options(options: dict) -> dict:
    """ParaDiGMS's rule, tol and floor as one acceptance `Rule`."""
    from policy.samplers.acceptance import Rule

    fields = {"rule": "name", "tol": "tol", "floor": "floor"}  # the rest are Rule's own defaults
    rule = Rule(**{field: options.pop(key) for key, field in fields.items() if key in options})
    return {**options, "rule": rule}


def get_sampler(name: str) -> Sampler:
    from policy.samplers.paradigms import paradigms
    from policy.samplers.piadm import piadm
    from policy.samplers.sequential import sequential

    check_name(name)
    if name in SEQUENTIAL:
        return Sampler(name, sequential, name)
    if name in PARALLEL:
        return Sampler(name, paradigms, name[4:])
    return Sampler(name, piadm, None)


def takes_pad(sampler: Sampler) -> bool:
    """Whether a sampler can pad its rounds to a fixed shape (for a captured denoiser)."""
    return sampler.name in PARALLEL


def call_rows(cfg: SamplerConfig, options: dict, num_train_timesteps: int) -> list[int]:
    """Every row count a one-observation plan's denoiser calls can have, given the sampler
    function's `options` (the window resolved): 1 in a sequential chain; 1..window in ParaDiGMS
    (the window at its chain's end, or the whole window when padded); PIADM's shrinking blocks."""
    import numpy as np

    n = chain_of(cfg, num_train_timesteps)[1]
    sampler = get_sampler(cfg.name)

    def option(key: str):
        return options.get(key, sampler.default(key))  # the sampler's own default

    if cfg.name in PARALLEL:
        p = min(options.get("window") or n, n)
        return [p] if options.get("pad") else list(range(1, p + 1))
    if cfg.name == "piadm":
        sizes = {len(b) for b in np.array_split(np.arange(n), option("blocks"))}
        return sorted({m - it for m in sizes for it in range(min(option("picard_iters"), m))})
    return [1]


def resolve(cfg: SamplerConfig) -> tuple[Sampler, dict]:
    """The sampler `cfg` names and the options it sets, checked (`spec.check`)."""
    options = check(cfg)
    return get_sampler(cfg.name), options


__all__ = ["ALIGNER_OFF", "ALIGNER_ON", "ALIGNER_STRATEGIES", "DISTILLED", "FLOATS", "INTS", "POLICY_OPTIONS",
           "SampleResult", "Sampler", "SamplerConfig", "aligner_choice", "call_rows", "chain_of",
           "get_sampler", "options_of", "resolve", "solver_of", "takes_pad"]
