"""Classical estimators (SVM, random forest, decision tree, k-NN, logistic regression) on CNN features or pixels.

    python -m training.cli classical --dataset breastmnist --features <run_id> --model svm
    mlflow run . -e classical --env-manager local -P dataset=breastmnist -P features=raw -P model=rf

Hyper-parameters come from GridSearchCV (stratified k-fold on the training split, grids in
configs/classical_grids.yaml); validation scores the chosen estimator and the test split is read once, after.
The run logs what a training run logs (same metric names, confusion matrices, the model card) plus the CV table,
a PCA view of the features and, for trees, their decision regions on the PCA plane. Its model is one ONNX graph
(features + estimator, log-probabilities out), parity-checked against the Python path before it is logged, so
register / deploy / the service take it like any network.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import torch
import yaml
from sklearn.base import clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.decomposition import PCA
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from sklearn.tree import DecisionTreeClassifier

from contract import ModelCard, Preprocessing
from training.core import plots
from training.core.calibration import calibrate, tempered
from training.core.data import DatasetError, card_data, check_dataset_name, load_dataset
from training.core.features import RAW, FeaturesError, RawPixels, extract, rebuild_network, without_classifier
from training.core.metrics import top_confusions
from training.core.options import AUTO, OptionError, option, reproduce_command
from training.core.paths import CONFIGS_DIR, PROJECT_DIR
from training.export import compose
from training.export.onnx import ExportError, export_onnx, load_logged_model, log_graph_model
from training.tracking import lifecycle, records

GRID_FILE = CONFIGS_DIR / "classical_grids.yaml"
TREES = ("dt", "rf")


def _svm(seed: int):
    # SVC(probability=True) is deprecated in scikit-learn 1.9: Platt scaling through CalibratedClassifierCV.
    return CalibratedClassifierCV(SVC(random_state=seed), ensemble=False, cv=3)


# name -> (what it is, a factory taking the seed, the prefix of its grid keys inside the estimator)
ESTIMATORS = {
    "svm": ("support vector machine, RBF kernel, Platt-scaled probabilities", _svm, "estimator__"),
    "rf": ("random forest", lambda seed: RandomForestClassifier(random_state=seed, n_jobs=-1), ""),
    "dt": ("decision tree", lambda seed: DecisionTreeClassifier(random_state=seed), ""),
    "knn": ("k nearest neighbours", lambda seed: KNeighborsClassifier(), ""),
    "logreg": ("multinomial logistic regression", lambda seed: LogisticRegression(max_iter=2000), ""),
}


class ClassicalError(OptionError):
    """A bad classical-run value (estimator, grid key, features source); the message names it and what is allowed."""


@dataclass
class ClassicalConfig:
    dataset: str = option("breastmnist", "MedMNIST flag (breastmnist, bloodmnist, ...)")
    features: str = option(RAW, f"a training run's id (its penultimate-layer features) or {RAW} (the pixels)")
    model: str = option("svm", f"estimator: {', '.join(ESTIMATORS)}")
    grid_file: str = option(str(GRID_FILE.relative_to(PROJECT_DIR)), "YAML of hyper-parameter grids")
    cv: int = option(3, "folds of the stratified cross-validation on the training split")
    seed: int = option(0, "random seed (folds, forests, subsampling)")
    data_dir: str = option(AUTO, "folder with the dataset files (auto: $MEDZOO_DATA_DIR, else ~/.medmnist)")
    max_train_samples: int = option(0, "seeded, stratified subsample of the training split (0: all)")


@dataclass
class ClassicalOutcome:
    run_id: str
    best_params: dict
    val_metrics: dict[str, float]
    test_metrics: dict[str, float]
    parity_max_diff: float


def estimator_pipeline(model: str, seed: int) -> Pipeline:
    return Pipeline([("scale", StandardScaler()), ("clf", ESTIMATORS[model][1](seed))])


def load_grid(model: str, path: str | Path = GRID_FILE) -> dict[str, list]:
    """The grid of ``model``, keys checked against the estimator's parameters, as Pipeline parameter names."""
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = PROJECT_DIR / path
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ClassicalError(f"grid_file={str(path)!r}: {err}") from None
    grid = document.get(model)
    if not isinstance(grid, dict) or not grid:
        raise ClassicalError(
            f"grid_file {path} has no grid for model {model!r}; it has: {', '.join(document) or 'none'}."
        )
    _, factory, prefix = ESTIMATORS[model]
    allowed = sorted(
        k[len(prefix) :] for k in factory(0).get_params() if k.startswith(prefix) and "__" not in k[len(prefix) :]
    )
    unknown = [k for k in grid if k not in allowed]
    if unknown:
        raise ClassicalError(
            f"grid_file {path}: {model} has no parameter {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(allowed)}."
        )
    return {f"clf__{prefix}{k}": v if isinstance(v, list) else [v] for k, v in grid.items()}


def validate(config: ClassicalConfig) -> dict[str, list]:
    """Every check that needs no training: bad values fail before a run exists. Returns the grid."""
    try:
        check_dataset_name(config.dataset)
    except DatasetError as err:
        raise ClassicalError(str(err)) from None
    if config.model not in ESTIMATORS:
        raise ClassicalError(f"model={config.model!r} is not one of: {', '.join(ESTIMATORS)}.")
    if config.cv < 2:
        raise ClassicalError(f"cv={config.cv!r} must be >= 2.")
    if config.features != RAW:
        run = _features_run(config.features)
        trained_on = run.data.tags.get("dataset")
        if trained_on != config.dataset:
            raise ClassicalError(
                f"features={config.features!r} is a run on {trained_on!r}, not on dataset {config.dataset!r}."
            )
    return load_grid(config.model, config.grid_file)


def _features_run(run_id: str):
    try:
        return mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise FeaturesError(
            f"features={run_id!r}: no such run in {mlflow.get_tracking_uri()} (give a training run's id or {RAW})."
        ) from None


def feature_extractor(config: ClassicalConfig, in_chans: int, size: int) -> tuple[torch.nn.Module, Preprocessing, str]:
    """The module that turns pixels into features, the preprocessing its graph applies, and a short name."""
    if config.features == RAW:
        return RawPixels(), Preprocessing(size, in_chans, (0.0,) * in_chans, (1.0,) * in_chans), RAW
    try:
        logged, card = load_logged_model(config.features)
    except ExportError as err:
        raise FeaturesError(str(err)) from None
    return without_classifier(rebuild_network(logged, card)), card.preprocessing, card.architecture


def run_classical(config: ClassicalConfig, nested: bool = False, tags: dict | None = None) -> ClassicalOutcome:
    grid = validate(config)
    tags = {
        "model": config.model,
        "dataset": config.dataset,
        "kind": "classical",
        "features": config.features,
        **(tags or {}),
    }
    run_name = f"{config.model}-{config.dataset}"
    with lifecycle.tracked_run(run_name, tags, nested=nested, experiment=config.dataset) as run:
        started = time.perf_counter()
        dataset = load_dataset(
            config.dataset,
            None if config.data_dir == AUTO else config.data_dir,
            max_train_samples=config.max_train_samples or None,
            seed=config.seed,
        )
        extractor, preprocessing, source = feature_extractor(config, dataset.channels, dataset.size)
        features = {split: extract(extractor, dataset.split(split).images) for split in ("train", "val", "test")}
        labels = {split: dataset.split(split).labels.numpy() for split in ("train", "val", "test")}
        records.log_new_params(
            {
                **{k: str(v) for k, v in vars(config).items()},
                "feature_source": source,
                "n_features": features["train"].shape[1],
                "train_samples": len(labels["train"]),
                "grid": str({k.split("__")[-1]: v for k, v in grid.items()}),
            }
        )
        records.log_dataset(dataset)

        search = GridSearchCV(
            estimator_pipeline(config.model, config.seed),
            grid,
            cv=StratifiedKFold(config.cv, shuffle=True, random_state=config.seed),
            scoring="accuracy",
            n_jobs=-1,
        )
        search.fit(features["train"], labels["train"])
        estimator = search.best_estimator_
        best_params = {k.split("__")[-1]: v for k, v in search.best_params_.items()}
        mlflow.log_params({f"best.{k}": str(v) for k, v in best_params.items()})
        cv_table = pd.DataFrame(search.cv_results_)
        cv_table = cv_table[[c for c in cv_table.columns if c.startswith(("param_", "mean_", "std_", "rank_"))]]
        mlflow.log_table(
            cv_table.astype({c: str for c in cv_table.columns if c.startswith("param_")}), "cv_results.json"
        )

        # The test split is scored once, after the grid search chose on the training folds.
        val_probs = estimator.predict_proba(features["val"])
        test_probs = estimator.predict_proba(features["test"])
        names = dataset.class_names
        title = f"{config.model} on {source} features, {dataset.name}"
        # Calibrated like a network: an SVM's Platt probabilities or a forest's votes are rarely what they say.
        calibration = calibrate("temperature", val_probs, labels["val"], test_probs, labels["test"])
        records.log_calibration(calibration, {"val": val_probs, "test": test_probs}, labels, title)
        val_probs, test_probs = (tempered(p, calibration.temperature) for p in (val_probs, test_probs))
        val_metrics, test_metrics = records.log_final_scores(
            labels, {"val": val_probs, "test": test_probs}, names, title, {"cv_acc": float(search.best_score_)}
        )
        _log_figures(config, title, dataset, features, labels, estimator)

        card = ModelCard(
            architecture=f"{config.model}({source})",
            dataset=dataset.name,
            task=dataset.task,
            class_names=tuple(names),
            preprocessing=preprocessing,
            model_options={k: str(v) for k, v in best_params.items()},
            command=reproduce_command("classical", config, keep=("dataset", "model", "features", "seed")),
            data=card_data(dataset),
            confusions=tuple(top_confusions(labels["test"], test_probs, names)),
            **calibration.card_fields(),
        ).with_run(run.info.run_id, {**calibration.metrics, **val_metrics, **test_metrics})
        records.log_card(card)
        extractor_graph = export_onnx(extractor, dataset.size, dataset.channels, {}, output_name=compose.FEATURES)
        estimator_graph = compose.sklearn_graph(
            estimator, features["train"].shape[1], compose.opset_of(extractor_graph)
        )
        proto = compose.chain(extractor_graph, estimator_graph, card.to_props(), calibration.temperature)
        images = dataset.val.images[: records.PARITY_IMAGES]
        python_path = tempered(estimator.predict_proba(extract(extractor, images)), calibration.temperature)
        parity = log_graph_model(proto, card, images, python_path)
        mlflow.log_metric("wall_time", time.perf_counter() - started)
        return ClassicalOutcome(run.info.run_id, best_params, val_metrics, test_metrics, parity.max_abs_diff)


def _log_figures(config, title: str, dataset, features, labels, estimator) -> None:
    names = dataset.class_names
    pca = PCA(2, random_state=config.seed).fit(features["train"])
    plane = pca.transform(features["train"])
    records.log_figure(
        plots.pca_scatter_figure(
            plane, labels["train"], names, pca.explained_variance_ratio_, f"{title}: train features"
        ),
        "plots/pca_features.png",
    )
    if config.model in TREES:
        # The chosen tree model refitted on the two PCA coordinates: its regions are what the plane can show.
        flat = clone(estimator).fit(plane, labels["train"])
        records.log_figure(
            plots.decision_regions_figure(
                flat, plane, labels["train"], names, f"{title}: decision regions (PCA plane)"
            ),
            "plots/decision_regions_pca.png",
        )
