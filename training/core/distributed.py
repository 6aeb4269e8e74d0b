"""Data-parallel training with PyTorch's own torch.distributed: one process per CPU share (gloo) or per GPU (NCCL).

    python -m training.cli train --nproc 2 ...                       # relaunches itself under torchrun
    mlflow run . -e train --env-manager local -P nproc=2
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m training.cli train ...

Every rank holds the same model and takes its share of each global batch (``batch_size`` stays the global
batch); DistributedDataParallel averages the gradients. Rank 0 alone evaluates, selects, checkpoints and logs
the one MLflow run; the other ranks train and follow its decisions (stop, plateau score).

Not torch's DistributedSampler: it samples for a DataLoader, and the engine indexes in-memory uint8 tensors by
batch instead (benchmarks/train_throughput.py: several times the DataLoader pipeline's images/s). Splitting each
global batch also keeps every step's images those of a one-process run with the same seed.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


class DistributedError(ValueError):
    """A data-parallel set-up that cannot work (more processes than GPUs, a batch that does not split, ...)."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def current() -> World:
    """This process's place, from the variables torchrun sets (a plain process is rank 0 of 1)."""
    env = os.environ
    return World(
        rank=int(env.get("RANK", 0)),
        size=int(env.get("WORLD_SIZE", 1)),
        local_rank=int(env.get("LOCAL_RANK", 0)),
    )


def check_count(world_size: int) -> None:
    if world_size < 1:
        raise DistributedError(f"nproc={world_size} must be >= 1.")


def check(world_size: int, batch_size: int, device: str) -> None:
    """Refuse what cannot run before any process or run is started."""
    check_count(world_size)
    if world_size > 1 and batch_size < 2 * world_size:
        raise DistributedError(
            f"batch_size={batch_size} is the global batch: with nproc={world_size} each process needs at least 2 "
            f"images (BatchNorm), so batch_size must be >= {2 * world_size}."
        )
    if device == "cuda" and world_size > torch.cuda.device_count():
        raise DistributedError(
            f"nproc={world_size} processes on CUDA need as many GPUs; this machine has {torch.cuda.device_count()}."
        )


def setup(world: World, device: str) -> None:
    """Join the process group (NCCL on GPUs, gloo on CPUs) and take this rank's GPU."""
    if not world.distributed or dist.is_initialized():
        return
    if device == "cuda":
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def launch(argv: list[str], nproc: int) -> None:
    """Replace this process with torchrun running the same command in ``nproc`` processes on this machine.

    Each process gets an equal share of the cores unless OMP_NUM_THREADS says otherwise (torchrun's own
    default is 1 thread). SIGTERM reaches torchrun, which passes it to every rank: rank 0 ends the run KILLED.
    """
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    argv = _without_nproc(argv)  # the ranks read their number from torchrun (whose parser also takes --nproc*)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [*command, "-m", "training.cli", *argv], env)


def _without_nproc(argv: list[str]) -> list[str]:
    kept, items = [], iter(argv)
    for item in items:
        if item == "--nproc":
            next(items, None)
        elif not item.startswith("--nproc="):
            kept.append(item)
    return kept


def rank_batches(batches: list[torch.Tensor], world: World) -> list[torch.Tensor]:
    """This rank's share of each global batch (every world-th image). A global batch too small to give each rank
    two images (BatchNorm) is left out on every rank, so that all ranks take the same number of steps."""
    if not world.distributed:
        return batches
    return [batch[world.rank :: world.size] for batch in batches if len(batch) >= 2 * world.size]


def _on_wire(tensor: torch.Tensor) -> torch.Tensor:
    """NCCL moves GPU tensors only; gloo CPU ones."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    return tensor.to(device)


def all_sum(*values: torch.Tensor) -> list[float]:
    """Sums over the ranks (values as they are on one process)."""
    if not dist.is_initialized():
        return [float(v) for v in values]
    stacked = _on_wire(torch.stack([v.detach().double().reshape(()) for v in values]))
    dist.all_reduce(stacked)
    return stacked.cpu().tolist()


def from_main(*values: float) -> list[float]:
    """Rank 0's values on every rank (its stop decision, its validation score)."""
    if not dist.is_initialized():
        return list(values)
    tensor = _on_wire(torch.tensor(values, dtype=torch.float64))
    dist.broadcast(tensor, src=0)
    return tensor.cpu().tolist()


def coverage(seen: torch.Tensor, num_samples: int, world: World) -> dict:
    """How the ranks split one epoch: images each rank trained on, images two ranks shared, images covered."""
    mask = torch.zeros(num_samples, dtype=torch.int32)
    mask[seen.cpu()] = 1
    mask = _on_wire(mask)
    masks = [torch.zeros_like(mask) for _ in range(world.size)]
    dist.all_gather(masks, mask)
    stacked = torch.stack(masks).cpu()
    return {
        "world_size": world.size,
        "images_per_rank": stacked.sum(1).tolist(),
        "images_on_several_ranks": int((stacked.sum(0) > 1).sum()),
        "images_covered": int((stacked.sum(0) > 0).sum()),
        "train_samples": num_samples,
    }
