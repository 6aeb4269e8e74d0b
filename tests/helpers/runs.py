"""Running the real code in tests: the shrunk default recipe, a tracking store, a child process's environment."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import sqlite3
import sys
import tempfile
from pathlib import Path

import mlflow
import pytest

from training.core.recipes import config_from_recipe


@functools.cache
def _migrated_store() -> Path:
    """An empty MLflow SQLite store, made by MLflow once per test process: a new store runs every schema migration
    (about 2 s of CPU), which most tests would otherwise pay for their own fresh store."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    folder = Path(tempfile.mkdtemp(prefix="medzoo-test-store-"))
    store = SqlAlchemyStore(f"sqlite:///{folder / 'mlflow.db'}", str(folder / "mlruns"))
    store.engine.dispose()
    return folder / "mlflow.db"


def new_tracking_store(root: Path) -> str:
    """A fresh, real SQLite tracking store at ``root/mlflow.db`` (a copy of the migrated empty one), its Default
    experiment's artifacts in ``root/mlruns/0`` as MLflow puts them for a store created with ``root`` as the
    working directory."""
    path = root / "mlflow.db"
    shutil.copyfile(_migrated_store(), path)
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        default_artifacts = str(root / "mlruns" / "0")
        db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0", (default_artifacts,))
    return f"sqlite:///{path}"


@contextlib.contextmanager
def store_with_synthetic_data(root: Path, data_dir: Path):
    """For module-scoped fixtures: a tracking store in ``root`` and the synthetic data, undone afterwards."""
    uri = new_tracking_store(root)
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
