"""Shared fixtures; the helpers they use live in ``tests/helpers``.

Tiers (markers registered in pyproject.toml, ``--strict-markers``): unmarked tests are the fast tier
(``make test``); ``slow`` trains in-process for more than a few seconds, ``e2e`` runs subprocesses and servers
(``mlflow run``, ``bentoml serve``, torchrun, PostgreSQL); ``make test-all`` runs every tier.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Tests never touch the user's BentoML store; set before anything imports bentoml.
os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="medzoo-test-bentoml-")
# Parallel workers (`make test-all`: 2 on 2 cores) share the cores instead of each running an OpenMP pool as wide
# as the machine: two 2-thread pools on 2 cores spin-wait against each other (a training benchmark beside another
# training run took up to 7x its time). Set before torch is imported; subprocesses (mlflow run, servers, torchrun)
# inherit it.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _share = (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _share)))

import mlflow  # noqa: E402
import onnxruntime as ort  # noqa: E402

from serving.deploy import deploy  # noqa: E402
from tests.helpers.data import write_synthetic_medmnist, write_synthetic_torchvision  # noqa: E402
from tests.helpers.runs import new_tracking_store, shrunk, store_with_synthetic_data  # noqa: E402
from training.export.register import register_best  # noqa: E402
from training.workflows.train import run_training  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("medmnist")
    for flag in ("breastmnist", "bloodmnist", "organamnist"):
        write_synthetic_medmnist(root / f"{flag}.npz", flag)
    for folder in ("MNIST", "FashionMNIST"):
        write_synthetic_torchvision(root, folder)
    return root


@pytest.fixture
def synthetic_env(synthetic_data_dir, monkeypatch) -> Path:
    """Point the data layer at the synthetic files (which cannot carry the official MD5)."""
    monkeypatch.setenv("MEDZOO_DATA_DIR", str(synthetic_data_dir))
    monkeypatch.setenv("MEDZOO_VERIFY_MD5", "0")
    return synthetic_data_dir


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> str:
    """A fresh SQLite tracking store and artifact folder in a temp dir, used by this process and children."""
    import mlflow

    uri = new_tracking_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # the default experiment puts artifacts in ./mlruns
    mlflow.set_tracking_uri(uri)
    yield uri
    if mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="session")
def deployed(tmp_path_factory, synthetic_data_dir):
    """Tiny BloodMNIST and BreastMNIST models trained (1 epoch), registered as champions and imported into the
    session's BentoML store: built once, shared by every test that serves them. The store's environment is undone
    before the first of them runs (a session-long one would leak into every later test); they name the store."""
    root = tmp_path_factory.mktemp("serving")
    with store_with_synthetic_data(root, synthetic_data_dir) as uri:
        for dataset in ("bloodmnist", "breastmnist"):
            run_training(shrunk(dataset=dataset, epochs=1), progress=False)
            register_best(dataset)
        deploy()
        champions = {}
        for dataset in ("bloodmnist", "breastmnist"):
            local = mlflow.artifacts.download_artifacts(
                f"models:/medzoo-{dataset}@champion", dst_path=str(root / dataset)
            )
            champions[dataset] = ort.InferenceSession(f"{local}/model.onnx")
    return {"root": root, "uri": uri, "data": synthetic_data_dir, "onnx": champions}
