"""Going on with a stopped run: what can be resumed, its configuration and its last checkpoint.

python -m training.cli train --resume <run_id>
"""

from __future__ import annotations

from dataclasses import dataclass

import mlflow

from training.core.config import ConfigError, TrainConfig
from training.core.options import parser_for
from training.tracking.checkpoint import CheckpointError, load_checkpoint
from training.tracking.lifecycle import is_members_parent
from training.tracking.orphans import ORPHANED, process_state


class ResumeError(ConfigError):
    """A run that cannot be resumed; the message says why and what to do."""


@dataclass
class Resumption:
    run_id: str
    state: dict | None  # the last checkpoint; None for a members parent, whose members hold theirs


RESUMABLE = ("FAILED", "KILLED")


def resumption(run_id: str) -> tuple[TrainConfig, Resumption]:
    """The configuration and last checkpoint of a stopped run; ResumeError says why a run cannot go on."""
    try:
        run = mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise ResumeError(f"resume={run_id!r}: no such run in {mlflow.get_tracking_uri()}.") from None
    status = run.info.status
    if status == "RUNNING":
        state = process_state(run)
        if state != ORPHANED:
            raise ResumeError(f"resume={run_id!r}: the run is still running ({state}); stop it first.")
    elif status not in RESUMABLE:
        raise ResumeError(f"resume={run_id!r}: the run is {status}; only FAILED, KILLED or orphaned runs go on.")
    if is_members_parent(run):  # its members hold the checkpoints
        return config_from_params(run.data.params), Resumption(run_id, None)
    if run.data.tags.get("kind", "train") != "train" or "model" not in run.data.params:
        raise ResumeError(f"resume={run_id!r} is not a training run.")
    try:
        state = load_checkpoint(run_id)
    except CheckpointError as err:
        raise ResumeError(str(err)) from None
    return config_from_params(run.data.params), Resumption(run_id, state)


def config_from_params(params: dict[str, str]) -> TrainConfig:
    """The TrainConfig a run logged (every field as text), parsed back."""
    return TrainConfig(**{name: parser_for(TrainConfig, name)(params[name]) for name in TrainConfig.field_names()})
