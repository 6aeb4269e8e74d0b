"""Split-conformal prediction sets (APS, Romano et al. 2020; RAPS, Angelopoulos et al. 2021), in numpy:
training calibrates, the service answers.

Written here rather than taken from ``torchcp``, ``mapie`` or ``crepes`` because both sides need it and the
service must not import torch or scikit-learn estimators: the whole method is a quantile of calibration scores
and a cumulative sum, and one implementation keeps the sets the service returns equal to the ones the run
measured. Scores are non-randomised RAPS: the probability mass of the classes ranked at or above the true one,
plus ``penalty`` for each rank past ``free_ranks``. With ``penalty`` 0 it is APS, whose sets balloon on a
confident model (the mass reaches the threshold only after many tiny classes); the penalty stops that. A set
holds the classes whose score is within the threshold (a prefix of the ranking), and always the top class
(which only adds coverage).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# The coverage levels every calibrated model carries; a request chooses one of them.
COVERAGE_LEVELS = (0.9, 0.95, 0.99)
DEFAULT_COVERAGE = 0.9
# RAPS penalties tried on the tuning images; 0 is plain APS.
PENALTIES = (0.0, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)


@dataclass(frozen=True)
class Penalty:
    """RAPS regularisation: ``weight`` per rank past the first ``free_ranks`` (weight 0: APS)."""

    weight: float = 0.0
    free_ranks: int = 0

    def to_dict(self) -> dict:
        return {"weight": self.weight, "free_ranks": self.free_ranks}

    @classmethod
    def from_dict(cls, data: dict | None) -> "Penalty":
        data = data or {}
        return cls(float(data.get("weight", 0.0)), int(data.get("free_ranks", 0)))


APS = Penalty()


def level_key(level: float) -> str:
    """How a level is written in the contract and in requests: 0.9 -> "0.90"."""
    return f"{level:.2f}"


def _cumulative(probs: np.ndarray, penalty: Penalty) -> tuple[np.ndarray, np.ndarray]:
    """Classes by falling probability, and the score each would have as the true class."""
    order = np.argsort(-probs, axis=1, kind="stable")
    cumulative = np.cumsum(np.take_along_axis(probs, order, axis=1), axis=1)
    ranks = np.arange(1, probs.shape[1] + 1)
    return order, cumulative + penalty.weight * np.maximum(0, ranks - penalty.free_ranks)


def scores(probs: np.ndarray, labels: np.ndarray, penalty: Penalty = APS) -> np.ndarray:
    """The score of each true label: the mass of the classes ranked at or above it, plus the rank penalty."""
    order, cumulative = _cumulative(probs, penalty)
    rank = np.argmax(order == labels[:, None], axis=1)
    return cumulative[np.arange(len(labels)), rank]


def every_class(num_classes: int, penalty: Penalty = APS) -> float:
    """The threshold whose sets hold every class (what too few calibration images can promise)."""
    return 1.0 + penalty.weight * max(0, num_classes - penalty.free_ranks)


def threshold(probs: np.ndarray, labels: np.ndarray, level: float, penalty: Penalty = APS) -> float:
    """The conformal quantile for ``level`` from calibration images; every class when there are too few of them
    to promise the level (fewer than 1 / (1 - level) - 1)."""
    n = len(labels)
    rank = math.ceil((n + 1) * level)
    if rank > n:
        return every_class(probs.shape[1], penalty)
    return min(float(np.sort(scores(probs, labels, penalty))[rank - 1]), every_class(probs.shape[1], penalty))


def prediction_sets(probs: np.ndarray, threshold_value: float, penalty: Penalty = APS) -> list[list[int]]:
    """For each row, the class indices in the set, most probable first."""
    order, cumulative = _cumulative(probs, penalty)
    # Scores rise along the ranking, so the set is a prefix of it. The top class is always in. The tolerance
    # keeps a calibration image's own score inside its set.
    inside = cumulative <= threshold_value + 1e-9
    inside[:, 0] = True
    return [order[i, inside[i]].tolist() for i in range(len(probs))]


def coverage_and_size(
    probs: np.ndarray, labels: np.ndarray, threshold_value: float, penalty: Penalty = APS
) -> tuple[float, float]:
    """Empirical coverage and mean set size of the sets at ``threshold_value``."""
    sets = prediction_sets(probs, threshold_value, penalty)
    covered = [int(label) in members for label, members in zip(labels, sets)]
    return float(np.mean(covered)), float(np.mean([len(s) for s in sets]))


def choose_penalty(probs: np.ndarray, labels: np.ndarray, level: float = DEFAULT_COVERAGE) -> Penalty:
    """RAPS's tuning step, on images kept apart from those that set the thresholds: ``free_ranks`` is the rank
    of the true class that ``level`` of them reach, ``weight`` the penalty whose sets are smallest on them at
    ``level`` (ties: the smaller penalty)."""
    order = np.argsort(-probs, axis=1, kind="stable")
    true_ranks = np.argmax(order == labels[:, None], axis=1) + 1
    free = int(np.quantile(true_ranks, level, method="higher"))
    sizes = []
    for weight in PENALTIES:
        penalty = Penalty(weight, free)
        sizes.append(coverage_and_size(probs, labels, threshold(probs, labels, level, penalty), penalty)[1])
    return Penalty(PENALTIES[int(np.argmin(sizes))], free)
