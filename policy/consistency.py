"""Consistency distillation (`dp-distill`): a student that plans in 1-3 network calls, trained from
a diffusion policy (the teacher), as Consistency Policy (Prasad et al., RSS 2024) does.

Consistency *distillation* rather than consistency training or CTM: the teacher is already
trained, and its ODE steps give the student a low-variance target from the first step, where
consistency training from data alone needs long schedules; CTM's anytime-to-anytime targets and
GAN term buy few-step quality the one-step target here does not need. The form is Latent
Consistency Models' discrete-time one, which fits an epsilon-prediction DDPM teacher as it is:

- the student is the teacher's network, initialized from its EMA weights; its noise estimate
  defines the consistency function f(x, t) = c_skip(t) x + c_out(t) x0(x, t), with diffusers'
  `LCMScheduler` boundary scalings (f(x, 0) = x; `policy.samplers.solvers.consistency_scalings`);
- a training row is a demonstration chunk noised to a step t (skip <= t < T) and the teacher's
  DDIM step from t to t - skip: the student at (x_t, t) must match a target network at the
  teacher's (x_{t-skip}, t - skip);
- the target network is an EMA of the student (diffusers' `EMAModel`, decay `target_decay`;
  0 makes it the student itself, without gradient, as improved consistency training does);
- the loss is the squared distance between the two consistency estimates.

Sampling is `consistency1`..`consistency3` (`policy.samplers`: the "consistency" solver, a
sequential chain). The student's checkpoint is a policy checkpoint like any other (every command
loads it), with `meta["distilled"]` saying what it was distilled from and how.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from common.errors import UserError
from policy.diffusion import TrainingLoss
from policy.samplers.solvers import consistency_scalings
from policy.schedule import add_noise


@dataclass
class ConsistencySpec:
    """How a student is distilled: what its `meta["distilled"]` records (teacher: a path)."""

    teacher: str
    skip: int = 5  # training steps the teacher's DDIM step spans (t -> t - skip)
    target_decay: float = 0.95  # the target network's EMA decay (Latent Consistency Models' 0.95)

    def check(self, num_train_timesteps: int) -> None:
        from common.checks import check_number

        check_number("skip", self.skip, 1, num_train_timesteps - 1, integer=True)
        check_number("target_decay", self.target_decay, 0.0, 1.0)
        if self.target_decay >= 1.0:
            raise UserError(f"target_decay: {self.target_decay} must be below 1 (a target that never moves)")


def x0_of(scheduler, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, clip: bool) -> torch.Tensor:
    """The data estimate at steps `t` [B] (integers) from a noise estimate, clipped as the schedule clips."""
    abar = scheduler.alphas_cumprod.to(x.device)[t].reshape(-1, *([1] * (x.dim() - 1)))
    x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
    return x0.clamp(-1.0, 1.0) if clip else x0


class ConsistencyLoss(TrainingLoss):
    """The distillation objective as a module's forward (as `TrainingLoss`, so DistributedDataParallel
    can wrap it): `student` (a DiffusionPolicy, trained), `teacher` (frozen), and the target network."""

    def __init__(self, student, teacher, spec: ConsistencySpec):
        super().__init__(student)
        from diffusers.training_utils import EMAModel

        self.spec = spec
        self.teacher = [teacher]  # a list: not a submodule (its weights are no part of the student's)
        for p in teacher.parameters():
            p.requires_grad_(False)
        teacher.eval()
        self.target_net = [copy.deepcopy(student.net).requires_grad_(False)]
        self.target = EMAModel(student.net.parameters(), decay=spec.target_decay, use_ema_warmup=False,
                               min_decay=spec.target_decay)

    def forward(self, obs, action, generator=None, part=None):
        return self.loss_of(self.policy.net, self.target_net[0], obs, action, generator, part)

    def consistency(self, net, x, t, cond) -> torch.Tensor:
        """f(x, t) = c_skip x + c_out x0 by network `net`'s noise estimate."""
        c_skip, c_out = (c.reshape(-1, *([1] * (x.dim() - 1))) for c in consistency_scalings(t.float()))
        sched, clip = self.policy.scheduler, bool(self.policy.cfg.schedule.clip_sample)
        return c_skip * x + c_out * x0_of(sched, x, t, net(x, t.float(), cond), clip)

    def loss_of(self, net, target_net, obs, action, generator=None, part=None) -> torch.Tensor:
        policy, teacher, skip = self.policy, self.teacher[0], self.spec.skip
        x0 = policy.normalizer.normalize("action", action)
        start, total = part if part is not None else (0, x0.shape[0])
        rows = slice(start, start + x0.shape[0])
        T = policy.cfg.schedule.num_train_timesteps
        noise = torch.randn((total, *x0.shape[1:]), generator=generator, device=x0.device)[rows]
        t = torch.randint(skip, T, (total,), generator=generator, device=x0.device)[rows]
        x_t = add_noise(policy.scheduler, x0, noise, t)
        cond = policy.condition(obs, generator)
        with torch.no_grad():
            # the teacher's DDIM step (eta 0) from t to t - skip
            eps = teacher.net(x_t, t.float(), teacher.condition(obs))
            clip = bool(teacher.cfg.schedule.clip_sample)
            lo = t - skip
            a_lo = teacher.scheduler.alphas_cumprod.to(x0.device)[lo].reshape(-1, *([1] * (x0.dim() - 1)))
            x_lo = a_lo.sqrt() * x0_of(teacher.scheduler, x_t, t, eps, clip) + (1 - a_lo).sqrt() * eps
            target = self.consistency(target_net, x_lo, lo, cond.detach())
        return nn.functional.mse_loss(self.consistency(net, x_t, t, cond), target)

    def extra_state(self) -> dict:
        return {"target": self.target.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.target.load_state_dict(state["target"])
        self.target.copy_to(self.target_net[0].parameters())

    def after_step(self) -> None:
        """Move the target network toward the student (each optimizer step)."""
        self.target.step(self.policy.net.parameters())
        self.target.copy_to(self.target_net[0].parameters())
