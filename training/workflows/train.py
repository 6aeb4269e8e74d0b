"""Train a configuration as MLflow runs: one network, or ``members > 1`` seeded networks and their ensemble.

    python -m training.cli train --model cnn --dataset breastmnist --epochs 5
    mlflow run . -e train --env-manager local -P model=mobilenetv2

The configuration is validated and resolved (``training.core.config.resolve``) before any run is created, so a
bad value fails with nothing half-done.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from training.core import distributed
from training.core.config import TrainConfig, resolve
from training.core.engine import EpochResult
from training.core.options import NONE, option
from training.tracking.resume import Resumption
from training.workflows.members import MembersOutcome, train_members
from training.workflows.network import TrainOutcome, train_network

MEMBERS_IN_ONE_PROCESS = "members > 1 train one after the other in one process (nproc=1)."


@dataclass
class ResumeOptions:
    resume: str = option(
        NONE, f"id of a FAILED, KILLED or orphaned run to continue from its last checkpoint ({NONE}: a new run)"
    )


@dataclass
class DistributedOptions:
    nproc: int = option(
        1, "training processes on this machine, data-parallel (torch.distributed: gloo on CPUs, NCCL on GPUs)"
    )


def run_training(
    config: TrainConfig,
    *,
    nested: bool = False,
    on_epoch_end: Callable[[EpochResult], None] | None = None,
    extra_tags: dict | None = None,
    progress: bool = True,
    resume: Resumption | None = None,
) -> TrainOutcome | MembersOutcome | None:
    """Resolve ``config``, then train it: one network as one run, or with ``members > 1`` that many member runs
    and their ensemble in one parent run. ``resume`` (``training.tracking.resume.resumption``) goes on with a
    stopped run. Under torchrun the ranks other than 0 return None.
    """
    run = resolve(config)
    if config.members == 1:
        return train_network(
            run, nested=nested, on_epoch_end=on_epoch_end, extra_tags=extra_tags, progress=progress, resume=resume
        )
    if distributed.current().distributed:
        raise distributed.DistributedError(MEMBERS_IN_ONE_PROCESS)
    run_id = resume.run_id if resume else None
    return train_members(run, nested=nested, extra_tags=extra_tags, progress=progress, resume_run_id=run_id)
