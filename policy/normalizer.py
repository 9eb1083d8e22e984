"""Per-dimension min-max normalization to [-1, 1], fitted on training data, saved in checkpoints."""

from __future__ import annotations

import numpy as np
import torch

# A dimension whose range is (almost) zero is only centred: dividing by its range would blow
# numerical noise up to the full [-1, 1] interval.
MIN_RANGE = 1e-4


class Normalizer:
    """Maps each named field (`obs`, `action`) to [-1, 1] per dimension and back."""

    def __init__(self, stats: dict[str, dict[str, torch.Tensor]]):
        self.stats = {k: {s: v.float() for s, v in d.items()} for k, d in stats.items()}

    @classmethod
    def fit(cls, data: dict[str, np.ndarray]) -> Normalizer:
        stats = {}
        for key, x in data.items():
            x = torch.as_tensor(np.asarray(x, dtype=np.float64)).reshape(-1, x.shape[-1])
            lo, hi = x.min(0).values, x.max(0).values
            rng = hi - lo
            scale = torch.where(rng > MIN_RANGE, 2.0 / rng.clamp_min(MIN_RANGE), torch.ones_like(rng))
            offset = torch.where(rng > MIN_RANGE, -1.0 - lo * scale, -(hi + lo) / 2)
            stats[key] = {"scale": scale, "offset": offset, "min": lo, "max": hi}
        return cls(stats)

    def normalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        s = self.stats[key]
        return x * s["scale"].to(x) + s["offset"].to(x)

    def unnormalize(self, key: str, y: torch.Tensor) -> torch.Tensor:
        s = self.stats[key]
        return (y - s["offset"].to(y)) / s["scale"].to(y)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat `<field>.<stat>` tensors, as safetensors stores them."""
        return {f"{k}.{s}": v.contiguous() for k, d in self.stats.items() for s, v in d.items()}

    @classmethod
    def from_state_dict(cls, flat: dict[str, torch.Tensor]) -> Normalizer:
        stats: dict[str, dict[str, torch.Tensor]] = {}
        for name, v in flat.items():
            key, stat = name.rsplit(".", 1)
            stats.setdefault(key, {})[stat] = v
        return cls(stats)
