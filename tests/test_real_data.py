"""Training on the official MedMNIST files (skipped when they are not beside the checkout)."""

import pytest

from tests.helpers.paths import REAL_DATA_DIR, requires_real_data
from training.core.config import TrainConfig
from training.core.data import load_dataset
from training.workflows.train import run_training

pytestmark = [pytest.mark.slow, pytest.mark.real_data, requires_real_data]


def test_cnn_on_breastmnist_beats_the_majority_class(mlflow_store):
    test_labels = load_dataset("breastmnist", REAL_DATA_DIR).test.labels
    majority = float(test_labels.bincount().max()) / len(test_labels)
    outcome = run_training(
        TrainConfig(model="cnn", dataset="breastmnist", epochs=15, data_dir=str(REAL_DATA_DIR)), progress=False
    )
    assert outcome.test_metrics["test_acc"] > majority + 0.02, (outcome.test_metrics["test_acc"], majority)
    assert outcome.test_metrics["test_auc"] > 0.75
