"""Import the registry's champions into the BentoML model store, ready for ``serving.service``.

    python -m serving.deploy [--datasets organamnist,bloodmnist]
    mlflow run . -e deploy --env-manager local

For every registered model ``medzoo-<dataset>`` with a ``champion`` alias, the champion's ONNX file and
its metadata (ONNX metadata_props plus the version's validation/test metrics) become BentoML model
``medzoo-<dataset>``. A champion already imported is not imported twice.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import bentoml
import mlflow
import onnx
from mlflow.exceptions import MlflowException

from serving.catalog import MODEL_PREFIX

CHAMPION = "champion"


class DeployError(ValueError):
    """Nothing to deploy, or a named dataset without a champion; the message says what exists."""


def champions() -> dict[str, object]:
    """registered model name -> champion ModelVersion, for every medzoo-* model that has one."""
    client = mlflow.MlflowClient()
    found = {}
    for registered in client.search_registered_models():
        if registered.name.startswith(MODEL_PREFIX) and CHAMPION in (registered.aliases or {}):
            found[registered.name] = client.get_model_version_by_alias(registered.name, CHAMPION)
    return found


def already_imported(name: str, version: str, source_run: str) -> bentoml.Model | None:
    try:
        stored = bentoml.models.list(name)
    except bentoml.exceptions.NotFound:
        return None
    for model in stored:
        labels = model.info.labels
        if labels.get("model_version") == version and labels.get("source_run") == source_run:
            return model
    return None


def import_champion(name: str, version) -> tuple[bentoml.Model, bool]:
    source_run = version.tags.get("source_run", "")
    existing = already_imported(name, str(version.version), source_run)
    if existing is not None:
        return existing, False
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@{CHAMPION}", dst_path=tmp))
        proto = onnx.load(str(local / "model.onnx"))
    metadata = {p.key: p.value for p in proto.metadata_props}
    metadata["model_version"] = str(version.version)
    metadata["registered_model"] = name
    for key in ("best_val_acc", "best_val_auc", "test_acc", "test_auc", "n_params"):
        if key in version.tags:
            metadata[key] = version.tags[key]
    labels = {"dataset": metadata["dataset"], "model_version": str(version.version), "source_run": source_run}
    return bentoml.onnx.save_model(name, proto, metadata=metadata, labels=labels), True


def deploy(datasets: list[str] | None = None) -> list[str]:
    found = champions()
    if datasets:
        wanted = {f"{MODEL_PREFIX}{d}" for d in datasets}
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
            f"'{CHAMPION}' alias; train and register first."
        )
    lines = []
    for name, version in sorted(found.items()):
        model, created = import_champion(name, version)
        verb = "imported" if created else "already in the store as"
        lines.append(f"{name} v{version.version} {verb} {model.tag}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serving.deploy", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datasets", default="", help="comma-separated datasets (default: every champion)")
    args = parser.parse_args(argv)
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    try:
        for line in deploy(datasets or None):
            print(line)
    except (DeployError, MlflowException) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"serve with: bentoml serve serving.service:MedZoo (BentoML home: {bentoml_home()})")
    return 0


def bentoml_home() -> str:
    from bentoml._internal.configuration.containers import BentoMLContainer

    return str(BentoMLContainer.bentoml_home.get())


if __name__ == "__main__":
    sys.exit(main())
