"""Data-parallel training under `torchrun`: which process this is, and the process group.

`torchrun --nproc_per_node=N -m policy.train ...` starts N processes with RANK, WORLD_SIZE and
LOCAL_RANK set; each joins one process group (nccl on GPUs, gloo on CPUs) and trains
DistributedDataParallel over its share of every global batch. Without torchrun this is one
process of a world of one, and nothing is initialised.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from common.errors import UserError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The process that writes checkpoints, logs and progress."""
        return self.rank == 0

    def share(self, batch: int) -> tuple[int, int]:
        """(start, stop) of this process's rows of a global batch of `batch`."""
        if batch % self.size:
            raise UserError(f"batch_size: {batch} does not split over {self.size} processes; "
                            f"use a multiple of {self.size}")
        n = batch // self.size
        return self.rank * n, (self.rank + 1) * n

    def barrier(self) -> None:
        if self.size > 1:
            torch.distributed.barrier()


def join(device: torch.device) -> tuple[World, torch.device]:
    """This process's place in a torchrun world (joining its process group), and the device it
    trains on: cuda:LOCAL_RANK when training on CUDA, else `device`."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(), device
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world, device


def leave(world: World) -> None:
    if world.size > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def launch(nproc: int, args: list[str], command: str) -> int:
    """`python args...` in `nproc` processes of one world on this machine, as `torchrun
    --standalone` starts them; returns 0, or the exit code of the first process that failed.
    Process 0 writes to the terminal (progress, its one-line error); the others' stderr goes to
    files, so that an error every process meets is said once. torchrun's own report of a failure
    (a traceback and a table) is left out: when process 0 did not fail, the failed process's own
    line is repeated from its file, or one is made."""
    import glob
    import logging
    import sys
    import tempfile
    import uuid

    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # its failure table
    with tempfile.TemporaryDirectory(prefix="dp-train-logs-") as logs:
        specs = DefaultLogsSpecs(log_dir=logs, redirects={r: Std.ERR for r in range(1, nproc)})
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                              rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                              monitor_interval=0.1, logs_specs=specs)
        try:
            elastic_launch(config, entrypoint=sys.executable)(*args)
        except ChildFailedError as err:
            def said(rank: int) -> list[str]:  # the one-line errors a process wrote to its stderr file
                return [line for path in glob.glob(f"{logs}/**/{rank}/stderr.log", recursive=True)
                        for line in open(path, errors="replace").read().splitlines()
                        if line.startswith(f"{command}: ")]

            failed = {rank: f.exitcode for rank, f in err.failures.items()}
            if failed.get(0, 0) > 0:
                # process 0 said why on the terminal (the others wait for it: `common.cli.fail`)
                return failed[0]
            rank, code = min(((r, c) for r, c in failed.items() if c > 0), default=min(failed.items()))
            print((said(rank) or [f"{command}: process {rank} of {nproc} failed (exit code {code})"])[-1],
                  file=sys.stderr)
            return code if code > 0 else 1
        except SignalException:  # Ctrl-C: every process got it too, and process 0 said so
            return 130
    return 0
