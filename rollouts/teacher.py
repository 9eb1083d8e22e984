"""`teacher:<preset>` rows: a consistency student's teacher, sampled beside the student in one run.

A distilled student (`dp-distill`) plans with consistency1..3 only. `dp-bench checkpoint=<student>
"samplers=[consistency1,teacher:ddim1,teacher:ddpm100]"` times the teacher's samplers in the same
run (interleaved plan by plan, on the same histories and noise), and `fidelity=true` measures the
student's plans against the teacher's DDPM-100. The teacher is the checkpoint the student's
`meta["distilled"]` names, loaded once per process on the student's device.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from common.errors import UserError

PREFIX = "teacher:"


def split(spec: str) -> tuple[str, str]:
    """(`teacher:` or "", the preset spec without it)."""
    return (PREFIX, spec[len(PREFIX):]) if spec.startswith(PREFIX) else ("", spec)


def teacher_of(pol):
    """The policy that student `pol` was distilled from; a one-line error for a diffusion policy or
    a teacher that is not on this machine."""
    if not pol.distilled:
        raise UserError(f"samplers: {PREFIX}<preset> samples a consistency student's teacher, and "
                        f"{pol.meta.get('checkpoint')} is a diffusion policy: name its samplers without "
                        f"{PREFIX}")
    path = str(pol.distilled.get("teacher"))
    if not Path(path).exists():
        raise UserError(f"{PREFIX} {path} (the teacher {pol.meta.get('checkpoint')} was distilled from) "
                        "is not here; run from the folder it was distilled in, or drop the teacher rows")
    return _load(path, str(pol.device))


@cache  # one teacher per (path, device) in a process, however many rows sample it
def _load(path: str, device: str):
    import policy

    return policy.load(path, device=device)


def row_policy(pol, spec: str) -> tuple[object, str]:
    """The policy a row's spec samples (`pol`, or its teacher for `teacher:<preset>`) and the
    spec without the prefix."""
    prefix, bare = split(spec)
    return (teacher_of(pol) if prefix else pol), bare
