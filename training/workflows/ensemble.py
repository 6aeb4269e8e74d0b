"""Weighted ensembles of finished runs of one dataset: networks, classical estimators, several seeds.

    python -m training.cli ensemble --runs <id>,<id>,<id> [--weights auto|0.3,0.7]
    mlflow run . -e ensemble --env-manager local -P runs=<id>,<id> -P weights=0.3,0.7

The class probabilities of the members are averaged with the weights. ``auto`` takes the weights that minimise
the log-loss on the validation split, unless equal weights classify the validation split at least as well (the
test split is read once, after): the log-loss of label-smoothed nets measures their calibration more than their
errors, and on OrganAMNIST it put every weight on the member with the lowest validation ACC. Every member is
scored through its parity-checked ONNX graph, and the ensemble is logged as one ONNX graph feeding the pixels to
all of them, so register / deploy / the service take it like any model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import mlflow
import numpy as np
from scipy.optimize import minimize

from contract import ModelCard, Preprocessing
from training.core import plots
from training.core.calibration import calibrate, tempered
from training.core.data import card_data, load_dataset
from training.core.devices import to_input
from training.core.metrics import top_confusions
from training.core.options import AUTO, OptionError, mlflow_command, option
from training.export import compose
from training.export.onnx import export_run, log_graph_model, logged_model_info, onnx_probabilities
from training.tracking import lifecycle, records


class EnsembleError(OptionError):
    """Runs that cannot be combined, or weights that do not fit them; the message names the value."""


@dataclass
class EnsembleConfig:
    runs: list = option(help="comma-separated ids of finished runs of one dataset (two or more)")
    weights: str = option(
        AUTO,
        f"{AUTO} (validation log-loss, unless equal weights score as much validation ACC) or one weight per run, "
        "summing to 1",
    )
    data_dir: str = option(AUTO, "folder with the dataset files (auto: $MEDZOO_DATA_DIR, else ~/.medmnist)")


@dataclass
class Member:
    run_id: str
    card: ModelCard


@dataclass
class EnsembleOutcome:
    run_id: str
    weights: list[float]
    member_val_acc: list[float]
    member_test_acc: list[float]
    val_metrics: dict[str, float]
    test_metrics: dict[str, float]


def parse_weights(text: str, count: int) -> list[float] | None:
    if text == AUTO:
        return None
    try:
        weights = [float(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise EnsembleError(f"weights={text!r}: {AUTO} or comma-separated numbers.") from None
    if len(weights) != count:
        raise EnsembleError(f"weights={text!r} gives {len(weights)} weights for {count} runs.")
    if min(weights) < 0 or abs(sum(weights) - 1) > 1e-6:
        raise EnsembleError(f"weights={text!r} must be >= 0 and sum to 1 (they sum to {sum(weights):g}).")
    return weights


def members_of(run_ids: list[str]) -> list[Member]:
    """The runs' model cards, checked to be one dataset with one input contract."""
    if len(run_ids) < 2 or len(set(run_ids)) != len(run_ids):
        raise EnsembleError(f"runs={','.join(run_ids)!r}: give two or more different run ids.")
    members = []
    for run_id in run_ids:
        try:
            _, card = logged_model_info(run_id)
        except ValueError as err:
            raise EnsembleError(f"runs: {err}") from None
        members.append(Member(run_id, card))
    datasets = {m.card.dataset for m in members}
    if len(datasets) > 1:
        found = ", ".join(f"{m.run_id}: {m.card.dataset}" for m in members)
        raise EnsembleError(f"runs of different datasets cannot be combined ({found}).")
    inputs = {(m.card.preprocessing.input_size, m.card.preprocessing.in_chans) for m in members}
    if len(inputs) > 1:
        raise EnsembleError(f"the runs take different inputs (size, channels): {sorted(inputs)}; one graph needs one.")
    return members


def fuse(probabilities: list[np.ndarray], weights) -> np.ndarray:
    return sum(w * p for w, p in zip(weights, probabilities))


def validation_weights(probabilities: list[np.ndarray], labels: np.ndarray) -> list[float]:
    """Equal weights, or the weights minimising the validation log-loss where they classify more of it right."""
    equal = [1.0 / len(probabilities)] * len(probabilities)
    fitted = log_loss_weights(probabilities, labels)

    def accuracy(weights) -> float:
        return float((fuse(probabilities, weights).argmax(1) == labels).mean())

    return fitted if accuracy(fitted) > accuracy(equal) else equal


def log_loss_weights(probabilities: list[np.ndarray], labels: np.ndarray) -> list[float]:
    """Weights on the simplex minimising the log-loss of the fused validation probabilities."""

    def log_loss(logits: np.ndarray) -> float:
        weights = np.exp(logits - logits.max())
        weights /= weights.sum()
        fused = fuse(probabilities, weights)[np.arange(len(labels)), labels]
        return float(-np.log(np.maximum(fused, compose.PROBABILITY_FLOOR)).mean())

    found = minimize(log_loss, np.zeros(len(probabilities)), method="Nelder-Mead", options={"xatol": 1e-4})
    weights = np.exp(found.x - found.x.max())
    return [float(w) for w in weights / weights.sum()]


def run_ensemble(config: EnsembleConfig, nested: bool = False, tags: dict | None = None) -> EnsembleOutcome:
    members = members_of([str(r) for r in config.runs])
    given = parse_weights(config.weights, len(members))
    dataset_name = members[0].card.dataset
    tags = {
        "model": "ensemble",
        "dataset": dataset_name,
        "kind": "ensemble",
        "members": ",".join(config.runs),
        **(tags or {}),
    }
    with lifecycle.tracked_run(f"ensemble-{dataset_name}", tags, nested=nested, experiment=dataset_name) as run:
        started = time.perf_counter()
        mlflow.log_param("weights", config.weights)
        outcome = log_ensemble(members, given, None if config.data_dir == AUTO else config.data_dir, run.info.run_id)
        mlflow.log_metric("wall_time", time.perf_counter() - started)
        return outcome


def log_ensemble(
    members: list[Member], given: list[float] | None, data_dir: str | None, run_id: str
) -> EnsembleOutcome:
    """Score ``members`` on validation and test, fix the weights (``given``, else from validation) and log the
    metrics, the plots and the ensemble's ONNX model in the active run ``run_id``."""
    run_ids = [m.run_id for m in members]
    dataset_name = members[0].card.dataset
    pre = members[0].card.preprocessing
    dataset = load_dataset(dataset_name, data_dir, size=pre.input_size)
    graphs = [export_run(m.run_id).proto for m in members]  # each parity-checked against its Python path
    scores = {
        split: [onnx_probabilities(g, to_input(dataset.split(split).images).numpy()) for g in graphs]
        for split in ("val", "test")
    }
    labels = {split: dataset.split(split).labels.numpy() for split in ("val", "test")}
    weights = given or validation_weights(scores["val"], labels["val"])
    mlflow.log_params(
        {
            "runs": ",".join(run_ids),
            "chosen_weights": ",".join(f"{w:.4f}" for w in weights),
            "member_models": ",".join(m.card.architecture for m in members),
        }
    )
    names = dataset.class_names
    # The weights are fixed; the test split is scored once.
    fused = {split: fuse(scores[split], weights) for split in ("val", "test")}
    member_acc = {
        split: [float((p.argmax(1) == labels[split]).mean()) for p in scores[split]] for split in ("val", "test")
    }
    per_member = {f"member{i}_{split}_acc": acc[i] for split, acc in member_acc.items() for i in range(len(members))}
    title = f"ensemble of {len(members)} on {dataset_name}"
    # The combined output is calibrated like a network's (its members were, each on its own).
    calibration = calibrate("temperature", fused["val"], labels["val"], fused["test"], labels["test"])
    records.log_calibration(calibration, fused, labels, title)
    fused = {split: tempered(probs, calibration.temperature) for split, probs in fused.items()}
    val_metrics, test_metrics = records.log_final_scores(labels, fused, names, title, per_member)
    records.log_figure(
        plots.members_figure(
            [m.card.architecture for m in members],
            weights,
            member_acc,
            {"val": val_metrics["best_val_acc"], "test": test_metrics["test_acc"]},
            title,
        ),
        "plots/members.png",
    )

    card = ModelCard(
        architecture="ensemble(" + " + ".join(m.card.architecture for m in members) + ")",
        dataset=dataset.name,
        task=dataset.task,
        class_names=tuple(names),
        # Each member normalises inside its own part of the graph.
        preprocessing=Preprocessing(pre.input_size, pre.in_chans, (0.0,) * pre.in_chans, (1.0,) * pre.in_chans),
        model_options={"runs": ",".join(run_ids), "weights": ",".join(f"{w:.4f}" for w in weights)},
        command=mlflow_command(
            "ensemble",
            {"runs": ",".join(run_ids), "weights": ",".join(f"{w:.4f}" for w in given) if given else AUTO},
            {"weights": AUTO},
        ),
        data=card_data(dataset),
        confusions=tuple(top_confusions(labels["test"], fused["test"], names)),
        **calibration.card_fields(),
    ).with_run(run_id, {**calibration.metrics, **val_metrics, **test_metrics})
    records.log_card(card)
    proto = compose.average(graphs, weights, card.to_props(), calibration.temperature)
    # The parity images are the first validation images, which every member has scored above.
    parity = records.PARITY_IMAGES
    log_graph_model(proto, card, dataset.val.images[:parity], fused["val"][:parity])
    return EnsembleOutcome(run_id, weights, member_acc["val"], member_acc["test"], val_metrics, test_metrics)
