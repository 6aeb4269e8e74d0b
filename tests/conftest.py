"""Shared fixtures: learnable synthetic MedMNIST-format files, a temporary MLflow store, real data."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from medmnist import INFO

# Tests never touch the user's BentoML store; set before anything imports bentoml.
os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="medzoo-test-bentoml-")

ROOT = Path(__file__).resolve().parents[1]
REAL_DATA_DIR = Path(os.environ.get("MEDZOO_REAL_DATA_DIR", ROOT.parent / "shared" / "data" / "medmnist"))
WEIGHTS_DIR = Path(os.environ.get("MEDZOO_WEIGHTS_DIR", ROOT.parent / "shared" / "data" / "weights"))
SYNTHETIC_SIZES = {"train": 96, "val": 48, "test": 48}

requires_real_data = pytest.mark.skipif(
    not (REAL_DATA_DIR / "breastmnist.npz").exists(), reason=f"no official MedMNIST files in {REAL_DATA_DIR}"
)


def synthetic_images(labels: np.ndarray, channels: int, size: int, seed: int) -> np.ndarray:
    """Each class is a fixed random blob pattern plus noise: easy to learn, impossible to guess.

    The patterns are symmetric under flips and 90-degree turns, so every augmentation and test-time view the
    datasets' policies allow keeps the class, as it does for real images.
    """
    rng = np.random.default_rng(seed)
    num_classes = int(labels.max()) + 1
    coarse = rng.uniform(0, 1, size=(num_classes, 7, 7, channels))
    coarse = sum(np.rot90(c, k, axes=(1, 2)) for k in range(4) for c in (coarse, coarse[:, :, ::-1])) / 8
    coarse = (coarse - coarse.min()) / (coarse.max() - coarse.min())
    templates = np.kron(coarse, np.ones((size // 7 + 1, size // 7 + 1, 1)))[:, :size, :size]
    noise = np.random.default_rng(seed + 1).normal(0, 0.15, size=(len(labels), size, size, channels))
    images = np.clip((templates[labels] + noise) * 255, 0, 255).astype(np.uint8)
    return images[..., 0] if channels == 1 else images


def write_synthetic_medmnist(path: Path, flag: str, size: int = 28, sizes: dict | None = None, seed: int = 0) -> Path:
    """A MedMNIST-format npz (same keys, shapes and dtypes as the official files) for ``flag``."""
    info = INFO[flag]
    num_classes, channels = len(info["label"]), info["n_channels"]
    arrays = {}
    for i, (split, n) in enumerate((sizes or SYNTHETIC_SIZES).items()):
        labels = np.arange(n) % num_classes
        np.random.default_rng(seed + i).shuffle(labels)
        arrays[f"{split}_images"] = synthetic_images(labels, channels, size, seed=seed)
        arrays[f"{split}_labels"] = labels.reshape(-1, 1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def write_idx(folder: Path, stem: str, array: np.ndarray) -> None:
    """One file in the idx format torchvision reads for MNIST and Fashion-MNIST."""
    folder.mkdir(parents=True, exist_ok=True)
    if array.ndim == 3:
        header = struct.pack(">IIII", 0x803, *array.shape)
    else:
        header = struct.pack(">II", 0x801, len(array))
    (folder / stem).write_bytes(header + array.astype(np.uint8).tobytes())


def write_synthetic_torchvision(root: Path, folder: str, train: int = 300, test: int = 100, seed: int = 0) -> None:
    """Learnable MNIST-format files (``folder``: MNIST or FashionMNIST) under ``root/<folder>/raw``."""
    raw = root / folder / "raw"
    for i, (prefix, n) in enumerate((("train", train), ("t10k", test))):
        labels = np.arange(n) % 10
        np.random.default_rng(seed + i).shuffle(labels)
        write_idx(raw, f"{prefix}-images-idx3-ubyte", synthetic_images(labels, 1, 28, seed=seed))
        write_idx(raw, f"{prefix}-labels-idx1-ubyte", labels)


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

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # the default experiment puts artifacts in ./mlruns
    mlflow.set_tracking_uri(uri)
    yield uri
    if mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


@contextlib.contextmanager
def store_with_synthetic_data(root: Path, data_dir: Path):
    """For module-scoped fixtures: a tracking store in ``root`` and the synthetic data, undone afterwards."""
    import mlflow

    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MEDZOO_DATA_DIR", str(data_dir))
        mp.setenv("MEDZOO_VERIFY_MD5", "0")
        mp.chdir(root)
        mlflow.set_tracking_uri(uri)
        try:
            yield uri
        finally:
            mlflow.set_tracking_uri(None)


def shrunk(**overrides):
    """The real default training set-up (the `quick` recipe) shrunk for tests: few epochs, small batches, a narrow
    net. Every other value (optimiser, schedule, augmentation, EMA, TTA) is the recipe's, so tests run the real
    code path. A test that names another model gets that model with its own defaults."""
    from training.recipes import config_from_recipe

    values = dict(dataset="bloodmnist", epochs=3, batch_size=16, lr=0.01, model_kwargs={"width": 8})
    if "model" in overrides and "model_kwargs" not in overrides:
        values.pop("model_kwargs")
    values.update(overrides)
    return config_from_recipe("quick", **values)


def project_env(**extra) -> dict:
    """Environment for subprocesses: the project's venv first on PATH (``mlflow run`` calls ``python``)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def bentoml_server(env: dict, ready_within_s: float = 120):
    """A real `bentoml serve serving.service:MedZoo` on 127.0.0.1, ready; yields (base URL, process). Its output
    goes to a file (``process.log_path``): a pipe nobody reads fills up and blocks the server."""
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "bentoml", "serve", "serving.service:MedZoo", "--host", "127.0.0.1"]
    log = tempfile.NamedTemporaryFile("w+", prefix="bentoml-serve-", suffix=".log", delete=False)
    process = subprocess.Popen(
        [*command, "--port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True
    )
    process.log_path = Path(log.name)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_within_s
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"bentoml serve exited early:\n{process.log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail(f"bentoml serve did not become ready within {ready_within_s:.0f} s")
        yield base, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
