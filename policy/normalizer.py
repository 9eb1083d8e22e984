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

    def bounds(self, key: str, margin: float, floor: float = 0.0,
               relative: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Per dimension, the trained range [min, max] of `key` widened on each side by `margin`
        times the dimension's scale, in the field's units. The scale is its width (max - min), at
        least `relative` times its magnitude (max(|min|, |max|)) and at least `floor`: the room
        follows the dimension, so one trained on a single value gets room only as large as the
        floors, not the +-2 absolute that its normalized units (only centred) would give."""
        lo, hi = self.stats[key]["min"].double(), self.stats[key]["max"].double()
        scale = (hi - lo).maximum(relative * lo.abs().maximum(hi.abs())).clamp_min(floor)
        return (lo - margin * scale).float().numpy(), (hi + margin * scale).float().numpy()

    def into_range(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """`x` (field units) with each dimension whose trained range is under `MIN_RANGE` put in
        that range: there the normalized units are only centred, so the network's output, trained
        toward 0 but never exactly 0, is absolute noise around the trained value. Its normalized
        value, clipped to [-1, 1], is read over the dimension's own range instead (a dimension
        trained on one value gets that value). Other dimensions, and NaN or inf, are left as they are."""
        s = self.stats[key]
        narrow = (s["max"].double() - s["min"].double() <= MIN_RANGE).to(x.device)  # as `fit` decided
        if not narrow.any():
            return x
        narrow = narrow & torch.isfinite(x)  # NaN and inf stay, for the safety rule to refuse
        lo, hi = s["min"].double(), s["max"].double()
        y = self.normalize(key, x).clamp(-1.0, 1.0)  # there: x minus the trained centre
        return torch.where(narrow, ((hi + lo) / 2).to(x) + y * ((hi - lo) / 2).to(x), x)

    @classmethod
    def from_state_dict(cls, flat: dict[str, torch.Tensor]) -> Normalizer:
        """The normalizer a checkpoint saved; ValueError naming the first stat that is missing,
        not finite or does not follow from the field's range (a damaged or edited file)."""
        stats: dict[str, dict[str, torch.Tensor]] = {}
        for name, v in flat.items():
            key, _, stat = name.rpartition(".")
            stats.setdefault(key, {})[stat] = v
        for key, field in stats.items():
            _check_field(key, field)
        return cls(stats)


def _check_field(key: str, s: dict[str, torch.Tensor]) -> None:
    """What `Normalizer.fit` would have written for the range [min, max], or ValueError."""
    for stat in ("scale", "offset", "min", "max"):
        if stat not in s:
            raise ValueError(f"{key}.{stat}: missing")
        if s[stat].ndim != 1 or s[stat].shape != s["scale"].shape:
            raise ValueError(f"{key}.{stat}: shape {tuple(s[stat].shape)}, not that of {key}.scale")
        if not torch.isfinite(s[stat]).all():
            raise ValueError(f"{key}.{stat}: holds NaN or inf")
    lo, hi = s["min"].double(), s["max"].double()
    if (hi < lo).any():
        raise ValueError(f"{key}.min: above {key}.max")
    want = Normalizer.fit({key: torch.stack([lo, hi]).numpy()}).stats[key]
    for stat in ("scale", "offset"):
        if not torch.allclose(s[stat].double(), want[stat].double(), rtol=1e-4, atol=1e-6):
            raise ValueError(f"{key}.{stat}: does not follow from {key}.min and {key}.max (a damaged or "
                             "edited normalizer)")
