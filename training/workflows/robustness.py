"""How a model holds up on corrupted scans: the MedMNIST-C corruptions of its dataset, five severities each.

    python -m training.cli robustness --model medzoo-organamnist@champion     # or --run <run id>
    mlflow run . -e robustness --env-manager local -P model=medzoo-organamnist@champion

The graph evaluated is the ONNX graph that is served (a registered version's, or the run's, exported and
parity-checked here without logging it), on a seeded, stratified subsample of the test split (``max_images``)
corrupted by :mod:`training.core.corruptions`. Logged as one MLflow run in the dataset's experiment: balanced
accuracy clean and per corruption and severity (``bacc_<corruption>``, step = severity), the paper's BE and rBE
against the package's AlexNet, ``robustness.json`` and a heat map. The summary goes onto the model card: a
registered version gets it as a tag (deploy serves it) and in its description; a run keeps it as a tag, which
``register`` copies onto the version it creates. Nothing here tunes anything: it only reads the test split.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import onnx
from mlflow.exceptions import MlflowException
from sklearn.metrics import balanced_accuracy_score
from tqdm.auto import tqdm

from contract import ROBUSTNESS_TAG, ModelCard
from training.core import corruptions, plots
from training.core.data import load_dataset, stratified_subset
from training.core.options import AUTO, NONE, option
from training.export.onnx import export_run, onnx_probabilities
from training.export.register import describe_version
from training.tracking import lifecycle, records

ALL = "all"


@dataclass
class RobustnessOptions:
    run: str = option(NONE, "a training run whose model is evaluated (or give model)")
    model: str = option(NONE, "a registered version: <name>@<alias> or <name>/<version> (or give run)")
    corruptions: list = option([ALL], f"comma-separated MedMNIST-C corruptions of the dataset ({ALL}: every one)")
    max_images: int = option(1000, "seeded, stratified subsample of the test split (0: all of it)")
    seed: int = option(0, "seed of the subsample and of the random corruptions")
    data_dir: str = option(AUTO, "folder with the dataset files (auto: $MEDZOO_DATA_DIR, else ~/.medmnist)")


class RobustnessError(ValueError):
    """Nothing to evaluate, or a bad argument; the message says what exists."""


@dataclass
class Target:
    proto: onnx.ModelProto
    card: ModelCard
    source_run: str
    registered: tuple[str, str] | None = None  # (name, version)

    def describe(self) -> str:
        return f"{self.registered[0]} v{self.registered[1]}" if self.registered else f"run {self.source_run}"


@dataclass
class RobustnessOutcome:
    run_id: str
    summary: dict
    scores: dict[str, list[float]]  # corruption -> balanced accuracy per severity


def resolve_target(run: str, model: str) -> Target:
    if (run == NONE) == (model == NONE):
        raise RobustnessError(
            "give exactly one of run=<training run id> or model=<name>@<alias> | <name>/<version> "
            f"(given: run={run!r}, model={model!r})."
        )
    if run != NONE:
        result = export_run(run, log=False)
        return Target(result.proto, result.card, run)
    name, version = _registered_version(model)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=tmp))
        proto = onnx.load(str(local / "model.onnx"))
    card = ModelCard.from_props({p.key: p.value for p in proto.metadata_props})
    return Target(proto, card, card.source_run, (name, version))


def _registered_version(spec: str) -> tuple[str, str]:
    client = mlflow.MlflowClient()
    name, alias = spec.split("@", 1) if "@" in spec else (spec, "")
    name, version = name.split("/", 1) if "/" in name and not alias else (name, "")
    try:
        if alias:
            return name, str(client.get_model_version_by_alias(name, alias).version)
        if version:
            return name, str(client.get_model_version(name, version).version)
    except MlflowException:
        pass
    known = [
        f"{m.name} ({', '.join(f'@{a}' for a in sorted(m.aliases)) or 'no aliases'})"
        for m in client.search_registered_models()
    ]
    raise RobustnessError(
        f"model={spec!r} is not a registered version: write <name>@<alias> or <name>/<version>; registered: "
        f"{', '.join(known) or 'none'}."
    )


def balanced_errors(scores: dict[str, list[float]], clean: float, baseline: dict | None) -> dict[str, dict]:
    """The paper's BE and rBE per corruption (errors = 1 - balanced accuracy, averaged over severities, against
    AlexNet's errors), as medmnistc's Evaluator computes them; empty without a baseline."""
    if not baseline:
        return {}
    clean_error, alex_clean = 1.0 - clean, baseline["clean_score"]
    out = {}
    for name, accuracies in scores.items():
        error, alex = 1.0 - float(np.mean(accuracies)), baseline["raw_scores"][name]
        out[name] = {"be": error / alex, "rbe": (error - clean_error) / (alex - alex_clean)}
    return out


def summarise(scores: dict[str, list[float]], clean: float, per_corruption: dict, run_id: str, images: int) -> dict:
    means = {name: float(np.mean(acc)) for name, acc in scores.items()}
    worst = min(means, key=means.get)
    nan = float("nan")
    return {
        "clean_balanced_acc": clean,
        "corrupted_balanced_acc": float(np.mean(list(means.values()))),
        "be": float(np.mean([v["be"] for v in per_corruption.values()])) if per_corruption else nan,
        "rbe": float(np.mean([v["rbe"] for v in per_corruption.values()])) if per_corruption else nan,
        "worst_corruption": worst,
        "worst_balanced_acc": means[worst],
        "corruptions": len(scores),
        "images": images,
        "run_id": run_id,
    }


def run_robustness(options: RobustnessOptions, progress: bool = True) -> RobustnessOutcome:
    if options.max_images < 0:
        raise RobustnessError(f"max_images={options.max_images} must be >= 0 (0: the whole test split).")
    target = resolve_target(options.run, options.model)
    card = target.card
    names = None if options.corruptions == [ALL] else [str(c) for c in options.corruptions]
    chosen = corruptions.corruptions_of(card.dataset, names)  # before any run exists: a bad name changes nothing
    dataset = load_dataset(
        card.dataset, None if options.data_dir == AUTO else options.data_dir, size=card.preprocessing.input_size
    )
    test = dataset.test
    if options.max_images:
        test = stratified_subset(test, options.max_images, options.seed)
    images, labels = test.images.numpy(), test.labels.numpy()
    tags = {"kind": "robustness", "dataset": card.dataset, "source_run": target.source_run}
    if target.registered:
        tags.update(registered_model=target.registered[0], model_version=target.registered[1])
    with lifecycle.tracked_run(f"robustness-{card.dataset}", tags, experiment=card.dataset) as run:
        mlflow.log_params(
            {
                "target": target.describe(),
                "corruptions": ",".join(chosen),
                "severities": corruptions.SEVERITIES,
                "test_images": len(labels),
                "seed": options.seed,
            }
        )

        def score(pixels: np.ndarray) -> float:
            probs = onnx_probabilities(target.proto, pixels.astype(np.float32) / 255.0)
            return float(balanced_accuracy_score(labels, probs.argmax(1)))

        clean = score(images)
        scores: dict[str, list[float]] = {}
        cases = [(n, s) for n in chosen for s in range(1, corruptions.SEVERITIES + 1)]
        for case, (name, severity) in enumerate(tqdm(cases, desc="corruptions", unit="case", disable=not progress)):
            damaged = corruptions.corrupt(images, chosen[name], severity, seed=options.seed * 1000 + case)
            scores.setdefault(name, []).append(score(damaged))
            mlflow.log_metric(f"bacc_{name}", scores[name][-1], step=severity)
        per_corruption = balanced_errors(scores, clean, corruptions.alexnet_baseline(card.dataset))
        summary = summarise(scores, clean, per_corruption, run.info.run_id, len(labels))
        mlflow.log_metrics({k: v for k, v in summary.items() if isinstance(v, float) and not np.isnan(v)})
        records.log_json(
            {"summary": summary, "balanced_accuracy": scores, "errors_vs_alexnet": per_corruption},
            "robustness.json",
        )
        title = f"{card.architecture} on {card.dataset} ({target.describe()}), {len(labels)} test images"
        records.log_figure(
            plots.robustness_figure(np.array([scores[n] for n in chosen]), list(chosen), clean, title),
            "plots/robustness.png",
        )
        _record_on_model(target, summary)
        return RobustnessOutcome(run.info.run_id, summary, scores)


def _record_on_model(target: Target, summary: dict) -> None:
    """The summary where the card is made from: the registered version (tag and description) or the run."""
    client = mlflow.MlflowClient()
    text = json.dumps(summary, sort_keys=True)
    if target.registered is None:
        client.set_tag(target.source_run, ROBUSTNESS_TAG, text)
        return
    name, version = target.registered
    client.set_model_version_tag(name, version, ROBUSTNESS_TAG, text)
    card = target.card.with_robustness(summary).with_registry(name, version)
    parity = client.get_model_version(name, version).tags.get("parity", "")
    client.update_model_version(name, version, description=describe_version(card, parity))
