"""Diffusion Policy's transformer denoiser (`policy.net=transformer`), the network choice beside
the 1-D UNet (`policy.network`).

Chi et al. (2023) report it ahead of the UNet on state-based ToolHang (max/average success 1.00 /
0.87 against 0.50 / 0.30). The shape is theirs: the noisy actions are the decoder's tokens, one per
step of the horizon, under causal self-attention (a step sees itself and earlier steps); they
cross-attend to a memory of condition tokens, the diffusion step's sinusoidal features first and
then one token per observation step, passed through a small MLP. Step `i` sees the step token and
the first `i + 1` observation tokens (with two observations: all of them from the second action
on). Built from torch's own `nn.TransformerDecoder` (pre-norm layers, GELU); only the token
embeddings, the masks and the head are written here.

The call is the UNet's, `eps = net(x, t, cond)`, `x` [B, horizon, action_dim], `t` [B] float
diffusion steps (any value, no rounding), `cond` [B, n_obs_steps * per-step features]: the
samplers, ParaDiGMS's batched rows and the OpenVINO backend take it as they take the UNet.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from common.errors import UserError
from policy.network import SinusoidalStepEmbedding


@dataclass
class TransformerConfig:
    n_layer: int = 8  # Diffusion Policy's state-based setting: 8 layers, 4 heads, 256 wide
    n_head: int = 4
    n_emb: int = 256
    p_drop_emb: float = 0.0
    p_drop_attn: float = 0.01
    causal_attn: bool = True

    MAX_WIDTH = 8192  # far above any published setting (768 wide); past it a value only costs memory
    MAX_LAYERS = 64

    def check(self, where: str = "policy.transformer") -> None:
        """A one-line `UserError` naming the key for a number the network cannot be built from."""
        from common.checks import check_number

        check_number(f"{where}.n_layer", self.n_layer, 1, self.MAX_LAYERS, integer=True)
        check_number(f"{where}.n_head", self.n_head, 1, integer=True)
        check_number(f"{where}.n_emb", self.n_emb, 2, self.MAX_WIDTH, integer=True)
        if self.n_emb % self.n_head:
            raise UserError(f"{where}.n_emb: {self.n_emb} is not a multiple of n_head={self.n_head} "
                            "(each head takes an equal share of the width)")
        if self.n_emb % 2:
            raise UserError(f"{where}.n_emb: {self.n_emb} must be even (the step token is half sin, "
                            "half cos)")
        for key in ("p_drop_emb", "p_drop_attn"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
                raise UserError(f"{where}.{key}: {value!r} must be a probability in [0, 1)")
        if not isinstance(self.causal_attn, bool):
            raise UserError(f"{where}.causal_attn: {self.causal_attn!r} must be true or false")


class TransformerForDiffusion(nn.Module):
    def __init__(self, action_dim: int, cond_dim: int, horizon: int, n_obs_steps: int,
                 config: TransformerConfig | None = None):
        super().__init__()
        cfg = config or TransformerConfig()
        if cond_dim % n_obs_steps:
            raise ValueError(f"cond_dim {cond_dim} is not n_obs_steps={n_obs_steps} equal steps")
        e, self.n_obs_steps = cfg.n_emb, n_obs_steps
        self.input_emb = nn.Linear(action_dim, e)
        self.pos_emb = nn.Parameter(torch.zeros(1, horizon, e))
        self.step_emb = SinusoidalStepEmbedding(e)
        self.cond_obs_emb = nn.Linear(cond_dim // n_obs_steps, e)
        self.cond_pos_emb = nn.Parameter(torch.zeros(1, 1 + n_obs_steps, e))
        self.drop = nn.Dropout(cfg.p_drop_emb)
        self.cond_encoder = nn.Sequential(nn.Linear(e, 4 * e), nn.Mish(), nn.Linear(4 * e, e))
        layer = nn.TransformerDecoderLayer(d_model=e, nhead=cfg.n_head, dim_feedforward=4 * e,
                                           dropout=cfg.p_drop_attn, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, num_layers=cfg.n_layer)
        steps = torch.arange(horizon)
        if cfg.causal_attn:
            # torch's boolean masks: True where a query may NOT attend (so they suit any precision)
            self.register_buffer("mask", steps[:, None] < steps[None, :], persistent=False)
            # memory token 0 is the diffusion step, token s >= 1 the observation s - 1
            tokens = torch.arange(1 + n_obs_steps)
            self.register_buffer("memory_mask", steps[:, None] < tokens[None, :] - 1, persistent=False)
        else:
            self.mask = self.memory_mask = None
        self.ln_f = nn.LayerNorm(e)
        self.head = nn.Linear(e, action_dim)
        self.apply(self._init_weights)
        nn.init.normal_(self.pos_emb, std=0.02)
        nn.init.normal_(self.cond_pos_emb, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # GPT-style initialisation, as Diffusion Policy's transformer: small normal weights, zero biases
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.MultiheadAttention):
            nn.init.normal_(module.in_proj_weight, std=0.02)
            nn.init.zeros_(module.in_proj_bias)
            nn.init.zeros_(module.out_proj.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        step = self.step_emb(t).to(x.dtype)[:, None]  # sin/cos in float32 at any precision, then cast
        obs = self.cond_obs_emb(cond.reshape(cond.shape[0], self.n_obs_steps, -1))
        memory = self.cond_encoder(self.drop(torch.cat([step, obs], dim=1) + self.cond_pos_emb))
        h = self.drop(self.input_emb(x) + self.pos_emb)
        h = self.decoder(h, memory, tgt_mask=self.mask, memory_mask=self.memory_mask)
        return self.head(self.ln_f(h))
