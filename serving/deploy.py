"""Import the registry's champions into the BentoML model store, ready for ``serving.service``.

    mlflow run . -e deploy --env-manager local
    python -m training.cli deploy [--datasets organamnist,bloodmnist]

For every registered model ``medzoo-<dataset>`` with a ``champion`` alias, the champion's ONNX file and its
model card (the ONNX metadata_props, plus the registered name and version) become BentoML model
``medzoo-<dataset>``. A champion already imported is not imported twice.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import bentoml
import mlflow
import onnx

from contract import (
    CHAMPION_ALIAS,
    EXPLAIN_FILE,
    ROBUSTNESS_TAG,
    ModelCard,
    dataset_of_registered_model,
    registered_model_name,
)
from serving.catalog import ONNX_FILE


class DeployError(ValueError):
    """Nothing to deploy, or a named dataset without a champion; the message says what exists."""


def champions() -> dict[str, object]:
    """registered model name -> champion ModelVersion, for every medzoo-* model that has one."""
    client = mlflow.MlflowClient()
    found = {}
    for registered in client.search_registered_models():
        if dataset_of_registered_model(registered.name) and CHAMPION_ALIAS in (registered.aliases or {}):
            found[registered.name] = client.get_model_version_by_alias(registered.name, CHAMPION_ALIAS)
    return found


# Where MLflow keeps a model's extra files (the explanation graph) inside the model's folder.
EXTRA_FILES = "extra_files"


def robustness_run(version) -> str:
    """The run that measured the version's robustness ("" when none did): a new measurement is a new import."""
    return json.loads(version.tags[ROBUSTNESS_TAG])["run_id"] if ROBUSTNESS_TAG in version.tags else ""


def already_imported(name: str, version: str, source_run: str, robustness: str = "") -> bentoml.Model | None:
    try:
        stored = bentoml.models.list(name)
    except bentoml.exceptions.NotFound:
        return None
    for model in stored:
        labels = model.info.labels
        if (labels.get("model_version"), labels.get("source_run"), labels.get("robustness_run", "")) == (
            version,
            source_run,
            robustness,
        ):
            return model
    return None


def import_champion(name: str, version) -> tuple[bentoml.Model, bool]:
    source_run = version.tags.get("source_run", "")
    existing = already_imported(name, str(version.version), source_run, robustness_run(version))
    if existing is not None:
        return existing, False
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@{CHAMPION_ALIAS}", dst_path=tmp))
        proto = onnx.load(str(local / "model.onnx"))
        explanation = local / EXTRA_FILES / EXPLAIN_FILE
        explanation = onnx.load(str(explanation)) if explanation.exists() else None
    card = ModelCard.from_props({p.key: p.value for p in proto.metadata_props}).with_registry(name, version.version)
    if ROBUSTNESS_TAG in version.tags:  # measured after the export: the registry holds it, the file does not
        card = card.with_robustness(json.loads(version.tags[ROBUSTNESS_TAG]))
    labels = {
        "dataset": card.dataset,
        "model_version": str(version.version),
        "source_run": source_run,
        "robustness_run": robustness_run(version),
    }
    with bentoml.models.create(name, labels=labels, metadata=card.to_props()) as model:
        onnx.save(proto, model.path_of(ONNX_FILE))
        if explanation is not None:
            onnx.save(explanation, model.path_of(EXPLAIN_FILE))
    return model, True


def deploy(datasets: list[str] | None = None) -> list[str]:
    found = champions()
    if datasets:
        wanted = {registered_model_name(d) for d in datasets}
        missing = sorted(wanted - set(found))
        if missing:
            raise DeployError(
                f"no champion for {', '.join(missing)}; champions exist for: "
                f"{', '.join(sorted(found)) or 'none'} (run the register step first)."
            )
        found = {k: v for k, v in found.items() if k in wanted}
    if not found:
        raise DeployError(
            f"the registry at {mlflow.get_tracking_uri()} has no medzoo-* model with a "
            f"'{CHAMPION_ALIAS}' alias; train and register first."
        )
    lines = []
    for name, version in sorted(found.items()):
        model, created = import_champion(name, version)
        verb = "imported" if created else "already in the store as"
        lines.append(f"{name} v{version.version} {verb} {model.tag}")
    return lines


def bentoml_home() -> str:
    from bentoml._internal.configuration.containers import BentoMLContainer

    return str(BentoMLContainer.bentoml_home.get())
