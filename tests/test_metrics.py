import numpy as np
import pytest
from medmnist.evaluator import getACC, getAUC

from training.core.metrics import classification_metrics, metric_safe


@pytest.mark.parametrize("num_classes, task", [(2, "binary-class"), (5, "multi-class"), (5, "ordinal-regression")])
def test_acc_and_auc_match_the_medmnist_evaluator(num_classes, task):
    rng = np.random.default_rng(0)
    y = rng.integers(0, num_classes, 300)
    logits = rng.normal(size=(300, num_classes)) + 1.5 * np.eye(num_classes)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    names = [f"c{i}" for i in range(num_classes)]
    metrics = classification_metrics(y, probs, names)
    assert metrics["auc"] == pytest.approx(getAUC(y, probs, task))
    assert metrics["acc"] == pytest.approx(getACC(y, probs, task))
    assert 0.5 < metrics["acc"] < 1.0


def test_macro_and_per_class_metrics():
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.4, 0.6]])
    metrics = classification_metrics(y, probs, ["normal, benign", "malignant"])
    assert metrics["acc"] == 0.75 and metrics["balanced_acc"] == 0.75
    assert metrics["recall_normal__benign"] == 0.5 and metrics["recall_malignant"] == 1.0
    assert metrics["precision"] == pytest.approx((1.0 + 2 / 3) / 2)


def test_metric_names_are_mlflow_safe():
    assert metric_safe("normal, benign") == "normal__benign"
    assert metric_safe("femur-left") == "femur-left"
