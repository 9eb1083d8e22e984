"""Learning: the denoiser network, normalizer, diffusion policy, training, checkpoints, samplers.

Nothing here imports the simulator: a robot-side program loads a checkpoint and plans with
`policy.load(path).plan(obs_history)`.
"""


def load(path, device: str = "cpu", ema: bool = True):
    """The policy stored at `path`: a training run directory (its latest checkpoint), or one
    checkpoint directory. `ema=False` loads the raw instead of the EMA weights."""
    from policy.checkpoint import load_policy

    return load_policy(path, device=device, ema=ema)


__all__ = ["load"]
