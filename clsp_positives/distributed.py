"""torchrun integration: process group set-up, barriers and the gathers the
contrastive methods need.

Both trainers use it, ``clsp train`` and ``clsp diffusion train``, so it lives in the
shared root package: the service and trainer sides never import each other
(docs/design.md §3). A single process (no torchrun) is a world of one; every helper
here is then the identity, so the methods and loops are written once for both cases.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str | None, local_rank: int = 0) -> torch.device:
    """``None``/``auto`` picks this rank's GPU when there is one, else the CPU."""
    if device in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    return dev


def init_distributed(device: str | None = None) -> DistributedContext:
    """Join the torchrun job described by the environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR/PORT): nccl on CUDA, gloo on the CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def shutdown_distributed(*, wait_for_peers: bool = True) -> None:
    """Leave the process group. gloo aborts a rank (``std::terminate``) whose
    peer tears the group down while it is still connected, so a clean exit
    first waits for every rank; after an error the peers may never arrive, so
    that exit does not wait."""
    if dist.is_available() and dist.is_initialized():
        if wait_for_peers and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def world_size() -> int:
    """Ranks in the current process group (1 without one)."""
    return _world()


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradient of every rank's copy and
    returns this rank's slice: each rank computes the loss on the whole
    gathered batch, and after DDP's gradient averaging the step equals the one
    a single process would take on the global batch."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank = dist.get_rank()
        ctx.n = x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from all ranks (equal shapes), differentiable for the local part."""
    if _world() == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_nograd(x: Tensor) -> Tensor:
    """Concatenate ``x`` from all ranks (equal shapes), detached: for queues and support sets."""
    if _world() == 1:
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=0)


def gather_objects(obj: object) -> list[object]:
    """Every rank's ``obj`` (pickled), in rank order."""
    if _world() == 1:
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: Tensor) -> Tensor:
    if _world() > 1:
        values = values.clone()
        dist.all_reduce(values)
    return values


def barrier() -> None:
    if _world() > 1:
        dist.barrier()
