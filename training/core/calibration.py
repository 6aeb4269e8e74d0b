"""Calibrated answers: temperature scaling (Guo et al. 2017), the metrics that show it, and how validation is
shared with the conformal sets.

After selection the validation split is cut once, stratified and seeded, in two halves: the temperature is fitted
on one (:data:`TEMPERATURE_HALF`), the conformal sets are calibrated on the other with the tempered
probabilities, so neither the temperature nor the sets are fitted on the images that calibrate the sets. The
temperature is kept only if it lowers the NLL of the conformal half too (else 1: small validation splits). Within
the conformal half, 30% tune the RAPS penalty and 70% set the thresholds (when the half is large enough to spare
the 30%; otherwise plain APS on all of it). Selection
already used all of validation; the test split is read once, after all of this, and proves the choice.
The temperature is one scalar, fitted on the log-probabilities of the very graph that is served (test-time views
included) by LBFGS on the negative log-likelihood; ECE is torchmetrics' ``MulticlassCalibrationError`` (15
equal-width bins, L1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from contract import conformal
from training.core.data import stratified_indices

CALIBRATIONS = ("none", "temperature")
ECE_BINS = 15
SPLIT_SEED = 20_17  # fixed: every run of a dataset cuts its validation split the same way
TEMPERATURE_HALF, CONFORMAL_HALF = "temperature", "conformal"


class CalibrationError(ValueError):
    """Calibration that cannot be done (no validation images, a class missing); the message says what to do."""


MIN_VALIDATION = 4  # two per half
# Of the conformal half, this share tunes the RAPS penalty when it holds at least MIN_TUNING images.
TUNING_SHARE, MIN_TUNING = 0.3, 100


def check_validation(method: str, images: int) -> None:
    """Temperature scaling needs validation images; without them say so before training starts."""
    if method == "temperature" and images < MIN_VALIDATION:
        raise CalibrationError(
            f"calibration=temperature needs validation images: this validation split has {images} (at least "
            f"{MIN_VALIDATION}); train with calibration=none, or on data with a validation split."
        )


def validation_halves(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Disjoint, stratified halves of the validation indices: one fits the temperature, one the conformal sets."""
    tensor = torch.as_tensor(labels)
    first = stratified_indices(tensor, len(labels) // 2, SPLIT_SEED).numpy()
    second = np.setdiff1d(np.arange(len(labels)), first)
    return {TEMPERATURE_HALF: first, CONFORMAL_HALF: second}


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T > 0 that minimises the NLL of softmax(log(probs) / T) on these images; 1 when every one
    of them is already ranked first. Then the NLL falls all the way to T -> 0 and has no minimum: LBFGS stopped at
    T ~ 0.04, which sharpened every answer to near-certainty and scaled the served logits ~25x."""
    if (np.argmax(probs, axis=1) == np.asarray(labels)).all():
        return 1.0
    log_probs = torch.from_numpy(np.log(np.clip(probs, 1e-12, 1.0))).double()
    targets = torch.from_numpy(np.asarray(labels)).long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)  # T = exp(log_t) stays positive
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(log_probs / log_t.exp(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def tempered(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(probs) / T): what the served graph answers once T is folded into it."""
    logits = np.log(np.clip(probs, 1e-12, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    out = np.exp(logits)
    return out / out.sum(axis=1, keepdims=True)


def calibration_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """ECE (15 equal-width confidence bins) and the mean negative log-likelihood."""
    # Imported here: torchmetrics takes 2.2 s to import, which every command (even --help) would pay otherwise.
    from torchmetrics.functional.classification import multiclass_calibration_error

    p, y = torch.from_numpy(np.asarray(probs, dtype=np.float64)), torch.from_numpy(np.asarray(labels)).long()
    ece = multiclass_calibration_error(p, y, num_classes=p.shape[1], n_bins=ECE_BINS, norm="l1")
    return {"ece": float(ece), "nll": nll(probs, labels)}


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes."""
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)).mean())


@dataclass(frozen=True)
class Calibration:
    """What a run adds to its selected model: the temperature folded into the graph, the conformal thresholds
    of its probabilities, and the metrics that prove both (``metrics``, MLflow names)."""

    temperature: float
    thresholds: dict[str, float]  # coverage level key ("0.90") -> RAPS threshold
    conformal_images: int
    metrics: dict[str, float]
    penalty: conformal.Penalty = conformal.APS

    def card_fields(self) -> dict:
        """What the model card keeps of it (``contract.ModelCard`` fields)."""
        return {
            "temperature": self.temperature,
            "conformal": self.thresholds,
            "conformal_images": self.conformal_images,
            "conformal_penalty": self.penalty.to_dict(),
        }


def conformal_parts(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The conformal half's images that tune the RAPS penalty, and those that set the thresholds (positions in
    ``labels``): disjoint, stratified; no tuning part (plain APS on all) when the half is too small to spare one."""
    if len(labels) < MIN_TUNING / TUNING_SHARE:
        return np.array([], dtype=int), np.arange(len(labels))
    tune = stratified_indices(torch.as_tensor(labels), int(len(labels) * TUNING_SHARE), SPLIT_SEED + 1).numpy()
    return tune, np.setdiff1d(np.arange(len(labels)), tune)


def calibrate(
    method: str,
    val_probs: np.ndarray,
    val_labels: np.ndarray,
    test_probs: np.ndarray,
    test_labels: np.ndarray,
    fitted: float | None = None,
) -> Calibration:
    """Fit the temperature on one validation half, the conformal thresholds on the other (tempered), and measure
    both: ECE and NLL before and after on the held-out half and on test, and test coverage and set size for
    each level. ``test_probs`` are the probabilities the run already read from the test split once. ``fitted``: a
    temperature fitted some other way, to be guarded and used instead (benchmarks/calibration.py compares ways)."""
    if method not in CALIBRATIONS:
        raise CalibrationError(f"calibration={method!r} is not one of: {', '.join(CALIBRATIONS)}.")
    check_validation(method, len(val_labels))
    if len(val_labels) < MIN_VALIDATION:  # calibration=none on a split too small for sets: none are made
        return Calibration(1.0, {}, 0, {})
    halves = validation_halves(val_labels)
    fit_on, conformal_on = halves[TEMPERATURE_HALF], halves[CONFORMAL_HALF]
    if fitted is None:
        fitted = fit_temperature(val_probs[fit_on], val_labels[fit_on]) if method == "temperature" else 1.0
    held_out = val_probs[conformal_on], val_labels[conformal_on]
    # Kept only when it also lowers the NLL of the other half: fitted on a few dozen images (BreastMNIST's 39) a
    # temperature can fit their noise and make the model worse calibrated than it was.
    temperature = fitted if nll(tempered(held_out[0], fitted), held_out[1]) < nll(*held_out) else 1.0
    metrics = {"temperature": temperature, "temperature_fitted": fitted}
    for split, probs, labels in (
        ("val", val_probs[conformal_on], val_labels[conformal_on]),
        ("test", test_probs, test_labels),
    ):
        before, after = calibration_metrics(probs, labels), calibration_metrics(tempered(probs, temperature), labels)
        metrics.update({f"{split}_{k}_uncalibrated": v for k, v in before.items()})
        metrics.update({f"{split}_{k}": v for k, v in after.items()})
    calibration_probs, calibration_labels = tempered(val_probs[conformal_on], temperature), val_labels[conformal_on]
    tune, threshold_on = conformal_parts(calibration_labels)
    penalty = (
        conformal.choose_penalty(calibration_probs[tune], calibration_labels[tune]) if len(tune) else conformal.APS
    )
    metrics.update(conformal_penalty=penalty.weight, conformal_free_ranks=penalty.free_ranks)
    served_test = tempered(test_probs, temperature)
    thresholds = {}
    for level in conformal.COVERAGE_LEVELS:
        key = conformal.level_key(level)
        thresholds[key] = conformal.threshold(
            calibration_probs[threshold_on], calibration_labels[threshold_on], level, penalty
        )
        coverage, size = conformal.coverage_and_size(served_test, test_labels, thresholds[key], penalty)
        percent = round(level * 100)
        metrics.update({f"test_coverage_{percent}": coverage, f"test_set_size_{percent}": size})
    return Calibration(temperature, thresholds, len(threshold_on), metrics, penalty)
