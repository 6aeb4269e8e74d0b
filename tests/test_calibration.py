"""Calibrated answers: the temperature, the conformal sets, and what a run records of both."""

import json

import mlflow
import numpy as np
import pytest
import torch

import zoo
from contract import ModelCard, Preprocessing, conformal
from tests.helpers.runs import shrunk
from training.core.calibration import (
    CalibrationError,
    calibrate,
    calibration_metrics,
    fit_temperature,
    tempered,
    validation_halves,
)
from training.core.config import resolve
from training.workflows.network import load
from training.workflows.train import run_training


def overconfident(n: int, classes: int = 5, sharpness: float = 4.0, seed: int = 0):
    """Probabilities whose labels were drawn from the same logits divided by ``sharpness``: the true
    temperature is ``sharpness``."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, classes)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    truth = tempered(probs, sharpness)
    labels = np.array([rng.choice(classes, p=p) for p in truth])
    return probs, labels


def test_the_fitted_temperature_recovers_the_true_one_and_lowers_ece_and_nll_without_moving_the_argmax():
    probs, labels = overconfident(4000)
    temperature = fit_temperature(probs, labels)
    assert temperature == pytest.approx(4.0, rel=0.1)
    before, after = calibration_metrics(probs, labels), calibration_metrics(tempered(probs, temperature), labels)
    assert after["ece"] < 0.03 < 0.2 < before["ece"] and after["nll"] < before["nll"]
    assert (tempered(probs, temperature).argmax(1) == probs.argmax(1)).all()


def test_no_temperature_is_fitted_when_no_image_is_ranked_wrong():
    # Without a single mistake the NLL has no minimum (it falls as T -> 0); one mistake gives it one.
    probs, labels = np.tile([[0.7, 0.3]], (24, 1)), np.zeros(24, dtype=int)
    assert fit_temperature(probs, labels) == 1.0
    labels[0] = 1
    assert 0.1 < fit_temperature(probs, labels) < 0.5


def test_a_temperature_fitted_elsewhere_is_guarded_like_the_fitted_one():
    probs, labels = overconfident(2000)
    test_probs, test_labels = overconfident(1000, seed=1)
    helpful = calibrate("temperature", probs, labels, test_probs, test_labels, fitted=3.5)
    assert helpful.temperature == 3.5 and helpful.metrics["temperature_fitted"] == 3.5
    assert helpful.metrics["test_ece"] < helpful.metrics["test_ece_uncalibrated"]
    harmful = calibrate("temperature", probs, labels, test_probs, test_labels, fitted=0.25)  # sharper still
    assert harmful.temperature == 1.0 and harmful.metrics["temperature_fitted"] == 0.25


def test_conformal_sets_cover_at_least_the_level_on_new_images_and_grow_with_it():
    cal_probs, cal_labels = overconfident(2000, seed=1)
    test_probs, test_labels = overconfident(4000, seed=2)
    sizes = []
    for level in conformal.COVERAGE_LEVELS:
        threshold = conformal.threshold(cal_probs, cal_labels, level)
        coverage, size = conformal.coverage_and_size(test_probs, test_labels, threshold)
        assert coverage >= level - 0.015, (level, coverage)
        sizes.append(size)
    assert sizes == sorted(sizes) and sizes[0] < 5
    # too few calibration images to promise 99%: the threshold takes every class
    assert conformal.threshold(cal_probs[:50], cal_labels[:50], 0.99) == conformal.every_class(5) == 1.0
    assert conformal.prediction_sets(test_probs[:3], 1.0) == [
        sorted(range(5), key=lambda c: -p[c]) for p in test_probs[:3]
    ]
    # the top class is always in, even below every threshold
    assert all(
        len(s) >= 1 and s[0] == int(p.argmax()) for s, p in zip(conformal.prediction_sets(test_probs, 0.0), test_probs)
    )


def confident(n: int, seed: int, classes: int = 11):
    """A sharp and calibrated model: the labels are drawn from its own probabilities."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, classes)) * 6
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    return probs, np.array([rng.choice(classes, p=p) for p in probs])


def test_raps_keeps_the_coverage_with_far_smaller_sets_than_aps_on_a_confident_model():
    tune, cal, test = confident(1000, 1), confident(2000, 2), confident(4000, 3)
    penalty = conformal.choose_penalty(*tune)
    assert penalty.weight in conformal.PENALTIES and penalty.weight > 0 and 1 <= penalty.free_ranks <= 11
    results = {}
    for name, chosen in (("aps", conformal.APS), ("raps", penalty)):
        threshold = conformal.threshold(*cal, 0.9, chosen)
        results[name] = conformal.coverage_and_size(*test, threshold, chosen)
        assert results[name][0] >= 0.9 - 0.015, (name, results[name])
    assert results["raps"][1] < 0.7 * results["aps"][1], results
    # a zero penalty is APS, and the penalty survives the card's encoding
    assert conformal.scores(*cal, conformal.Penalty(0.0, 3)).tolist() == conformal.scores(*cal).tolist()
    assert conformal.Penalty.from_dict(penalty.to_dict()) == penalty
    assert conformal.Penalty.from_dict({}) == conformal.APS


def test_validation_is_cut_in_two_disjoint_stratified_halves_and_too_little_is_named():
    labels = np.repeat(np.arange(3), 20)
    halves = validation_halves(labels)
    first, second = halves.values()
    assert len(np.intersect1d(first, second)) == 0 and len(first) + len(second) == 60
    assert np.bincount(labels[first]).tolist() == [10, 10, 10]
    with pytest.raises(CalibrationError, match="needs validation images: this validation split has 3"):
        calibrate("temperature", np.full((3, 2), 0.5), np.array([0, 1, 0]), np.full((3, 2), 0.5), np.zeros(3, int))
    none = calibrate("none", np.full((3, 2), 0.5), np.array([0, 1, 0]), np.full((3, 2), 0.5), np.zeros(3, int))
    assert none.temperature == 1.0 and none.thresholds == {}


def test_the_card_carries_temperature_and_thresholds_and_old_cards_read_as_uncalibrated():
    card = ModelCard(
        architecture="cnn",
        dataset="bloodmnist",
        task="multi-class",
        class_names=("a", "b"),
        preprocessing=Preprocessing(28, 3, (0.5,) * 3, (0.25,) * 3),
        temperature=1.7,
        conformal={"0.90": 0.93, "0.95": 0.98},
        conformal_images=120,
    )
    assert ModelCard.from_props(card.to_props()) == card == ModelCard.from_dict(json.loads(json.dumps(card.to_dict())))
    old = {k: v for k, v in card.to_props().items() if k not in ("temperature", "conformal", "conformal_images")}
    assert ModelCard.from_props(old).temperature == 1.0 and ModelCard.from_props(old).conformal == {}


def test_temperature_scaling_divides_the_graph_output():
    model = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)
    assert torch.allclose(zoo.TemperatureScaled(model, 2.0)(x), model(x) / 2)
    with pytest.raises(zoo.ZooError, match="temperature=0.0 must be > 0"):
        zoo.TemperatureScaled(model, 0.0)


@pytest.mark.slow
def test_a_run_logs_calibration_and_its_model_answers_calibrated(synthetic_env, mlflow_store):
    outcome = run_training(shrunk(epochs=2), progress=False)
    run = mlflow.get_run(outcome.run_id)
    metrics = run.data.metrics
    assert metrics["temperature"] > 0
    for split in ("val", "test"):
        assert 0 <= metrics[f"{split}_ece"] <= 1 and metrics[f"{split}_nll"] > 0
        assert f"{split}_ece_uncalibrated" in metrics
    for percent in (90, 95, 99):
        assert 0 <= metrics[f"test_coverage_{percent}"] <= 1 and 1 <= metrics[f"test_set_size_{percent}"] <= 8
    # the test loss is the served graph's: the calibrated NLL
    assert metrics["test_loss"] == pytest.approx(metrics["test_nll"])
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(outcome.run_id, "plots")}
    assert {"plots/reliability.png", "plots/test_gradcam.png"} <= artifacts
    # Grad-CAM of the test images on resnet9's last stage (3x3 at 28 px), agreeing with the served maps
    assert run.data.tags["gradcam_layer"].startswith("backbone.features.") and "(3x3)" in run.data.tags["gradcam_layer"]
    assert metrics["gradcam_cam_correlation"] > 0.9
    saved = json.loads(mlflow.artifacts.load_text(f"runs:/{outcome.run_id}/calibration.json"))
    assert saved["temperature"] == pytest.approx(metrics["temperature"])
    assert set(saved["conformal_thresholds"]) == {"0.90", "0.95", "0.99"}

    # The fitted temperature is kept exactly when it lowers the NLL of the other validation half; kept, it changes
    # the test NLL, dropped, the graph answers as before.
    kept = metrics["val_nll"] < metrics["val_nll_uncalibrated"]
    assert metrics["temperature"] == pytest.approx(metrics["temperature_fitted"] if kept else 1.0)
    assert (abs(metrics["test_nll"] - metrics["test_nll_uncalibrated"]) > 1e-6) == kept
    # the logged model is the calibrated graph: its test probabilities give the logged calibrated NLL
    model = mlflow.pytorch.load_model(outcome.model_uri)
    test = load(resolve(shrunk(epochs=2))).test
    with torch.no_grad():
        probs = model(test.images.float() / 255).softmax(1).numpy()
    assert calibration_metrics(probs, test.labels.numpy())["nll"] == pytest.approx(metrics["test_nll"], rel=1e-4)
