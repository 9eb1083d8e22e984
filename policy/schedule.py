"""The noise schedule: diffusers' DDPMScheduler configuration is the single source of its
coefficients (betas, alphas_cumprod) for training and for every sampler."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler

# The beta schedules diffusers' DDPMScheduler builds (any other raises NotImplementedError there).
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")


@dataclass
class ScheduleConfig:
    num_train_timesteps: int = 100
    beta_schedule: str = "squaredcos_cap_v2"
    clip_sample: bool = True  # clip predicted x0 to [-1, 1], the normalized action range

    # Diffusion Policy trains on 100 steps and image diffusion on 1000; a table of 10**9 betas is
    # gigabytes before the first step.
    MAX_TIMESTEPS = 10_000

    def check(self, where: str = "policy.schedule") -> None:
        """A step count in 1..MAX_TIMESTEPS and a beta schedule diffusers' DDPMScheduler knows,
        or a one-line `UserError` naming the key."""
        from common.checks import check_number
        from common.errors import UserError

        check_number(f"{where}.num_train_timesteps", self.num_train_timesteps, 1, self.MAX_TIMESTEPS,
                     integer=True)
        if self.beta_schedule not in BETA_SCHEDULES:
            raise UserError(f"{where}.beta_schedule: {self.beta_schedule!r} is not one of "
                            f"{', '.join(BETA_SCHEDULES)} (diffusers' DDPMScheduler)")


def make_scheduler(cfg: ScheduleConfig) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        clip_sample=cfg.clip_sample,
        prediction_type="epsilon",
    )


def add_noise(scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor,
              t: torch.Tensor) -> torch.Tensor:
    """x_t ~ q(x_t | x0) for integer steps t (one per sample)."""
    return scheduler.add_noise(x0, noise, t.long())
