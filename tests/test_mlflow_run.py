"""The main job as users run it: a real `mlflow run . -e train --env-manager local` into a temp store."""

import subprocess
import sys

import mlflow
import numpy as np
import pytest
import torch
import yaml

from tests.helpers.paths import ROOT
from tests.helpers.runs import project_env, shrunk
from training.cli import main as cli_main

pytestmark = pytest.mark.e2e


def mlflow_run(*params: str, entry_point: str = "train") -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", entry_point, "--env-manager", "local"]
    for param in params:
        args += ["-P", param]
    return subprocess.run(args, capture_output=True, text=True, env=project_env(), timeout=900)


def all_runs():
    return mlflow.search_runs(search_all_experiments=True, output_format="list")


TRAIN_PARAMS = ("model=cnn", "dataset=bloodmnist", "epochs=3", "batch_size=16", "lr=0.01", "model.filters=8,16")


def test_mlflow_run_train_leaves_a_complete_run(synthetic_env, mlflow_store):
    result = mlflow_run(*TRAIN_PARAMS, "model.hidden=32")
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = all_runs()
    run_id = run.info.run_id
    assert run.info.status == "FINISHED" and run.info.run_name == "cnn-bloodmnist"
    params = run.data.params
    assert params["model"] == "cnn" and params["dataset"] == "bloodmnist" and params["epochs"] == "3"
    assert params["num_classes"] == "8" and params["in_chans"] == "3" and params["input_size"] == "28"
    assert params["model.filters"] == "8,16" and params["model.hidden"] == "32" and params["train_samples"] == "96"
    assert params["model_kwargs"] == "filters=8,16 hidden=32" and params["recipe"] == "quick"

    client = mlflow.MlflowClient()
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "val_auc", "lr"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [1, 2, 3], key
    metrics = run.data.metrics
    for key in (
        "test_acc",
        "test_auc",
        "test_balanced_acc",
        "test_precision",
        "test_recall",
        "test_f1",
        "test_recall_basophil",
        "train_time",
        "train_images_per_sec",
        "n_params",
        "best_epoch",
    ):
        assert key in metrics, key
    assert 0.3 < metrics["test_acc"] <= 1.0 and metrics["n_params"] > 1000  # 8 classes: chance is 0.125

    artifacts = {a.path for folder in ("", "plots", "reports") for a in client.list_artifacts(run_id, folder)}
    assert {
        "plots/confusion_matrix_val.png",
        "plots/confusion_matrix_test.png",
        "plots/learning_curves.png",
        "plots/test_mistakes.png",
        "reports/test_classification_report.txt",
        "config.json",
    } <= artifacts
    report = mlflow.artifacts.load_text(f"runs:/{run_id}/reports/test_classification_report.txt")
    assert "eosinophil" in report and "macro avg" in report
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {
        "bloodmnist-28px-train",
        "bloodmnist-28px-val",
        "bloodmnist-28px-test",
    }

    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    meta = model.metadata.metadata["medzoo"]
    assert meta["class_names"][0] == "basophil" and meta["preprocessing"]["input_size"] == 28
    assert len(meta["preprocessing"]["mean"]) == 3
    batch = np.random.default_rng(0).random((5, 3, 28, 28), dtype=np.float32)
    predicted = model.predict(batch)
    assert predicted.shape == (5, 8)
    torch_model = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(predicted, expected, atol=1e-5)


def test_a_run_logs_the_same_params_through_mlflow_run_and_the_cli(synthetic_env, mlflow_store):
    params = [p for p in TRAIN_PARAMS if not p.startswith("epochs=")] + ["epochs=1"]
    assert mlflow_run(*params).returncode == 0
    flags = [f"--{p.replace('=', ' ', 1)}" for p in params] + ["--no-progress"]
    assert cli_main(["train", *" ".join(flags).split()]) == 0
    through_mlflow, through_cli = sorted(all_runs(), key=lambda r: r.info.start_time)
    assert through_mlflow.data.params == through_cli.data.params
    assert "''" not in through_mlflow.data.params.values() and "None" not in through_cli.data.params.values()


def test_bad_parameters_fail_cleanly(synthetic_env, mlflow_store):
    """Through `mlflow run`, whose run exists before our code starts: it ends FAILED with the reason. (Every other
    bad value is refused the same way in-process: tests/test_train.py, tests/test_recipes.py.)"""
    message = "Unknown model 'mobilenet'. Did you mean mobilenetv2"
    result = mlflow_run("model=mobilenet")
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    (run,) = all_runs()
    assert run.info.status == "FAILED" and message in run.data.tags["medzoo.error"]


def test_corrupt_data_file_fails_cleanly(tmp_path, mlflow_store):
    (tmp_path / "breastmnist.npz").write_bytes(b"\x00" * 100)
    result = mlflow_run("dataset=breastmnist", f"data_dir={tmp_path}")
    assert result.returncode != 0 and "MD5" in result.stderr and "corrupt" in result.stderr
    assert [r.info.status for r in all_runs()] == ["FAILED"]


def test_mlflow_run_main_trains_then_registers_with_nested_runs(synthetic_env, mlflow_store):
    result = mlflow_run("models=mlp,cnn", "dataset=breastmnist", "epochs=1", entry_point="main")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = {r.info.run_name: r for r in all_runs()}
    parent = runs["main-breastmnist"]
    assert parent.info.status == "FINISHED"
    children = [r for r in runs.values() if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags.get("model", "register") for r in children) == ["cnn", "mlp", "register"]
    assert all(r.info.status == "FINISHED" for r in children)
    register_run = next(r for r in children if "registered_version" in r.data.tags)
    assert register_run.data.tags["registered_model"] == "medzoo-breastmnist"
    champion = mlflow.MlflowClient().get_model_version_by_alias("medzoo-breastmnist", "champion")
    assert champion.tags["source_run"] == register_run.data.tags["source_run"]


def test_mlflow_run_export_writes_a_checked_onnx_file(synthetic_env, mlflow_store, tmp_path):
    from training.workflows.train import run_training

    outcome = run_training(shrunk(model="mlp", dataset="breastmnist", epochs=1), progress=False)
    output = tmp_path / "exported" / "breast.onnx"
    result = mlflow_run(f"run_id={outcome.run_id}", f"output={output}", entry_point="export")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "parity: max |logit difference|" in result.stdout
    import onnx

    props = {p.key: p.value for p in onnx.load(str(output)).metadata_props}
    assert props["source_run"] == outcome.run_id and "model_version" not in props
    assert mlflow.search_registered_models() == []  # export never registers


def test_mlflow_run_classical_on_pixels_leaves_one_finished_run(synthetic_env, mlflow_store):
    params = ("dataset=breastmnist", "features=raw", "model=dt", "max_train_samples=200")
    result = mlflow_run(*params, entry_point="classical")
    assert result.returncode == 0, result.stderr[-3000:]
    [run] = all_runs()
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.runName"] == "dt-breastmnist"
    assert run.data.params["model"] == "dt" and run.data.params["feature_source"] == "raw"
    assert 0 <= run.data.metrics["test_acc"] <= 1 and "best.max_depth" in run.data.params


def test_mlflow_run_study_nests_every_configuration_under_the_project_run(synthetic_env, mlflow_store, tmp_path):
    study = {
        "title": "two nets",
        "datasets": ["breastmnist"],
        "defaults": {"recipe": "none", "batch_size": 16, "lr": 0.01},
        "budgets": {"quick": {"max_epochs": 1}, "full": {}},
        "plots": ["bar"],
        "runs": [
            {"name": "mlp", "train": {"model": "mlp"}},
            {"name": "cnn", "train": {"model": "cnn", "model.filters": "8"}, "reported": 0.853},
        ],
    }
    path = tmp_path / "two-nets.yaml"
    path.write_text(yaml.safe_dump(study))
    args = [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "study", "--env-manager", "local"]
    args += ["--experiment-name", "studies", "-P", f"name={path}", "-P", "seeds=0"]
    result = subprocess.run(args, capture_output=True, text=True, env=project_env(), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = all_runs()
    [parent] = [r for r in runs if r.data.tags.get("kind") == "study"]
    assert parent.info.status == "FINISHED" and parent.data.tags["mlflow.runName"] == "study-two-nets"
    assert parent.data.tags["mlflow.project.entryPoint"] == "study"  # the run `mlflow run` made is the parent
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["study_config"] for r in children) == ["cnn", "mlp", "ours: recipe quick"]
    experiment = mlflow.get_experiment(parent.info.experiment_id)
    assert experiment.name == "studies" and {r.info.experiment_id for r in children} == {experiment.experiment_id}
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "| cnn | breastmnist | 0.8530 |" in mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/study.md")
