"""Register the best run of a dataset as an ONNX model version and gate the ``champion`` alias.

    python -m training.cli register --dataset organamnist [--metric auc] [--force true]
    mlflow run . -e register --env-manager local -P dataset=organamnist

Only validation metrics choose: the best finished run by ``best_val_<metric>`` (ties: fewer parameters, then
the earlier run). Its model is exported to ONNX and parity-checked before anything is written; the new
version's description is its model card (``contract.card_markdown``). It becomes ``champion`` only if its card
can be built and it beats the current champion on the same metric (or with ``force``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
from filelock import FileLock
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from contract import CHAMPION_ALIAS, METADATA_KEY, ROBUSTNESS_TAG, ModelCard, card_markdown, registered_model_name
from training.core.config import RANKING_METRICS
from training.core.data import DatasetError, check_dataset_name
from training.core.options import option
from training.export.onnx import export_run
from training.tracking.records import MODEL_ARTIFACT

REGISTER_LOCK_TIMEOUT_S = 1800  # an export with its parity check takes seconds; a queue of them, minutes


@dataclass
class RegisterOptions:
    dataset: str = option("organamnist", "dataset whose best finished run is registered")
    metric: str = option("auc", "validation metric that chooses: auc or acc")
    force: bool = option(False, "make the chosen version champion even if it does not beat the current one")


class RegistrationError(ValueError):
    """Nothing to register, or a bad argument; the message says what exists. Nothing was changed."""


@dataclass
class RegistrationResult:
    name: str
    version: str
    run_id: str
    metric: str
    score: float
    promoted: bool
    created: bool
    message: str


def metric_key(metric: str) -> str:
    short = metric.removeprefix("best_").removeprefix("val_")
    if short not in RANKING_METRICS:
        raise RegistrationError(f"metric={metric!r} is not one of: {', '.join(RANKING_METRICS)} (validation metrics).")
    return f"best_val_{short}"


def candidate_runs(dataset: str) -> list[Run]:
    """Finished training runs of ``dataset`` that logged a MedZoo model, across all experiments."""
    experiments = [e.experiment_id for e in mlflow.search_experiments()]
    runs = mlflow.search_runs(
        experiment_ids=experiments,
        output_format="list",
        filter_string=f"tags.dataset = '{dataset}' and attributes.status = 'FINISHED'",
    )
    return [run for run in runs if _has_model(run)]


def _has_model(run: Run) -> bool:
    try:
        mlflow.models.get_model_info(f"runs:/{run.info.run_id}/{MODEL_ARTIFACT}")
        return True
    except MlflowException:
        return False


def choose_best(runs: list[Run], key: str) -> Run:
    scored = [r for r in runs if key in r.data.metrics]
    if not scored:
        logged = sorted({k for r in runs for k in r.data.metrics if k.startswith("best_val_")})
        raise RegistrationError(
            f"no run logged {key!r}; the runs have: {', '.join(logged) or 'no validation metrics'}."
        )
    return max(scored, key=lambda r: (r.data.metrics[key], -r.data.metrics.get("n_params", 0), -r.info.start_time))


def register_best(dataset: str, metric: str = "auc", force: bool = False) -> RegistrationResult:
    try:
        check_dataset_name(dataset)
    except DatasetError as err:
        raise RegistrationError(str(err)) from None
    key = metric_key(metric)
    runs = candidate_runs(dataset)
    if not runs:
        trained = sorted({r.data.tags.get("dataset") for r in _all_finished_runs()} - {None})
        raise RegistrationError(
            f"no finished runs with a model for dataset {dataset!r}; "
            f"datasets with runs: {', '.join(trained) or 'none'}."
        )
    best = choose_best(runs, key)
    return register_run(best, dataset, key, force)


@contextlib.contextmanager
def registry_lock(name: str):
    """One registration of a model at a time on this machine: two `register` processes started together would
    both find no version for the run (and add two) and both move the alias (the last, not the best, winning).
    MLflow's registry has no compare-and-set, so a file lock keyed by registry and model serialises them."""
    key = hashlib.sha256(f"{mlflow.get_registry_uri()}|{name}".encode()).hexdigest()[:16]
    with FileLock(Path(tempfile.gettempdir()) / f"medzoo-register-{key}.lock", timeout=REGISTER_LOCK_TIMEOUT_S):
        yield


def register_run(run: Run, dataset: str, key: str, force: bool) -> RegistrationResult:
    client = mlflow.MlflowClient()
    name = registered_model_name(dataset)
    run_id, score = run.info.run_id, run.data.metrics[key]
    with registry_lock(name):
        existing = _version_of_run(client, name, run_id)
        created = existing is None
        if created:
            version, card = _register_new_version(client, name, run)
        else:
            version, card = str(existing.version), _card_of_version(name, str(existing.version), run)
        problem = _card_problem(card)
        if problem:
            promoted, why = False, f"{CHAMPION_ALIAS} not moved: {problem}"
        else:
            promoted, why = _gate_champion(client, name, version, key, score, force)
    verb = "registered as" if created else "already registered as"
    message = f"run {run_id} ({run.data.tags.get('model')}, {key} {score:.4f}) {verb} {name} v{version}; {why}"
    return RegistrationResult(name, str(version), run_id, key, score, promoted, created, message)


def _all_finished_runs() -> list[Run]:
    experiments = [e.experiment_id for e in mlflow.search_experiments()]
    return mlflow.search_runs(
        experiment_ids=experiments, output_format="list", filter_string="attributes.status = 'FINISHED'"
    )


def _version_of_run(client, name: str, run_id: str):
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    return next((v for v in versions if v.tags.get("source_run") == run_id), None)


def _register_new_version(client, name: str, run: Run) -> tuple[str, ModelCard | None]:
    """Export and check first (no store change on failure), then register and describe with the model card."""
    result = export_run(run.info.run_id)
    # The run's metrics as they stand now (the card holds those of training time).
    card, parity = result.card.with_run(run.info.run_id, run.data.metrics), result.parity.describe()
    tags = card.registry_tags(parity)
    if ROBUSTNESS_TAG in run.data.tags:  # measured on the run before registering: the version keeps it
        card = card.with_robustness(json.loads(run.data.tags[ROBUSTNESS_TAG]))
        tags[ROBUSTNESS_TAG] = run.data.tags[ROBUSTNESS_TAG]
    version = str(mlflow.register_model(result.model_uri, name, tags=tags).version)
    card = card.with_registry(name, version)
    client.update_model_version(name, version, description=describe_version(card, parity))
    return version, card


def _card_of_version(name: str, version: str, run: Run) -> ModelCard | None:
    """The card a registered version's model carries (with its run's metrics as they stand now), or None when
    it carries none."""
    metadata = (mlflow.models.get_model_info(f"models:/{name}/{version}").metadata or {}).get(METADATA_KEY)
    if not metadata:
        return None
    return ModelCard.from_dict(metadata).with_run(run.info.run_id, run.data.metrics).with_registry(name, version)


def _card_problem(card: ModelCard | None) -> str:
    """Why the version's model card cannot be built ("" when it can)."""
    if card is None:
        return "the version's model carries no MedZoo model card; train the run again and register the new one."
    try:
        card_markdown.render(card)
    except card_markdown.CardError as err:
        return str(err)
    return ""


def describe_version(card: ModelCard, parity: str) -> str:
    """The version's description: its model card, or, when the card cannot be built, what is missing."""
    try:
        text = card_markdown.render(card)
    except card_markdown.CardError as err:
        return f"**{card.architecture}** trained on **{card.dataset}** (run `{card.source_run}`). No model card: {err}"
    return f"{text}\nONNX parity vs PyTorch: {parity}.\n"


def _gate_champion(client, name: str, version: str, key: str, score: float, force: bool) -> tuple[bool, str]:
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION_ALIAS)
    except MlflowException:
        champion = None
    if champion is not None and str(champion.version) == str(version):
        return False, f"it is already the {CHAMPION_ALIAS}."
    if champion is None:
        client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
        return True, f"it is the first {CHAMPION_ALIAS}."
    # The champion's score as recorded at its registration: its run may since be deleted.
    champion_score = float(champion.tags.get(key, "-inf"))
    if force or score > champion_score:
        client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
        reason = "forced" if force and score <= champion_score else "better"
        return (
            True,
            f"it replaces {CHAMPION_ALIAS} v{champion.version} ({reason}: {key} {score:.4f} vs {champion_score:.4f}).",
        )
    return False, (
        f"{CHAMPION_ALIAS} stays v{champion.version}: its {key} {champion_score:.4f} is not beaten by "
        f"{score:.4f} (use force to override)."
    )
