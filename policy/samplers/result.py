"""What every sampler returns: the sample and the same stats, so no caller special-cases one."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SampleResult:
    x: torch.Tensor  # [B, horizon, action_dim], normalized actions
    model_evals: int  # denoiser evaluations of the costliest sample in the batch
    parallel_iters: int  # sequential rounds of (batched) denoiser calls
    converged: bool  # False when a tolerance-driven sampler stopped at max_iters
    evals_per_sample: list[int] | None = None  # for batches whose samples converge at their own pace
    chain: torch.Tensor | None = None  # [B, n + 1, horizon, A] every point of the chain (parallel samplers),
    #                                    the next plan's warm start (policy.warm)
