"""`dp-rollout`: closed-loop episodes of a trained policy in the simulator."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from common.cli import command
from common.errors import UserError
from policy.diffusion import SamplerConfig
from policy.samplers.spec import on_command_backend


@dataclass
class RolloutConfig:
    checkpoint: str = "???"
    episodes: int = 10
    seed: int = 100000  # demonstrations use small seeds; evaluation starts far from them
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    threads: int = 2
    device: str = "auto"  # auto: CUDA when torch sees a GPU, else the CPU


@command("rollout", RolloutConfig)
def main(cfg: RolloutConfig) -> None:
    import policy
    from rollouts.runner import make_policy_env, run_episode

    for name in ("episodes", "threads"):
        if getattr(cfg, name) < 1:
            raise UserError(f"{name}: {getattr(cfg, name)} must be at least 1")
    torch.set_num_threads(cfg.threads)
    pol = policy.load(cfg.checkpoint, device=cfg.device)
    pol.sampler = on_command_backend(cfg.sampler)
    env = make_policy_env(pol)  # task=external (no simulator) is refused here, in one line
    task = pol.meta["task"]
    results = []
    for i in tqdm(range(cfg.episodes), desc=f"rollout {task}", unit="episode"):
        r = run_episode(env, pol, cfg.seed + i)
        results.append(r)
        lat = f"{np.median([p.latency_ms for p in r.plans]):.1f} ms" if r.plans else "-"
        tqdm.write(f"seed {r.seed}: success={r.success} length={r.length} return={r.return_:.1f} "
                   f"plans={len(r.plans)} p50 latency={lat}" + (f" error={r.error}" if r.error else ""))
    rate = np.mean([r.success for r in results])
    latencies = [p.latency_ms for r in results for p in r.plans]
    print(f"{task}: success {rate:.0%} ({sum(r.success for r in results)}/{len(results)}) "
          f"with {cfg.sampler.name} on {pol.backend} from {pol.meta['checkpoint']} "
          f"(step {pol.meta['step']}); "
          f"plan latency p50 {f'{np.median(latencies):.1f} ms' if latencies else '-'} over {len(latencies)} "
          f"plans, {cfg.threads} torch threads")


if __name__ == "__main__":
    main()
