"""The denoiser of Diffusion Policy (Chi et al., RSS 2023): a 1-D temporal conditional UNet.

Contract: `eps = net(x, t, cond)` with `x: [B, horizon, action_dim]`, `t: [B]` float diffusion
steps (continuous: aligned, non-integer timesteps are valid), `cond: [B, cond_dim]` (the flattened
normalized observation history). Residual conv blocks are FiLM-conditioned on the observation
and on a sinusoidal embedding of t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from common.errors import UserError


@dataclass
class UNetConfig:
    down_dims: list[int] = field(default_factory=lambda: [64, 128, 256])  # paper: 256/512/1024
    step_embed_dim: int = 128
    kernel_size: int = 5
    n_groups: int = 8

    # Far above any published Diffusion Policy UNet (256/512/1024 channels, kernel 5, embedding
    # 128-256); past them a value only costs memory, a channel count of 10**6 more than a machine has.
    MAX_CHANNELS = 8192
    MAX_KERNEL = 63

    def check(self, where: str = "policy.unet") -> None:
        """What the network needs of these numbers, or a one-line `UserError` naming the key:
        at least one level of positive channel counts, an odd kernel (its padding of k // 2 keeps
        the length only then: an even one grows every conv by a step), a group count dividing
        every level's channels (GroupNorm), an even step embedding of at least 4 (half sin, half
        cos, frequencies spread over half - 1 intervals)."""
        from common.checks import check_number

        if not isinstance(self.down_dims, (list, tuple)) or not self.down_dims:
            raise UserError(f"{where}.down_dims: {self.down_dims!r} must list at least one channel count")
        for i, c in enumerate(self.down_dims):
            check_number(f"{where}.down_dims[{i}]", c, 1, self.MAX_CHANNELS, integer=True)
        check_number(f"{where}.kernel_size", self.kernel_size, 1, self.MAX_KERNEL, integer=True)
        if self.kernel_size % 2 == 0:
            raise UserError(f"{where}.kernel_size: {self.kernel_size} must be odd (a padded conv keeps "
                            "the horizon's length only with an odd kernel)")
        check_number(f"{where}.n_groups", self.n_groups, 1, integer=True)
        uneven = [c for c in self.down_dims if c % self.n_groups]
        if uneven:
            raise UserError(f"{where}.n_groups: {self.n_groups} does not divide the channel count "
                            f"{uneven[0]} of down_dims {list(self.down_dims)} (GroupNorm splits each "
                            "level's channels into n_groups groups)")
        check_number(f"{where}.step_embed_dim", self.step_embed_dim, 4, self.MAX_CHANNELS, integer=True)
        if self.step_embed_dim % 2:
            raise UserError(f"{where}.step_embed_dim: {self.step_embed_dim} must be even (half sin, half cos "
                            "features)")


class SinusoidalStepEmbedding(nn.Module):
    """Transformer-style sin/cos features of a float step (no rounding, so t=37.4 is valid)."""

    def __init__(self, dim: int):
        super().__init__()
        half = dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / (half - 1))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t.float()[:, None] * self.freqs[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class ConvBlock(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel: int, groups: int):
        super().__init__(nn.Conv1d(c_in, c_out, kernel, padding=kernel // 2), nn.GroupNorm(groups, c_out),
                         nn.Mish())


class FiLMResidualBlock(nn.Module):
    """Two conv blocks; the condition scales and shifts the features between them (FiLM)."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int, kernel: int, groups: int):
        super().__init__()
        self.conv1 = ConvBlock(c_in, c_out, kernel, groups)
        self.conv2 = ConvBlock(c_out, c_out, kernel, groups)
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * c_out))
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        scale, shift = self.film(cond).unsqueeze(-1).chunk(2, dim=1)
        h = self.conv2(scale * h + shift)
        return h + self.skip(x)


class ConditionalUnet1D(nn.Module):
    def __init__(self, action_dim: int, cond_dim: int, config: UNetConfig | None = None):
        super().__init__()
        cfg = config or UNetConfig()
        k, g, dims = cfg.kernel_size, cfg.n_groups, [action_dim, *cfg.down_dims]
        e = cfg.step_embed_dim
        self.step_embedding = nn.Sequential(
            SinusoidalStepEmbedding(e), nn.Linear(e, 4 * e), nn.Mish(), nn.Linear(4 * e, e)
        )
        c = e + cond_dim
        levels = list(zip(dims[:-1], dims[1:]))
        self.down = nn.ModuleList()
        for i, (a, b) in enumerate(levels):
            last = i == len(levels) - 1
            self.down.append(nn.ModuleList([
                FiLMResidualBlock(a, b, c, k, g),
                FiLMResidualBlock(b, b, c, k, g),
                nn.Identity() if last else nn.Conv1d(b, b, 3, stride=2, padding=1),
            ]))
        mid = dims[-1]
        self.mid = nn.ModuleList([FiLMResidualBlock(mid, mid, c, k, g), FiLMResidualBlock(mid, mid, c, k, g)])
        self.up = nn.ModuleList()
        for a, b in reversed(levels[1:]):  # one upsampling per downsampling
            self.up.append(nn.ModuleList([
                FiLMResidualBlock(2 * b, a, c, k, g),
                FiLMResidualBlock(a, a, c, k, g),
                nn.ConvTranspose1d(a, a, 4, stride=2, padding=1),
            ]))
        start = cfg.down_dims[0]
        self.head = nn.Sequential(ConvBlock(start, start, k, g), nn.Conv1d(start, action_dim, 1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        e = self.step_embedding[0](t).to(x.dtype)  # sin/cos in float32 at any precision, then the network's
        for i in range(1, len(self.step_embedding)):
            e = self.step_embedding[i](e)
        c = torch.cat([e, cond], dim=-1)
        h = x.transpose(1, 2)  # [B, action_dim, horizon]: convolve over time
        skips = []
        for block1, block2, downsample in self.down:
            h = block2(block1(h, c), c)
            skips.append(h)
            h = downsample(h)
        for block in self.mid:
            h = block(h, c)
        for block1, block2, upsample in self.up:
            h = torch.cat([h, skips.pop()], dim=1)
            h = upsample(block2(block1(h, c), c))
        return self.head(h).transpose(1, 2)
