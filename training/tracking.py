"""MLflow helpers: a run that always ends in a final state, dataset inputs, figures and the model.

The model is logged with everything later steps need (architecture, preprocessing, class names), so the
register/export step and the service never have to re-read the training data or the config.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.data.http_dataset_source import HTTPDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import RunStatus
from mlflow.models import infer_signature

from contract import METADATA_KEY, ModelCard
from training import termination
from training.data import ImageDataset

MODEL_ARTIFACT = "model"
# Validation images (uint8) logged beside the model, so export checks ONNX parity without the dataset file.
PARITY_ARTIFACT = "parity/images.npy"
PARITY_IMAGES = 64
ERROR_TAG = "medzoo.error"
PREVIOUS_ERROR_TAG = "medzoo.previous_error"
HOST_TAG = "medzoo.host"
PID_TAG = "medzoo.pid"
CHECKPOINT_TAG = "medzoo.checkpoint"  # the slot of the last complete checkpoint (training.checkpoint)
RESUME_HINT = "a training run goes on from its last epoch with: python -m training.cli train --resume {run_id}"
NOTES_TAG = "medzoo.notes"
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
    # Who runs it: `python -m training.runs reap` marks runs whose process died FAILED.
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
    """The parent run of ``members > 1`` member runs (training.members). Ensemble runs before 2026-12-02 logged
    ``members`` as their members' architectures, which is no count."""
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


def log_new_params(params: dict) -> None:
    """Log params not yet on the run: `mlflow run` has already logged the entry point's own (as typed)."""
    run = mlflow.active_run()
    existing = mlflow.get_run(run.info.run_id).data.params
    mlflow.log_params({k: v for k, v in params.items() if k not in existing})


def log_notes(notes: list[str]) -> None:
    """What the run changed on its own (size raised, images resized): tagged, and said on the terminal."""
    if not notes:
        return
    mlflow.set_tag(NOTES_TAG, "; ".join(notes))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)


def log_dataset(dataset: ImageDataset) -> None:
    """One MLflow dataset input per split, sharing the file's digest, so the UI shows what was trained on."""
    source = HTTPDatasetSource(dataset.origin)
    for split in ("train", "val", "test"):
        meta = MetaDataset(source=source, name=f"{dataset.name}-{dataset.size}px-{split}", digest=dataset.digest[:16])
        tags = {
            "split": split,
            "samples": str(len(dataset.split(split))),
            "size": str(dataset.size),
            "local_path": dataset.source,
        }
        mlflow.log_input(meta, context={"train": "training", "val": "validation", "test": "testing"}[split], tags=tags)


def log_figure(figure, path: str) -> None:
    import matplotlib.pyplot as plt

    mlflow.log_figure(figure, path)
    plt.close(figure)


def log_confusion_matrices(labels: dict, probs: dict, class_names: list[str], title: str) -> None:
    """``plots/confusion_matrix_<split>.png`` for each split of ``probs`` (labels and probabilities by split), and
    the counts as ``reports/confusion_matrix_<split>.json`` for tools that compare runs (studies)."""
    from training import plots
    from training.metrics import confusion

    for split, split_probs in probs.items():
        matrix = confusion(labels[split], split_probs, len(class_names))
        log_json({"class_names": list(class_names), "counts": matrix.tolist()}, confusion_matrix_path(split))
        log_figure(
            plots.confusion_matrix_figure(matrix, class_names, f"{title}, {split}"),
            f"plots/confusion_matrix_{split}.png",
        )


def confusion_matrix_path(split: str) -> str:
    return f"reports/confusion_matrix_{split}.json"


def log_model(model: torch.nn.Module, parity_images: torch.Tensor, card: ModelCard):
    """The trained model in MLflow's pt2 format (a traced graph, dynamic batch) with its card and parity batch."""
    model.eval()
    example = parity_images[:2].float() / 255.0
    example_np = example.numpy()
    with torch.no_grad():
        output = model(example).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(PARITY_ARTIFACT).name
        np.save(path, parity_images.numpy())
        mlflow.log_artifact(str(path), str(Path(PARITY_ARTIFACT).parent))
    return mlflow.pytorch.log_model(
        model,
        name=MODEL_ARTIFACT,
        input_example=example_np,
        signature=infer_signature(example_np, output),
        metadata={METADATA_KEY: card.to_dict()},
        pip_requirements=_pip_requirements(),
    )


def _pip_requirements() -> list[str]:
    """Pin what the model needs to load; avoids MLflow's slow environment inference."""
    import importlib.metadata as md

    return [f"{pkg}=={md.version(pkg)}" for pkg in ("torch", "mlflow", "numpy")]


def log_json(data: dict, path: str) -> None:
    mlflow.log_text(json.dumps(data, indent=2, sort_keys=True, default=str), path)
