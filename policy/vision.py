"""The observation encoder of image policies: camera frames + proprioception -> the condition.

The recipe of Diffusion Policy's image experiments (after robomimic): one ResNet-18 per camera,
trained from scratch, with GroupNorm in place of BatchNorm (EMA weights and batch statistics do
not mix), spatial-softmax pooling into 32 keypoints, random crops (84 -> 76) in training and the
centre crop at evaluation. `width` scales the ResNet's channels: 64 is ResNet-18, 16 the lighter
variant that trains in reasonable time on 2 CPU cores (docs/images.md measures both).

Written here rather than taken from torchvision: torchvision's releases on the registry pin a
torch older than the one this project locks, and the network is 40 lines. The layer shapes are
torchvision's `resnet18` (weights=None, norm_layer=GroupNorm(c // 16, c)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class VisionConfig:
    """`policy.vision`: how an image policy encodes each camera (ignored by state policies)."""

    width: int = 64  # ResNet-18's first stage channels: 64 the recipe, 16 the light variant
    keypoints: int = 32  # spatial-softmax keypoints per camera
    feature_dim: int = 64  # per camera, after the keypoints
    crop: int = 76  # random crop in training, centre crop in planning (of the obs.size frame)


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(max(1, c // 16), c)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = _norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = _norm(c_out)
        self.downsample = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), _norm(c_out))
                           if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.downsample(x))


class SpatialSoftmax(nn.Module):
    """Features [B, C, H, W] -> the expected (x, y) image position of each of `k` learned
    keypoint maps, [B, 2k] in [-1, 1] (robomimic's SpatialSoftmax, temperature 1)."""

    def __init__(self, channels: int, k: int):
        super().__init__()
        self.keypoints = nn.Conv2d(channels, k, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.keypoints(x)
        b, k, hh, ww = h.shape
        attention = torch.softmax(h.flatten(2), dim=-1).view(b, k, hh, ww)
        ys = torch.linspace(-1, 1, hh, device=x.device, dtype=h.dtype)
        xs = torch.linspace(-1, 1, ww, device=x.device, dtype=h.dtype)
        ex = (attention.sum(2) * xs).sum(-1)
        ey = (attention.sum(3) * ys).sum(-1)
        return torch.cat([ex, ey], dim=-1)


class CameraEncoder(nn.Module):
    """uint8-valued frames [B, H, W, 3] (as float) -> features [B, feature_dim]."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        w = cfg.width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 7, 2, 3, bias=False), _norm(w), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        stages, c = [], w
        for i, c_out in enumerate((w, 2 * w, 4 * w, 8 * w)):
            stages += [BasicBlock(c, c_out, 1 if i == 0 else 2), BasicBlock(c_out, c_out, 1)]
            c = c_out
        self.stages = nn.Sequential(*stages)
        self.pool = SpatialSoftmax(c, cfg.keypoints)
        self.head = nn.Linear(2 * cfg.keypoints, cfg.feature_dim)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames.permute(0, 3, 1, 2) / 127.5 - 1.0  # HWC 0..255 -> CHW [-1, 1]
        return self.head(self.pool(self.stages(self.stem(x))))


def crop(frames: torch.Tensor, size: int, generator: torch.Generator | None = None,
         random: bool = False) -> torch.Tensor:
    """Square crops of `size` from frames [N, H, W, C]: the centre, or with `random` one offset
    per frame (Diffusion Policy's training augmentation)."""
    n, h, w, _ = frames.shape
    if size >= h and size >= w:
        return frames
    if not random:
        top, left = (h - size) // 2, (w - size) // 2
        return frames[:, top:top + size, left:left + size]
    top = torch.randint(0, h - size + 1, (n,), generator=generator, device=frames.device)
    left = torch.randint(0, w - size + 1, (n,), generator=generator, device=frames.device)
    rows = (top[:, None] + torch.arange(size, device=frames.device))[:, :, None]  # [n, size, 1]
    cols = (left[:, None] + torch.arange(size, device=frames.device))[:, None, :]  # [n, 1, size]
    return frames[torch.arange(n, device=frames.device)[:, None, None], rows, cols]


class ObsEncoder(nn.Module):
    """Flat observations [B, n_obs, D] (the env's layout: proprioception, then each camera's
    pixels) -> the condition [B, n_obs * (low_dim + cameras * feature_dim)]. The low-dim part is
    normalized by the caller; this module sees it already in [-1, 1]."""

    def __init__(self, cfg: VisionConfig, low_dim: int, image_keys: list[str],
                 image_shape: tuple[int, int, int]):
        super().__init__()
        self.cfg, self.low_dim, self.image_keys, self.image_shape = (cfg, low_dim, list(image_keys),
                                                                     tuple(image_shape))
        self.cameras = nn.ModuleDict({key: CameraEncoder(cfg) for key in self.image_keys})

    @property
    def out_dim(self) -> int:
        return self.low_dim + len(self.image_keys) * self.cfg.feature_dim

    def frames(self, obs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each camera's frames [B * n_obs, H, W, 3] out of the flat observations."""
        pixels = obs[..., self.low_dim:].reshape(-1, len(self.image_keys), *self.image_shape)
        return {key: pixels[:, i] for i, key in enumerate(self.image_keys)}

    def forward(self, low_dim: torch.Tensor, obs: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
        return self.encode(low_dim, obs, generator, random=self.training)

    def encode(self, low_dim: torch.Tensor, obs: torch.Tensor, generator: torch.Generator | None = None,
               random: bool = False) -> torch.Tensor:
        """The condition with random crops (from `generator`) or centre crops, whatever the mode."""
        b, n = obs.shape[:2]
        parts = [low_dim.reshape(b * n, -1)]
        for key, frames in self.frames(obs).items():
            frames = crop(frames, self.cfg.crop, generator, random=random)
            parts.append(self.cameras[key](frames))
        return torch.cat(parts, dim=-1).reshape(b, -1)


class PlanningEncoder(nn.Module):
    """`encoder`'s planning path as a module of tensors only, `cond = module(low_dim, obs)` with
    centre crops: what a runtime converts (`policy.backends`), with no branch on the mode."""

    def __init__(self, encoder: ObsEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, low_dim: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        return self.encoder.encode(low_dim, obs)
