"""Where the policy runs: `device=auto` (CUDA when torch sees a GPU, else the CPU), the device's
name for tables, and the synchronisation a timer needs on an asynchronous device."""

from __future__ import annotations

import os
import platform

import torch

from common.errors import UserError


def resolve_device(name: str | torch.device | None) -> torch.device:
    """`auto` (or None): the first CUDA device if there is one, else the CPU; otherwise the device
    named, refused in one line when it is not a device or torch cannot reach it."""
    if isinstance(name, torch.device):
        name = str(name)
    if name is None or str(name).strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(str(name).strip())
    except RuntimeError:
        raise UserError(f"device: {name!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device: {name!r}, but torch sees no CUDA device here "
                            "(device=auto uses the CPU)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"device: {name!r}, but torch sees {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise UserError(f"device: {name!r}: only cpu and cuda are supported")
    return dev


def machine(dev: torch.device) -> str:
    """The device's name for tables: the GPU's model, or the CPU and its core count."""
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def sync(dev: torch.device) -> None:
    """Wait for the device's queued work (timers around GPU work need it; the CPU has none)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
