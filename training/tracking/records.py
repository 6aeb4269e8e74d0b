"""What a run records beside its metrics: params, notes, dataset inputs, figures, JSON and the model.

The model is logged with everything later steps need (architecture, preprocessing, class names), so the
register/export step and the service never have to re-read the training data or the config.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.data.http_dataset_source import HTTPDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.models import infer_signature

from contract import METADATA_KEY, ModelCard, card_markdown
from training.core import plots
from training.core.calibration import ECE_BINS, Calibration, tempered
from training.core.data import ImageDataset
from training.core.metrics import classification_metrics, confusion
from training.core.plots import plt

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"
# Validation images (uint8) logged beside the model, so export checks ONNX parity without the dataset file.
PARITY_ARTIFACT = "parity/images.npy"
PARITY_IMAGES = 64
NOTES_TAG = "medzoo.notes"


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
    mlflow.log_figure(figure, path)
    plt.close(figure)


def log_confusion_matrices(labels: dict, probs: dict, class_names: list[str], title: str) -> None:
    """``plots/confusion_matrix_<split>.png`` for each split of ``probs`` (labels and probabilities by split), and
    the counts as ``reports/confusion_matrix_<split>.json`` for tools that compare runs (studies)."""
    for split, split_probs in probs.items():
        matrix = confusion(labels[split], split_probs, len(class_names))
        log_json({"class_names": list(class_names), "counts": matrix.tolist()}, confusion_matrix_path(split))
        log_figure(
            plots.confusion_matrix_figure(matrix, class_names, f"{title}, {split}"),
            f"plots/confusion_matrix_{split}.png",
        )


def log_final_scores(
    labels: dict[str, np.ndarray], probs: dict[str, np.ndarray], class_names: list[str], title: str, extra: dict
) -> tuple[dict[str, float], dict[str, float]]:
    """What every kind of run logs once its model is chosen: the validation and test scores (the test split is
    read here, once, after selection) as ``best_val_*`` and ``test_*`` metrics beside ``extra``, and a confusion
    matrix per split. Returns the (validation, test) metrics."""
    scores = {
        split: {f"{prefix}_{k}": v for k, v in classification_metrics(labels[split], probs[split], class_names).items()}
        for split, prefix in (("val", "best_val"), ("test", "test"))
    }
    mlflow.log_metrics({**scores["val"], **scores["test"], **extra})
    log_confusion_matrices(labels, probs, class_names, title)
    return scores["val"], scores["test"]


def log_calibration(calibration: Calibration, probs: dict, labels: dict, title: str) -> None:
    """The calibration metrics, ``calibration.json`` (temperature, conformal thresholds) and the test split's
    reliability diagram before and after the temperature (``plots/reliability.png``)."""
    mlflow.log_metrics(calibration.metrics)
    log_json(
        {
            "temperature": calibration.temperature,
            "conformal_thresholds": calibration.thresholds,
            "conformal_penalty": calibration.penalty.to_dict(),
            "conformal_images": calibration.conformal_images,
        },
        "calibration.json",
    )
    curves = {"uncalibrated": (probs["test"], labels["test"])}
    if calibration.temperature != 1.0:
        curves[f"temperature {calibration.temperature:.2f}"] = (
            tempered(probs["test"], calibration.temperature),
            labels["test"],
        )
    log_figure(plots.reliability_figure(curves, ECE_BINS, f"{title}: test reliability"), "plots/reliability.png")


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
        # MLflow would load the saved graph back and run the example for `mlflow models serve` (about 1 s a run),
        # and only warn if it failed; the ONNX export loads the same graph and checks it against onnxruntime. The
        # pt2 format passes no other keyword on to torch.
        validate_serving_input=False,
    )


def _pip_requirements() -> list[str]:
    """Pin what the model needs to load; avoids MLflow's slow environment inference."""
    import importlib.metadata as md

    return [f"{pkg}=={md.version(pkg)}" for pkg in ("torch", "mlflow", "numpy")]


CARD_ARTIFACT = "model_card.md"


def log_card(card: ModelCard) -> None:
    """The model card as people read it (``model_card.md``); registering the run renders it again with the
    registry version. A card that cannot be built is said in the log, not raised: the run's model is already
    trained, and register refuses it with the same message."""
    try:
        mlflow.log_text(card_markdown.render(card), CARD_ARTIFACT)
    except card_markdown.CardError as err:
        log.warning("%s", err)


def log_json(data: dict, path: str) -> None:
    mlflow.log_text(json.dumps(data, indent=2, sort_keys=True, default=str), path)
