"""torch.distributed helpers (no Ray): the gradient-preserving all-gather of in-batch negatives across workers, and
sums over ranks on the device the process group's backend needs."""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` [N, D] from every rank (equal N) -> [world * N, D]; gradients flow back to each rank's part.

    torch.distributed.nn.functional.all_gather sums the incoming gradients across ranks in backward, which is
    what makes the loss of every rank reach every rank's embeddings.
    """
    if not is_distributed():
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def all_gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` [N, ...] from every rank (equal N), without gradients (e.g. text keys)."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def collective_device() -> torch.device:
    """Where tensors must be for the default group's collectives: this process's GPU under NCCL (Ray Train's
    backend with GPUs; NCCL refuses CPU tensors), else the CPU (gloo)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """`x` summed over all ranks, returned on `x`'s device (reduced on collective_device())."""
    y = x.to(collective_device())
    dist.all_reduce(y)
    return y.to(x.device)


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)
