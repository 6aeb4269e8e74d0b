"""Beyond one machine: the real stack (PostgreSQL + `mlflow server` with proxied artifacts, scripts/stack.sh),
sweep workers sharing one study on it, register and deploy from its registry, data-parallel training under
torchrun, and clear errors for stores that cannot be reached."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import onnxruntime as ort
import optuna
import pytest
import torch

from tests.helpers.net import free_port
from tests.helpers.runs import project_env, shrunk
from tests.helpers.stack import postgres_installed, start_stack
from training.cli import main
from training.workflows.sweep import log_study_results, study_lock

SPACE = """
common:
  lr: {type: float, low: 1.0e-3, high: 3.0e-2, log: true}
models:
  cnn:
    model.filters: {type: categorical, choices: ["4,8", "8,16"]}
"""


@pytest.fixture(scope="module")
def stack():
    if not postgres_installed():
        if os.environ.get("CI"):
            pytest.fail("CI must install PostgreSQL (.ci/run does: apt-get install -y postgresql)")
        pytest.skip("PostgreSQL's server programs are not installed (apt-get install -y postgresql)")
    stack = start_stack()
    assert set(stack.env) == {"MLFLOW_TRACKING_URI", "MEDZOO_OPTUNA_STORAGE", "PGPASSFILE"}
    try:
        yield stack
    finally:
        purged = stack.run("purge")
        assert purged.returncode == 0, purged.stderr[-2000:]
        assert not stack.folder.exists()


@pytest.fixture
def on_stack(stack, synthetic_env, monkeypatch):
    """This process and its children use the stack, as a worker with `eval "$(scripts/stack.sh env)"` does."""
    for name, value in stack.env.items():
        monkeypatch.setenv(name, value)
    mlflow.set_tracking_uri(stack.env["MLFLOW_TRACKING_URI"])
    yield stack
    mlflow.set_tracking_uri(None)


@pytest.mark.e2e
def test_stack_reports_its_state_and_keeps_the_password_out_of_urls(stack):
    status = stack.run("status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "postgresql: running" in status.stdout and "mlflow server: healthy" in status.stdout
    password = Path(stack.env["PGPASSFILE"]).read_text().strip().rsplit(":", 1)[1]
    assert len(password) >= 32 and password not in json.dumps(stack.env)
    assert oct(Path(stack.env["PGPASSFILE"]).stat().st_mode & 0o777) == "0o600"


@pytest.mark.e2e
def test_two_sweep_workers_share_one_study_then_register_and_deploy_from_the_server(on_stack, tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    worker_dir = tmp_path / "worker"  # a worker's own folder: nothing may land there
    worker_dir.mkdir()
    sweep = [
        *(sys.executable, "-m", "training.cli", "sweep", "--model", "cnn", "--dataset", "breastmnist"),
        *("--epochs", "1", "--batch-size", "32", "--model.hidden", "16", "--trials", "1"),
        *("--space-file", str(space), "--study-name", "shared", "--no-progress"),
    ]
    env = project_env()
    # Both started at once: the study lock lets exactly one open the parent run.
    workers = [
        subprocess.Popen(sweep, cwd=worker_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    for worker in workers:
        _, stderr = worker.communicate(timeout=600)
        assert worker.returncode == 0, stderr[-3000:]

    study = optuna.load_study(study_name="shared", storage=on_stack.env["MEDZOO_OPTUNA_STORAGE"])
    assert sorted(t.number for t in study.trials) == [0, 1]
    assert len({tuple(t.user_attrs["worker"]) for t in study.trials}) == 2  # both workers ran trials
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    (parent,) = [r for r in runs if r.info.run_name == "sweep-shared"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(int(r.data.tags["trial"]) for r in children) == [0, 1]
    assert {t.user_attrs["mlflow_run_id"] for t in study.trials} == {r.info.run_id for r in children}

    # Artifacts went to the server's store, and come back through it.
    child = children[0]
    assert child.info.artifact_uri.startswith("mlflow-artifacts:/")
    config = json.loads(mlflow.artifacts.load_text(f"{child.info.artifact_uri}/config.json"))
    assert config["config"]["model"] == "cnn"
    assert list((on_stack.folder / "artifacts").rglob("config.json"))
    assert list(worker_dir.iterdir()) == []

    # Export and register as a worker would, in this process (each a subprocess costs a start-up).
    assert main(["export", "--run-id", child.info.run_id, "--output", str(tmp_path / "model.onnx")]) == 0
    assert re.search(r"parity: .*, 0 of \d+ images with a different predicted class", capsys.readouterr().out)
    assert ort.InferenceSession(str(tmp_path / "model.onnx")).get_inputs()[0].name == "pixels"
    assert main(["register", "--dataset", "breastmnist", "--metric", "acc"]) == 0
    champion = mlflow.MlflowClient().get_model_version_by_alias("medzoo-breastmnist", "champion")
    assert champion.run_id in {r.info.run_id for r in children}

    bentoml_home = tmp_path / "bentoml"
    deployed = subprocess.run(
        [sys.executable, "-m", "training.cli", "deploy", "--datasets", "breastmnist"],
        cwd=worker_dir,
        env=project_env(BENTOML_HOME=str(bentoml_home)),
        capture_output=True,
        text=True,
    )
    assert deployed.returncode == 0, deployed.stderr[-3000:]
    assert f"medzoo-breastmnist v{champion.version} imported" in deployed.stdout
    # The deployed ONNX is the registry's, byte for byte, fetched through the server.
    registry_copy = mlflow.artifacts.download_artifacts("models:/medzoo-breastmnist@champion", dst_path=str(tmp_path))
    (served,) = bentoml_home.rglob("model.onnx")
    assert served.read_bytes() == (Path(registry_copy) / "model.onnx").read_bytes()
    assert list(worker_dir.iterdir()) == []


@pytest.mark.e2e
def test_a_sweep_worker_logs_the_study_on_the_shared_parent_only_under_the_study_lock(on_stack):
    """Workers that share a parent finish at about the same time and each writes the best trial's tags on it.
    MLflow's SQL store writes a new tag as select-then-insert, so two simultaneous writers make one fail on a
    duplicate key (it failed a CI run). A worker finishing while another holds the study lock must wait for it."""
    storage = on_stack.env["MEDZOO_OPTUNA_STORAGE"]
    base = shrunk(model="cnn", dataset="breastmnist")
    lr = optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)
    study = optuna.create_study(study_name="finish-together", storage=storage, direction="maximize")
    for number, value in enumerate((0.6, 0.8, 0.7)):
        trial = optuna.trial.create_trial(
            params={"lr": 10.0 ** -(number + 2)},
            distributions={"lr": lr},
            value=value,
            user_attrs={"mlflow_run_id": f"run-{number}"},
        )
        study.add_trial(trial)
    parent_id = mlflow.MlflowClient().create_run(experiment_id="0").info.run_id

    def finish():
        with mlflow.start_run(run_id=parent_id):
            log_study_results(optuna.load_study(study_name="finish-together", storage=storage), base, storage)

    with ThreadPoolExecutor(1) as worker:
        with study_lock(storage, "finish-together"):  # another worker is finishing
            done = worker.submit(finish)
            time.sleep(3)
            assert not done.done() and "best_run_id" not in mlflow.get_run(parent_id).data.tags
        done.result(timeout=120)  # raises what the worker raised
    parent = mlflow.get_run(parent_id)
    assert parent.data.tags["best_run_id"] == "run-1" and parent.data.tags["best_lr"] == "0.001"
    assert parent.data.metrics[f"best_{base.select_key}"] == pytest.approx(0.8)


@pytest.mark.e2e
def test_data_parallel_training_under_torchrun_logs_one_run(on_stack, tmp_path):
    """`--nproc 2` relaunches the command under torchrun (gloo on this CPU), as the README's torchrun line does."""
    experiment = "data-parallel"
    trained = subprocess.run(
        [
            *(sys.executable, "-m", "training.cli", "train", "--nproc", "2", "--dataset", "bloodmnist"),
            *("--epochs", "3", "--batch-size", "16", "--lr", "0.01", "--model.width", "8", "--tta", "none"),
            "--no-progress",
        ],
        cwd=tmp_path,
        env=project_env(MLFLOW_EXPERIMENT_NAME=experiment),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "rank 1 of 2: trained its share" in trained.stdout
    (run,) = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    assert run.info.status == "FINISHED" and run.data.params["nproc"] == "2"
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_acc")
    assert sorted(m.step for m in history) == [1, 2, 3]
    assert run.data.metrics["test_acc"] > 0.5  # 8 classes: chance is 0.125

    split = json.loads(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/distributed.json"))
    train_samples = int(run.data.params["train_samples"])
    assert split["world_size"] == 2 and split["images_on_several_ranks"] == 0
    assert split["images_per_rank"] == [train_samples // 2, train_samples // 2]
    assert split["images_covered"] == train_samples

    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    images = np.load(mlflow.artifacts.download_artifacts(f"{run.info.artifact_uri}/parity/images.npy"))
    with torch.no_grad():
        scores = model(torch.from_numpy(images[:4]).float() / 255)
    assert scores.shape == (4, 8)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--nproc", "0"], "nproc=0 must be >= 1"),
        (["--nproc", "2", "--batch-size", "3"], "batch_size=3 is the global batch"),
        (["--nproc", "2", "--resume", "0123456789abcdef"], "in one process (nproc=1)"),
    ],
)
def test_bad_data_parallel_settings_fail_before_any_run(argv, message, synthetic_env, mlflow_store, capsys):
    assert main(["train", "--dataset", "breastmnist", "--epochs", "1", *argv]) == 2
    assert message in capsys.readouterr().err
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_unreachable_stores_are_named_with_the_password_masked(synthetic_env, mlflow_store, capsys):
    closed = free_port()
    train = ["train", "--dataset", "breastmnist", "--epochs", "1"]
    sweep = ["sweep", "--model", "cnn", "--dataset", "breastmnist"]
    cases = [
        (f"http://127.0.0.1:{closed}", train, f"tracking server http://127.0.0.1:{closed} cannot be reached"),
        (
            f"postgresql://medzoo:s3cret-pw@127.0.0.1:{closed}/mlflow",
            train,
            f"tracking store postgresql://medzoo:***@127.0.0.1:{closed}/mlflow cannot be reached",
        ),
        (
            mlflow_store,
            [*sweep, "--storage", f"postgresql://medzoo:s3cret-pw@127.0.0.1:{closed}/optuna"],
            f"Optuna storage postgresql://medzoo:***@127.0.0.1:{closed}/optuna cannot be reached",
        ),
    ]
    for tracking_uri, argv, message in cases:
        mlflow.set_tracking_uri(tracking_uri)
        assert main(argv) == 2
        printed = capsys.readouterr()
        assert message in printed.err and "s3cret-pw" not in printed.err + printed.out
    # Nothing was half-created in the store that was reachable.
    mlflow.set_tracking_uri(mlflow_store)
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []
