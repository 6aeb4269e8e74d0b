"""Classification metrics, with ACC and AUC exactly as ``medmnist.evaluator`` defines them."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, precision_recall_fscore_support, roc_auc_score

from contract import metric_safe


def medmnist_auc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Binary: AUC of the positive class. Otherwise: mean one-vs-rest AUC over classes.

    Classes absent from ``y_true`` have no AUC; like sklearn we skip them rather than crash, and a split with
    a single class gets NaN.
    """
    if probs.shape[1] == 2:
        return float(roc_auc_score(y_true, probs[:, 1])) if len(np.unique(y_true)) == 2 else float("nan")
    aucs = [
        roc_auc_score(y_true == k, probs[:, k]) for k in range(probs.shape[1]) if 0 < (y_true == k).sum() < len(y_true)
    ]
    return float(np.mean(aucs)) if aucs else float("nan")


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, class_names: list[str]) -> dict[str, float]:
    """acc, auc, balanced_acc, macro precision/recall/f1 and per-class recall (``recall_<class>``)."""
    y_pred = probs.argmax(axis=1)
    labels = list(range(len(class_names)))
    precision, recall, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average="macro", zero_division=0
    )
    per_class_recall = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=None, zero_division=0)[1]
    metrics = {
        "acc": float((y_pred == y_true).mean()),
        "auc": medmnist_auc(y_true, probs),
        "balanced_acc": float(balanced_accuracy_score(y_true, y_pred)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
    }
    for name, value in zip(class_names, per_class_recall):
        metrics[f"recall_{metric_safe(name)}"] = float(value)
    return metrics


def confusion(y_true: np.ndarray, probs: np.ndarray, num_classes: int) -> np.ndarray:
    return confusion_matrix(y_true, probs.argmax(axis=1), labels=list(range(num_classes)))


def top_confusions(y_true: np.ndarray, probs: np.ndarray, class_names: list[str], k: int = 3) -> list[dict]:
    """The ``k`` most frequent (true, predicted) mistakes, with their share of the true class's images."""
    matrix = confusion(y_true, probs, len(class_names))
    per_class = matrix.sum(axis=1)
    np.fill_diagonal(matrix, 0)
    order = np.argsort(matrix, axis=None)[::-1][:k]
    pairs = [np.unravel_index(i, matrix.shape) for i in order]
    return [
        {
            "true": class_names[t],
            "predicted": class_names[p],
            "count": int(matrix[t, p]),
            "share": float(matrix[t, p] / per_class[t]),
        }
        for t, p in pairs
        if matrix[t, p] > 0
    ]
