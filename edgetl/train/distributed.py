"""Data-parallel fine-tuning with DistributedDataParallel, launched by ``torchrun`` (or ``--nproc``).

Every rank holds the whole decoded training set and draws the same global batch order; rank ``r``
trains on positions ``r, r + N, ...`` of each global batch, so the global batch and the learning-rate
schedule are those of a single-process run (BatchNorm statistics are per rank, as usual with DDP).
Epoch metrics are summed across ranks; every rank evaluates the full validation split with identical
weights, and rank 0's early-stopping decision is broadcast. Only rank 0 writes files.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from edgetl.subproc import die_with_parent


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: torch.device) -> torch.device:
        """One GPU per local rank; CPU stays CPU."""
        if requested.type == "cuda" and self.enabled:
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return requested

    def sum(self, *values: float) -> list[float]:
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64)
        if dist.get_backend() == "nccl":
            tensor = tensor.cuda()
        dist.all_reduce(tensor)
        return tensor.cpu().tolist()

    def broadcast_flag(self, flag: bool) -> bool:
        return bool(self.broadcast_index(int(flag)))

    def broadcast_index(self, value: int) -> int:
        """Rank 0's ``value`` on every rank."""
        if not self.enabled:
            return value
        tensor = torch.tensor([int(value)])
        if dist.get_backend() == "nccl":
            tensor = tensor.cuda()
        dist.broadcast(tensor, src=0)
        return int(tensor.item())

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group together. A rank that exits while its peer still holds the gloo
        connection can die with SIGABRT in the group's teardown (seen about once in ten runs of the
        2-process test); a barrier and an explicit destroy make every rank leave cleanly."""
        if self.enabled and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def context(device: torch.device) -> Context:
    """The process group of a ``torchrun`` launch (initialised once), or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context()
    ctx = Context(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return ctx


def wrap(model: torch.nn.Module, ctx: Context, device: torch.device) -> torch.nn.Module:
    """DDP around ``model`` for the current set of trainable parameters (rebuilt at each phase)."""
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    with warnings.catch_warnings():  # broadcast_buffers=False is the documented way to keep rank-local BN stats
        warnings.simplefilter("ignore", FutureWarning)
        return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def launch(nproc: int, argv: list[str]) -> int:
    """Re-run ``edgetl ARGV`` under ``torch.distributed.run`` with ``nproc`` processes on this host."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "edgetl", *argv]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.run(command, env=env, preexec_fn=die_with_parent()).returncode
