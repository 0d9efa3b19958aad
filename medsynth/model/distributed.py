"""Multi-process training helpers: ``torchrun`` environment, DistributedDataParallel, rank-0 duties.

``torchrun --nproc_per_node=N -m medsynth train CONFIG --run DIR`` sets ``RANK``/``WORLD_SIZE``;
:func:`init_from_env` starts the process group (gloo on the CPU, nccl on CUDA).  Each optimizer
step's *global* batch is the same as in a single-process run (a pure function of seed and step);
rank r trains on items ``r, r+N, ...`` of it (a distributed sampler without state, so resuming
needs no sampler state), and DDP averages the gradients, so N processes follow the single-process
trajectory up to float reduction order.  Only rank 0 logs, validates and writes checkpoints.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

log = logging.getLogger("medsynth.model.distributed")


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when not distributed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def init_from_env(device_type: str) -> bool:
    """Start the process group when launched by torchrun (``WORLD_SIZE`` > 1); returns whether it did."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    log.info("distributed: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return True


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rank_part(x: torch.Tensor) -> torch.Tensor:
    """This rank's part of a global batch (along dim 0): items r, r+N, ..."""
    r, n = world()
    return x if n == 1 else x[r::n]


def check_batch(batch_size: int, key: str) -> None:
    """Every rank needs at least one item per step; equal parts keep the gradient an exact mean."""
    from medsynth.errors import ConfigError

    _, n = world()
    if n > 1 and batch_size % n:
        raise ConfigError(f"{key}: batch size {batch_size} is not divisible by the {n} training processes",
                          hint=f"use a multiple of {n} (the global batch is split across processes)")


def ddp(module: torch.nn.Module, device: torch.device) -> Any:
    """Wrap in DistributedDataParallel when distributed, else return the module itself."""
    _, n = world()
    if n == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index or 0] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def allreduce_grads(module: torch.nn.Module) -> None:
    """Average gradients over ranks (for a module called more than once per step, where DDP's
    one-forward-one-backward contract does not hold, e.g. the PatchGAN discriminator)."""
    import torch.distributed as dist

    _, n = world()
    if n == 1:
        return
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= n


class AEStep(torch.nn.Module):
    """Encode -> reparameterise with given noise -> decode, as one ``forward`` so DDP can wrap it."""

    def __init__(self, ae: torch.nn.Module):
        super().__init__()
        self.ae = ae

    def forward(self, x: torch.Tensor, eps_fn: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, sigma = self.ae.encode(x)
        z = mu + sigma * eps_fn(mu)
        return self.ae.decode(z), mu, sigma
