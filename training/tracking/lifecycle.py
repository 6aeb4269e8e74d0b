"""A run that always ends in a final state (FINISHED, FAILED or KILLED), in the right experiment, with its process
recorded (host, pid) so that orphans can be found (``training.tracking.orphans``).
"""

from __future__ import annotations

import contextlib
import os
import socket

import mlflow
from mlflow.entities import RunStatus

from training.core import termination

ERROR_TAG = "medzoo.error"
PREVIOUS_ERROR_TAG = "medzoo.previous_error"
HOST_TAG = "medzoo.host"
PID_TAG = "medzoo.pid"
CHECKPOINT_TAG = "medzoo.checkpoint"  # the slot of the last complete checkpoint (training.tracking.checkpoint)
RESUME_HINT = "a training run goes on from its last epoch with: python -m training.cli train --resume {run_id}"
SYSTEM_METRICS_INTERVAL_S = 5
# MLflow 3's UI reads this experiment tag to choose its layout; unset, it opens on the GenAI overview.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_EXPERIMENT = "custom_model_development"


@contextlib.contextmanager
def tracked_run(
    run_name: str, tags: dict, nested: bool = False, run_id: str | None = None, experiment: str | None = None
):
    """``mlflow.start_run`` that ends FAILED on errors and KILLED on Ctrl-C (MLflow says FAILED for both).

    ``run_id`` reopens an existing run (a resumed sweep's parent) instead of creating one. ``experiment`` names
    the experiment a new top-level run goes to when the caller chose none (see :func:`experiment_for`).
    """
    mlflow.system_metrics.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
    run = mlflow.start_run(
        run_id=run_id,
        run_name=None if run_id else run_name,
        nested=nested,
        log_system_metrics=True,
        experiment_id=None if run_id else experiment_for(experiment, nested),
    )
    mark_training_experiment(run.info.experiment_id)
    previous_error = run.data.tags.get(ERROR_TAG)
    if run_id and previous_error:  # reopened: the old failure is history, not this attempt's outcome
        mlflow.set_tag(PREVIOUS_ERROR_TAG, previous_error)
        mlflow.delete_tag(ERROR_TAG)
    # Who runs it: `python -m training.cli runs reap` marks runs whose process died FAILED.
    mlflow.set_tags({**tags, HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())})
    # Under `mlflow run` the run already exists and start_run ignores run_name; set it explicitly.
    mlflow.set_tag("mlflow.runName", run_name)
    try:
        yield run
        termination.check()  # a SIGTERM that Python swallowed on the way still ends the run KILLED
    except KeyboardInterrupt as err:
        mlflow.set_tag(ERROR_TAG, _with_hint(str(err) or "interrupted by the user (Ctrl-C)", run.info.run_id))
        mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException as err:
        mlflow.set_tag(ERROR_TAG, _with_hint(f"{type(err).__name__}: {err}"[:5000], run.info.run_id))
        mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))
        raise
    mlflow.end_run(RunStatus.to_string(RunStatus.FINISHED))


def is_members_parent(run) -> bool:
    """The parent run of ``members > 1`` member runs (training.workflows.members). Ensemble runs before
    2026-12-02 logged ``members`` as their members' architectures, which is no count."""
    members = run.data.params.get("members", "1")
    return members.isdigit() and int(members) > 1


def can_resume(run) -> bool:
    """A run with a checkpoint, or a members parent, whose members hold theirs."""
    return CHECKPOINT_TAG in run.data.tags or is_members_parent(run)


def _with_hint(reason: str, run_id: str) -> str:
    """The reason, and how to go on where the run left a checkpoint."""
    if can_resume(mlflow.get_run(run_id)):
        return f"{reason}; {RESUME_HINT.format(run_id=run_id)}"
    return reason


def experiment_for(name: str | None, nested: bool) -> str | None:
    """The experiment id for a new run: a nested run joins its parent's experiment; a top-level run goes to the
    experiment ``name`` (created on first use) unless the user chose one (``mlflow run --experiment-name``,
    $MLFLOW_EXPERIMENT_NAME / _ID, ``mlflow.set_experiment``) or `mlflow run` already made the run."""
    active = mlflow.active_run()
    if nested and active is not None:
        return active.info.experiment_id
    chosen = any(os.environ.get(v) for v in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"))
    if name is None or chosen or getattr(mlflow.tracking.fluent, "_active_experiment_id", None):
        return None
    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is not None and found.lifecycle_stage == "active":
        return found.experiment_id
    if found is not None:  # deleted in the UI: bring it back rather than fail on the taken name
        client.restore_experiment(found.experiment_id)
        return found.experiment_id
    try:
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: TRAINING_EXPERIMENT})
    except mlflow.exceptions.MlflowException:  # another worker created it a moment ago
        return client.get_experiment_by_name(name).experiment_id


def mark_training_experiment(experiment_id: str) -> None:
    """Tag the experiment as model training, so MLflow 3's UI opens it on the runs table, not the GenAI overview."""
    client = mlflow.MlflowClient()
    if EXPERIMENT_KIND_TAG not in client.get_experiment(experiment_id).tags:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT)
