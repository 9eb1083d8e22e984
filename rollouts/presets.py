"""Sampler presets: `conf/sampler/<name>.yaml`, optionally with overrides, as one string.

`paraddpm100` is the preset; `paraddpm100:window=8,tol=0.05` is it with two options changed;
`ddim5+aligner` is it with the DPM-Aligner's timesteps (`aligner=true`), e.g.
`paraddim15+aligner:tol=0.05` or `ddim5:aligner=parallel` for the parallel strategy's taus.
"""

from __future__ import annotations

from policy.samplers import SamplerConfig
from policy.samplers.spec import ALIGNED, known_presets

__all__ = ["ALIGNED", "baseline_of", "known_presets", "sampler_preset"]


def sampler_preset(spec: str) -> SamplerConfig:
    """The sampler config a preset spec names, checked (one-line errors naming the spec)."""
    return SamplerConfig.parse(spec)


def baseline_of(cfg: SamplerConfig) -> SamplerConfig:
    """The sequential sampler that a parallel sampler must reproduce (`SamplerConfig.baseline`)."""
    return cfg.baseline()
