"""A sampler specification: `SamplerConfig`, one line per option saying which samplers take it and
what values it may have, and the one place a spec is checked (`check`, one-line `UserError`s naming
the option) and parsed from a preset string (`parse`: `conf/sampler/<name>.yaml`, `+aligner`,
`:key=value,...`).

Adding an option is one line here (and its use in the sampler that takes it): the lists of
which sampler takes what, the numeric ranges and dp-eval's `options.*` all derive from it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from common.checks import check_number
from common.errors import UserError

# consistency: a distilled student's 1-3 step chain (policy.consistency); the others sample a teacher
DISTILLED = frozenset({"consistency"})
SEQUENTIAL = frozenset({"ddpm", "ddim", "dpmsolver"}) | DISTILLED
PARALLEL = frozenset({"paraddpm", "paraddim", "paradpmsolver"})
PIADM = frozenset({"piadm"})
EVERY = SEQUENTIAL | PARALLEL | PIADM


def opt(takers: frozenset[str], *, policy: bool = False, low=None, high=math.inf):
    """A `SamplerConfig` option (None: the sampler's own default) taken by the samplers `takers`;
    `policy`: applied by the policy around the sampler function, not passed to it; `low`/`high`:
    its numeric range (an int `low`: an integer option)."""
    return field(default=None, metadata={"takers": takers, "policy": policy, "low": low, "high": high})


@dataclass
class SamplerConfig:
    """A sampler and its options; None means the sampler's own default."""

    name: str = "ddpm"
    steps: int | None = opt(EVERY, low=1)  # denoising steps (None: every training step)
    spacing: str | None = opt(EVERY)  # trailing | leading | linspace | quadratic | logsnr
    solver: str | None = opt(PIADM)  # piadm only: ddim (ODE) | ddpm (SDE) | dpmsolver
    # steps per sample per iteration, or auto (policy/autowindow.py)
    window: int | str | None = opt(PARALLEL, low=1)
    tol: float | None = opt(PARALLEL, low=0.0, high=10.0)  # accepted change, relative to each step's noise
    max_iters: int | None = opt(PARALLEL, low=1)  # cap on parallel iterations
    anderson: int | None = opt(PARALLEL, low=0, high=1000)  # Anderson memory (rounds); 0 is plain Picard
    rule: str | None = opt(PARALLEL)  # acceptance rule, paper | x0 | chunk (samplers/acceptance.py)
    floor: float | None = opt(PARALLEL, low=0.0, high=1.0)  # paper/x0 rules: lower bound on a tolerance scale
    blocks: int | None = opt(PIADM, low=1)  # PIADM: blocks the chain is cut into
    picard_iters: int | None = opt(PIADM, low=1)  # PIADM: parallel iterations per block
    # DPM-Aligner timesteps: true (the last learned), sequential, parallel
    aligner: str | None = opt(EVERY, policy=True)
    warm: bool | None = opt(EVERY, policy=True)  # start from the previous control step's chain (policy.warm)
    start: int | None = opt(SEQUENTIAL, low=0)  # warm sequential: the step a plan begins at (Falcon)
    # auto | none | pad | graph (policy/denoiser.py; auto: CUDA graphs)
    capture: str | None = opt(EVERY, policy=True)
    # denoiser weights: fp32 | bf16 | fp16 (the chain stays fp32)
    precision: str | None = opt(EVERY, policy=True)
    inpaint: str | None = opt(EVERY, policy=True)  # committed actions (Real-Time Chunking): replace | guide
    # denoiser calls: torch | openvino | auto (policy/backends.py)
    backend: str | None = opt(EVERY, policy=True)

    @classmethod
    def parse(cls, spec: str) -> "SamplerConfig":
        """The config a preset spec names (`paraddim15+aligner:tol=0.05`), checked (one-line errors
        naming the spec)."""
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException

        name, overrides = _preset_parts(spec)
        path = preset_dir() / f"{name}.yaml"
        if not path.is_file():
            raise UserError(f"samplers: unknown preset {name!r}; known: {', '.join(known_presets())}")
        try:
            cfg = OmegaConf.merge(OmegaConf.structured(cls), OmegaConf.load(path),
                                  OmegaConf.from_dotlist(overrides))
        except OmegaConfBaseException as err:
            raise UserError(f"samplers: {spec!r}: {str(err).splitlines()[0]}") from None
        out = OmegaConf.to_object(cfg)
        check(out)
        return out

    def baseline(self) -> "SamplerConfig":
        """The sequential sampler of the same chain (solver, steps, spacing) that a parallel sampler
        must reproduce, its calls run the same way (`capture`, on the same `backend`) at full
        precision: a 16-bit row is compared with float32, so its action difference is what the
        precision costs. A float32 sequential sampler is its own."""
        return SamplerConfig(name=solver_of(self), steps=self.steps, spacing=self.spacing,
                             aligner=self.aligner, capture=self.capture, backend=self.backend)

    def label(self, num_train_timesteps: int) -> str:
        """A preset spec that names this config, for a sequential one: `ddim10+aligner:backend=auto`."""
        label = f"{self.name}{self.steps or num_train_timesteps}"
        extra = {k: getattr(self, k) for k in ("capture", "backend") if getattr(self, k)}
        if extra.get("backend") == COMMAND_BACKEND:  # every command's default: a label need not say it
            del extra["backend"]
        if aligner_choice(self) == "default":
            label += ALIGNED
        elif aligner_choice(self) is not None:
            extra = {"aligner": self.aligner, **extra}
        return with_options(label, extra)


ALIGNED = "+aligner"

# The backend every command (dp-bench, dp-eval, dp-rollout, dp-quickstart, dp-serve) runs a spec's
# denoiser calls on unless the spec names one: what a robot gets from dp-serve is what is timed.
# The Python API's own default stays torch (`policy.load(...).plan()`: no measurement, no cache).
COMMAND_BACKEND = "auto"


def on_command_backend(cfg: SamplerConfig) -> SamplerConfig:
    """`cfg` with `backend` set to the commands' default where it names none."""
    return cfg if cfg.backend else dataclasses.replace(cfg, backend=COMMAND_BACKEND)


def preset_dir():
    from common.cli import CONF_DIR

    return CONF_DIR / "sampler"


def known_presets() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.yaml"))


def _preset_parts(spec: str) -> tuple[str, list[str]]:
    """`name[+aligner][:k=v,...]` -> (preset name, dotlist overrides)."""
    name, _, overrides = spec.partition(":")
    name = name.strip()
    dotlist = [o.strip() for o in overrides.split(",")] if overrides else []
    if name.endswith(ALIGNED):
        name, dotlist = name[: -len(ALIGNED)], ["aligner=true", *dotlist]
    return name, dotlist


def with_options(spec: str, options: dict) -> str:
    """`spec` with `options` appended as overrides: `ddim10` + {backend: auto} -> `ddim10:backend=auto`."""
    if not options:
        return spec
    return spec + ("," if ":" in spec else ":") + ",".join(f"{k}={v}" for k, v in options.items())


OPTIONS = {f.name: f.metadata for f in dataclasses.fields(SamplerConfig) if f.metadata}
# What the policy applies around the sampler function: where the network runs and what it feeds it.
POLICY_OPTIONS = ("name", *(k for k, m in OPTIONS.items() if m["policy"]))
# The numeric options and their ranges (an int lower bound: an integer option).
INTS = {k: (m["low"], m["high"]) for k, m in OPTIONS.items() if isinstance(m["low"], int)}
FLOATS = {k: (m["low"], m["high"]) for k, m in OPTIONS.items() if isinstance(m["low"], float)}
ALIGNER_OFF, ALIGNER_ON = ("false", "no", "off", "0", "none"), ("true", "yes", "on", "1")
ALIGNER_STRATEGIES = ("sequential", "parallel")


def options_of(name: str) -> frozenset[str]:
    """The options the sampler function `name` takes from a config (the policy's are not among them)."""
    return frozenset(k for k, m in OPTIONS.items() if name in m["takers"] and not m["policy"])


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


def check(cfg: SamplerConfig) -> dict:
    """Every check of a spec, here and nowhere else; returns the options the sampler function
    takes from it (those set). An option the sampler does not take, or a value out of range, is a
    one-line `UserError` naming the field. The policy's options are checked here and applied by
    the policy, which knows its checkpoint and device."""
    check_name(cfg.name)
    _check_policy_options(cfg)
    allowed = options_of(cfg.name)
    options = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in POLICY_OPTIONS or value is None:  # applied by the policy, not the sampler function
            continue
        if f.name not in allowed:
            raise UserError(f"sampler.{f.name}: not an option of {cfg.name} (its options: "
                            f"{', '.join(sorted(allowed))})")
        options[f.name] = value
    _check_values(options)
    return options


# How the policy runs the network (policy/denoiser.py, policy/backends.py): the names a spec may use.
CAPTURES = ("auto", "none", "pad", "graph")
PRECISIONS = ("fp32", "bf16", "fp16")
BACKENDS = ("auto", "torch", "openvino")


def installed(backend: str) -> bool:
    if backend != "openvino":
        return True
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def check_runtime(capture: str | None, precision: str | None) -> None:
    if capture is not None and capture not in CAPTURES:
        raise UserError(f"sampler.capture: {capture!r} is not one of {', '.join(CAPTURES)}")
    if precision is not None and precision not in PRECISIONS:
        raise UserError(f"sampler.precision: {precision!r} is not one of {', '.join(PRECISIONS)}")


def runtime_runs(precision: str | None, capture: str | None) -> bool:
    """Whether the runtime backend (OpenVINO) can run calls so asked: fp32 weights, no CUDA graphs
    (`check_backend` refuses the rest; `backend=auto` leaves them on torch)."""
    return precision in (None, "fp32") and capture != "graph"


def check_backend(backend: str | None, precision: str | None = None, capture: str | None = None) -> None:
    """One-line errors for a backend that does not exist, is not installed, or cannot run the
    precision or capture asked for."""
    if backend is None:
        return
    if backend not in BACKENDS:
        raise UserError(f"sampler.backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend != "openvino":
        return
    if not installed(backend):
        raise UserError(f"sampler.backend: {backend} is not installed here (pip install {backend}); "
                        "backend=torch or auto run without it")
    if precision not in (None, "fp32"):
        raise UserError(f"sampler.backend: {backend} runs the network in fp32; "
                        f"precision={precision} is torch's")
    if capture == "graph":
        raise UserError(f"sampler.backend: {backend} runs on the CPU; capture=graph is for torch on CUDA")


def check_name(name: str) -> None:
    if name not in EVERY:
        raise UserError(f"sampler.name: unknown sampler {name!r}; known: {', '.join(sorted(EVERY))}")


def _check_policy_options(cfg: SamplerConfig) -> None:
    from policy.samplers.inpaint import MODES

    aligner_choice(cfg)
    check_runtime(cfg.capture, cfg.precision)
    check_backend(cfg.backend, cfg.precision, cfg.capture)
    if cfg.inpaint is not None and cfg.inpaint not in MODES:
        raise UserError(f"sampler.inpaint: {cfg.inpaint!r} is not one of {', '.join(MODES)}")
    if "start" in options_of(cfg.name) and bool(cfg.warm) != bool(cfg.start):
        raise UserError("sampler.start: a sequential sampler warm-starts part-way down its chain: set both "
                        f"sampler.warm=true and sampler.start > 0 (now warm={cfg.warm}, start={cfg.start})")


def _check_values(options: dict) -> None:
    from policy.samplers.acceptance import RULES
    from policy.samplers.solvers import SOLVERS, SPACINGS

    def bad(key, why):
        raise UserError(f"sampler.{key}: {options[key]!r} {why}")

    if options.get("spacing", "trailing") not in SPACINGS:
        bad("spacing", f"is not a spacing; known: {', '.join(SPACINGS)}")
    if options.get("solver", "ddim") not in SOLVERS or options.get("solver") in DISTILLED:
        teachers = sorted(set(SOLVERS) - DISTILLED)
        bad("solver", f"is not a solver of a teacher's chain; known: {', '.join(teachers)}")
    if isinstance(options.get("window"), str) and options["window"] != "auto":
        bad("window", "is not a number of steps or auto")
    for key, value in options.items():
        if key in INTS and not (key == "window" and value == "auto") or key in FLOATS:
            # Upper bounds are far above any measured setting; past them a value only costs memory
            # (anderson) or means nothing. `inf` tol would accept every round: a 1-round plan of
            # unconverged actions reported converged.
            check_number(f"sampler.{key}", value, *(INTS.get(key) or FLOATS[key]), integer=key in INTS)
    if options.get("rule", "paper") not in RULES:
        bad("rule", f"is not an acceptance rule; known: {', '.join(RULES)}")
    window = options.get("window", 16)
    if options.get("rule") == "chunk" and window != "auto" and window < options.get("steps", 10**9):
        bad("window",
            "is shorter than the chain: the chunk rule needs a whole-chain window (window >= steps)")
