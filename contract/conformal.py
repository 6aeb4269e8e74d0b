"""Split-conformal prediction sets (APS, Romano et al. 2020), in numpy: training calibrates, the service answers.

Written here rather than taken from ``torchcp``, ``mapie`` or ``crepes`` because both sides need it and the
service must not import torch or scikit-learn estimators: the whole method is a quantile of calibration scores
and a cumulative sum, and one implementation keeps the sets the service returns equal to the ones the run
measured. Scores are non-randomised APS: the probability mass of the classes ranked at or above the true one.
A set holds the classes whose score is within the threshold, and always the top class (which only adds
coverage).
"""

from __future__ import annotations

import math

import numpy as np

# The coverage levels every calibrated model carries; a request chooses one of them.
COVERAGE_LEVELS = (0.9, 0.95, 0.99)
DEFAULT_COVERAGE = 0.9


def level_key(level: float) -> str:
    """How a level is written in the contract and in requests: 0.9 -> "0.90"."""
    return f"{level:.2f}"


def _cumulative(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-probs, axis=1, kind="stable")
    return order, np.cumsum(np.take_along_axis(probs, order, axis=1), axis=1)


def scores(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """APS score of each true label: the mass of the classes ranked at or above it."""
    order, cumulative = _cumulative(probs)
    rank = np.argmax(order == labels[:, None], axis=1)
    return cumulative[np.arange(len(labels)), rank]


def threshold(probs: np.ndarray, labels: np.ndarray, level: float) -> float:
    """The conformal quantile for ``level`` from calibration images; ``inf`` (every class) when there are too
    few of them to promise the level (fewer than 1 / (1 - level) - 1)."""
    n = len(labels)
    rank = math.ceil((n + 1) * level)
    if rank > n:
        return math.inf
    return float(np.sort(scores(probs, labels))[rank - 1])


def prediction_sets(probs: np.ndarray, threshold_value: float) -> list[list[int]]:
    """For each row, the class indices in the set, most probable first."""
    order, cumulative = _cumulative(probs)
    # A class is in when its score (the mass up to and including it) is within the threshold: a prefix of the
    # ranking. The top class always is. The tolerance keeps a calibration image's own score inside its set.
    inside = cumulative <= threshold_value + 1e-9
    inside[:, 0] = True
    return [order[i, inside[i]].tolist() for i in range(len(probs))]


def coverage_and_size(probs: np.ndarray, labels: np.ndarray, threshold_value: float) -> tuple[float, float]:
    """Empirical coverage and mean set size of the sets at ``threshold_value``."""
    sets = prediction_sets(probs, threshold_value)
    covered = [int(label) in members for label, members in zip(labels, sets)]
    return float(np.mean(covered)), float(np.mean([len(s) for s in sets]))
