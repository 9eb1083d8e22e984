"""Sampler presets: `conf/sampler/<name>.yaml`, optionally with overrides, as one string.

`paraddpm100` is the preset; `paraddpm100:window=8,tol=0.05` is it with two options changed;
`ddim5+aligner` is it with the DPM-Aligner's timesteps (`aligner=true`), e.g.
`paraddim15+aligner:tol=0.05` or `ddim5:aligner=parallel` for the parallel strategy's taus.
"""

from __future__ import annotations

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common.cli import CONF_DIR
from common.errors import UserError
from policy.samplers import SamplerConfig, resolve, solver_of

ALIGNED = "+aligner"


def known_presets() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "sampler").glob("*.yaml"))


def sampler_preset(spec: str) -> SamplerConfig:
    """The sampler config a preset spec names, checked (one-line errors naming the spec)."""
    name, _, overrides = spec.partition(":")
    name = name.strip()
    if name.endswith(ALIGNED):
        name = name[: -len(ALIGNED)]
        overrides = ",".join(["aligner=true", *([overrides] if overrides else [])])
    path = CONF_DIR / "sampler" / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"samplers: unknown preset {name!r}; known: {', '.join(known_presets())}")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(SamplerConfig), OmegaConf.load(path))
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([o.strip() for o in overrides.split(",")]))
    except OmegaConfBaseException as err:
        raise UserError(f"samplers: {spec!r}: {str(err).splitlines()[0]}") from None
    out = OmegaConf.to_object(cfg)
    resolve(out)
    return out


def baseline_of(cfg: SamplerConfig) -> SamplerConfig:
    """The sequential sampler of the same chain (solver, steps, spacing) that a parallel sampler
    must reproduce, its calls run the same way (`capture`, on the same `backend`) at full
    precision: a 16-bit row is compared with float32, so its action difference is what the
    precision costs. A float32 sequential sampler is its own."""
    return SamplerConfig(name=solver_of(cfg), steps=cfg.steps, spacing=cfg.spacing, aligner=cfg.aligner,
                         capture=cfg.capture, backend=cfg.backend)
