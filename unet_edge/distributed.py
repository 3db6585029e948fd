"""Distributed data parallel training on PyTorch's own engine (`torch.distributed.run` / `torchrun`).

`torchrun` (or `unet-edge train --nproc-per-node N`, which goes through the same engine) starts one
process per device and sets RANK, LOCAL_RANK and WORLD_SIZE; `distributed_context` turns that into a
`DistContext`, which `fit` uses to shard data, wrap the model in DDP and combine losses and metrics.
NCCL serves CUDA devices, gloo the CPU.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sized
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler, Sampler

from .data import resolve_data
from .device import resolve_device
from .errors import TrainingError

__all__ = ["DistContext", "ShardSampler", "distributed_context", "launched_by_torchrun"]


def launched_by_torchrun() -> bool:
    """True inside a worker started by `torchrun` / `torch.distributed.run` (it sets these variables)."""
    return all(name in os.environ for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


class ShardSampler(Sampler[int]):
    """Every `world_size`-th index from `rank`, without padding: each item is seen by exactly one rank.

    DistributedSampler pads the dataset with repeats so every rank gets the same count, which would
    count some validation pixels twice; evaluation needs no equal counts because it runs no collective
    per batch.
    """

    def __init__(self, dataset: Sized, rank: int, world_size: int) -> None:
        self.indices = range(rank, len(dataset), world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class DistContext:
    """This process's place in the process group, and the few collectives training needs."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    local_world_size: int = 1  # processes on this node, which share its CPU cores

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sampler(self, dataset: Dataset[Any], shuffle: bool, seed: int) -> DistributedSampler:
        """Training sampler: a different shard per rank, reshuffled each epoch by `set_epoch`."""
        return DistributedSampler(dataset, num_replicas=self.world_size, rank=self.rank, shuffle=shuffle, seed=seed)

    def eval_sampler(self, dataset: Sized) -> ShardSampler:
        """Evaluation sampler: each item on exactly one rank, so all-reduced counts equal one process's."""
        return ShardSampler(dataset, self.rank, self.world_size)

    def wrap(self, model: nn.Module) -> DistributedDataParallel:
        """DDP over `model` (it broadcasts rank 0's weights now and averages gradients each step)."""
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm running stats) to every rank.

        Each rank's last training step updates its running stats from its own batch; rank 0's are the
        ones saved in the checkpoint, so evaluation must use them everywhere.
        """
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)

    def reduce_loss(self, loss: float, seen: int) -> tuple[float, int]:
        """Mean loss over all ranks weighted by images, and the total number of images seen."""
        totals = torch.tensor([loss * seen, float(seen)], dtype=torch.float64, device=self.device)
        dist.all_reduce(totals)
        total_loss, total_seen = totals.tolist()
        return total_loss / max(total_seen, 1.0), int(total_seen)

    def broadcast_path(self, path: Path) -> Path:
        """Rank 0's `path` on every rank (rank 0 picks the run folder, the others follow)."""
        message = [str(path)]
        dist.broadcast_object_list(message, src=0)
        return Path(message[0])


def _worker_device(device: str, local_rank: int) -> torch.device:
    if device.startswith("cuda:"):
        raise TrainingError(
            f"--device {device} names one GPU, but each distributed process takes the GPU of its local rank: "
            "pass --device cuda (and CUDA_VISIBLE_DEVICES to choose which GPUs)"
        )
    chosen = resolve_device(device)
    if chosen.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise TrainingError(
                f"local rank {local_rank} has no GPU: {torch.cuda.device_count()} visible, so use --nproc-per-node "
                f"{torch.cuda.device_count()} or fewer"
            )
        return torch.device("cuda", local_rank)
    if chosen.type != "cpu":
        raise TrainingError(
            f"distributed training runs on CUDA (NCCL) or the CPU (gloo), not {chosen.type}: pass --device cpu"
        )
    return chosen


@contextmanager
def distributed_context(device: str = "auto") -> Iterator[DistContext | None]:
    """Join the process group that torchrun set up (None when not launched by torchrun), and leave it after."""
    if not launched_by_torchrun():
        yield None
        return
    local_rank = int(os.environ["LOCAL_RANK"])
    torch_device = _worker_device(device, local_rank)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    dist.init_process_group(backend="nccl" if torch_device.type == "cuda" else "gloo")
    world_size = dist.get_world_size()
    on_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    context = DistContext(dist.get_rank(), local_rank, world_size, torch_device, on_node)
    try:
        yield context
        dist.barrier()
    finally:
        dist.destroy_process_group()


def launch_training(module: str, args: list[str], nproc_per_node: int, data: str | os.PathLike[str] | None) -> None:
    """Start `nproc_per_node` training workers (`launch`), once the dataset is known to exist.

    The embedded set is generated here, once, rather than by every worker at the same time.
    """
    if launched_by_torchrun():
        raise TrainingError("--nproc-per-node starts its own workers: drop it when launching with torchrun")
    resolve_data(data)
    launch(module, args, nproc_per_node)


def launch(module: str, args: list[str], nproc_per_node: int) -> None:
    """Run `python -m module *args` in `nproc_per_node` local workers through `torch.distributed.run`.

    The same engine as `torchrun --standalone`: it picks a free port, sets the rank variables, watches
    the workers and stops them all when one fails.
    """
    from torch.distributed import run
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        run.main(["--standalone", f"--nproc-per-node={nproc_per_node}", "-m", module, *args])
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        raise TrainingError(
            f"distributed worker rank {rank} exited with code {failure.exitcode} (its own error is printed above)"
        ) from None
    except SignalException:
        raise KeyboardInterrupt from None
