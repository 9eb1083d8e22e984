"""The noise schedule: diffusers' DDPMScheduler configuration is the single source of its
coefficients (betas, alphas_cumprod) for training and for every sampler."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler


@dataclass
class ScheduleConfig:
    num_train_timesteps: int = 100
    beta_schedule: str = "squaredcos_cap_v2"
    clip_sample: bool = True  # clip predicted x0 to [-1, 1], the normalized action range


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
