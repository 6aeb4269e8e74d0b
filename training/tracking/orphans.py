"""Runs whose process died without a word (kill -9, power loss, a closed laptop): find them and mark them FAILED.

    python -m training.cli runs list      # every RUNNING run, and whether its process is alive
    python -m training.cli runs reap      # mark the orphaned ones FAILED (then `train --resume RUN_ID`)

Every MedZoo run records the host and pid of its process (tags ``medzoo.host`` / ``medzoo.pid``). A RUNNING run
of this host whose pid is gone is an orphan. Runs of other hosts are listed as such: only their host can tell.
"""

from __future__ import annotations

import os
import socket

import mlflow
from mlflow.entities import Run, RunStatus

from training.tracking.lifecycle import ERROR_TAG, HOST_TAG, PID_TAG, RESUME_HINT, can_resume

ORPHANED, ALIVE, OTHER_HOST, UNKNOWN = "orphaned", "alive", "other host", "no process recorded"


def process_state(run: Run) -> str:
    """orphaned / alive (with pid) / other host / no process recorded, for a RUNNING run."""
    host, pid = run.data.tags.get(HOST_TAG), run.data.tags.get(PID_TAG)
    if not host or not pid or not pid.isdigit():
        return UNKNOWN
    if host != socket.gethostname():
        return f"{OTHER_HOST} {host}"
    return f"{ALIVE} (pid {pid})" if is_alive(int(pid)) else ORPHANED


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def running_runs() -> list[Run]:
    experiments = [e.experiment_id for e in mlflow.search_experiments()]
    return mlflow.search_runs(
        experiment_ids=experiments, filter_string="attributes.status = 'RUNNING'", output_format="list"
    )


def reap() -> list[Run]:
    """Mark every orphaned run FAILED with the reason; returns them."""
    client = mlflow.MlflowClient()
    reaped = []
    for run in running_runs():
        if process_state(run) != ORPHANED:
            continue
        tags = run.data.tags
        reason = f"its process (host {tags[HOST_TAG]}, pid {tags[PID_TAG]}) died without ending the run"
        if can_resume(run):
            reason += f"; {RESUME_HINT.format(run_id=run.info.run_id)}"
        client.set_tag(run.info.run_id, ERROR_TAG, reason)
        client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))
        reaped.append(run)
    return reaped


def describe(run: Run) -> str:
    epoch = run.data.tags.get("medzoo.checkpoint_epoch")
    return (
        f"{run.info.run_id}  {run.info.run_name or '-':<28} {process_state(run):<22} "
        f"{'checkpoint after epoch ' + epoch if epoch else 'no checkpoint'}"
    )
