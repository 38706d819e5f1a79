"""torchrun support: process group from the environment, rank-0 helpers, BatchNorm synchronized on any device.

Under `torchrun --nproc-per-node N` the environment holds RANK / WORLD_SIZE / LOCAL_RANK; the process group uses
gloo on CPU and nccl on CUDA. Without those variables everything runs single-process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["DistInfo", "setup_distributed", "teardown_distributed", "sync_batchnorm", "all_reduce_sum"]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def setup_distributed() -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); otherwise a single-process DistInfo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        return DistInfo(0, 1, dev)
    rank = int(os.environ["RANK"])
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dev, backend = torch.device("cuda", local), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, dev)


def teardown_distributed(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sum a few Python floats over all processes (identity when single-process)."""
    if not info.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


class _AnyDeviceSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are over the GLOBAL batch of all processes, on CPU (gloo) too.

    torch.nn.SyncBatchNorm refuses CPU tensors; this all-reduces (sum, sum of squares, count) with the
    autograd-aware torch.distributed.nn.all_reduce, so forward AND backward equal BatchNorm on the concatenated
    batch. Same parameter and buffer names as BatchNorm (checkpoints are interchangeable). Eval mode and
    single-process fall back to plain BatchNorm.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 3:
            raise ValueError(f"expected (B, C, *spatial) input, got {input.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        import warnings

        from torch.distributed.nn.functional import all_reduce

        dims = [0, *range(2, x.dim())]
        count = torch.full((1,), float(x.numel() // x.shape[1]), dtype=x.dtype, device=x.device)
        with warnings.catch_warnings():
            # torch >= 2.6 marks it deprecated in favour of _functional_collectives, whose autograd support on
            # gloo is not public API; this one has a documented backward (all-reduce of the gradients).
            warnings.simplefilter("ignore", FutureWarning)
            stats = all_reduce(torch.cat([x.sum(dims), (x * x).sum(dims), count]))
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0.0)  # biased variance normalizes (as BatchNorm)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1).clamp_min(1))
        shape = (1, c, *([1] * (x.dim() - 2)))
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm{2,3}d in `module` (in place) by the global-batch version; returns `module`."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, _AnyDeviceSyncBatchNorm):
            new = _AnyDeviceSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                          child.track_running_stats)
            new.load_state_dict(child.state_dict())
            new.to(next(child.parameters(), child.running_mean).device)
            setattr(module, name, new)
        else:
            sync_batchnorm(child)
    return module

