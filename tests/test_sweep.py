"""Sweeps: parent/child runs, pruning, resuming, two workers on one study, and bad input."""

import subprocess
import sys
import time

import mlflow
import optuna
import pytest

from tests.helpers.runs import project_env, shrunk
from training.core.config import ConfigError
from training.workflows.sweep import SweepOptions
from training.workflows.sweep import run_sweep as run_sweep_with_options

SPACE = """
common:
  lr: {type: float, low: 1.0e-4, high: 3.0e-2, log: true}
  optimizer: {type: categorical, choices: [adam, sgd]}
models:
  cnn:
    model.filters: {type: categorical, choices: ["4,8", "8,16"]}
    model.kernel_size: {type: categorical, choices: [3, 5]}
"""


@pytest.fixture
def space_file(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(SPACE)
    return str(path)


def base(**overrides):
    values = dict(model="cnn", dataset="breastmnist", epochs=3, model_kwargs={"hidden": 16})
    values.update(overrides)
    return shrunk(**values)


def run_sweep(base, trials, space_file, storage, study_name="auto", pruning=True, progress=False):
    options = SweepOptions(trials, space_file, storage, study_name, pruning)
    return run_sweep_with_options(base, options, progress=progress)


def all_runs():
    return mlflow.search_runs(search_all_experiments=True, output_format="list")


@pytest.mark.slow
def test_sweep_with_pruning_resume_and_artifacts(synthetic_env, mlflow_store, space_file, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    result = run_sweep(base(), trials=3, space_file=space_file, storage=storage, pruning=True, progress=False)
    parent = mlflow.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "sweep-cnn-breastmnist"
    children = [r for r in all_runs() if r.data.tags.get("mlflow.parentRunId") == result.parent_run_id]
    assert len(children) == 3 and all(r.info.status == "FINISHED" for r in children)
    client = mlflow.MlflowClient()
    for child in children:  # same names as a plain training run, one value per epoch trained
        history = client.get_metric_history(child.info.run_id, "val_auc")
        assert [m.step for m in history] == list(range(1, len(history) + 1)) and history
        assert {"lr", "optimizer", "model.filters", "model.kernel_size"} <= set(child.data.params)
    best = result.study.best_trial
    assert parent.data.tags["best_lr"] == str(best.params["lr"])
    assert parent.data.metrics[f"best_{base().select_key}"] == pytest.approx(best.value)
    assert parent.data.tags["best_run_id"] in {c.info.run_id for c in children}
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id, "plots")}
    assert "plots/optimization_history.png" in artifacts
    completed = [t for t in result.study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len({tuple(sorted(t.params.items())) for t in completed}) >= 2:  # importances need varied trials
        assert "plots/param_importances.png" in artifacts
    else:
        assert "plots/param_importances.png" not in artifacts and "param_importances" in parent.data.tags

    resumed = run_sweep(base(), trials=2, space_file=space_file, storage=storage, progress=False)
    assert len(resumed.study.trials) == 5 and resumed.study.study_name == "cnn-breastmnist"
    assert sorted(t.number for t in resumed.study.trials) == [0, 1, 2, 3, 4]
    # The resumed sweep continues under its first parent: one parent, five nested trials.
    assert resumed.parent_run_id == result.parent_run_id
    assert [r.info.run_name for r in all_runs()].count("sweep-cnn-breastmnist") == 1
    children = [r for r in all_runs() if r.data.tags.get("mlflow.parentRunId") == result.parent_run_id]
    assert len(children) == 5
    assert mlflow.get_run(result.parent_run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_pruner_stops_hopeless_trials(synthetic_env, mlflow_store, space_file, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(
        study_name="pruned",
        storage=storage,
        direction="maximize",
        pruner=optuna.pruners.MedianPruner(n_startup_trials=0, n_warmup_steps=0),
    )
    for value in (0.99, 0.99):  # two strong finished trials: the next, trained with lr ~ 0, must be pruned
        trial = study.ask()
        for step in (1, 2, 3):
            trial.report(value, step)
        study.tell(trial, value)
    hopeless = space_file.replace("space.yaml", "hopeless.yaml")
    open(hopeless, "w").write("common:\n  lr: {type: float, low: 1.0e-9, high: 2.0e-9}\n")
    result = run_sweep(
        base(epochs=4), trials=1, space_file=hopeless, storage=storage, study_name="pruned", progress=False
    )
    last = result.study.trials[-1]
    assert last.state == optuna.trial.TrialState.PRUNED
    run = mlflow.get_run(last.user_attrs["mlflow_run_id"])
    assert run.data.tags["pruned"] == "true" and run.info.status == "FINISHED"
    assert len(mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_auc")) < 4


@pytest.mark.e2e
def test_two_workers_share_one_study(synthetic_env, mlflow_store, space_file, tmp_path):
    storage = f"sqlite:///{tmp_path / 'shared-optuna.db'}"
    mlflow.search_experiments()  # the tracking store exists before the workers start (as a server's would)
    command = [
        sys.executable,
        "-m",
        "training.cli",
        "sweep",
        "--model",
        "cnn",
        "--dataset",
        "breastmnist",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--trials",
        "1",
        "--space-file",
        space_file,
        "--storage",
        storage,
        "--study-name",
        "shared",
        "--no-progress",
    ]

    def start():
        return subprocess.Popen(
            command, cwd=tmp_path, env=project_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    workers = [start(), start()]  # at the same time: the study lock lets one open the parent, the other joins it
    for worker in workers:
        _, stderr = worker.communicate(timeout=600)
        assert worker.returncode == 0, stderr[-3000:]
    study = optuna.load_study(study_name="shared", storage=storage)
    numbers = [t.number for t in study.trials]
    assert sorted(numbers) == [0, 1]  # one trial each, numbered once
    (parent,) = [r for r in all_runs() if r.info.run_name == "sweep-shared"]
    children = [r for r in all_runs() if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2


@pytest.mark.parametrize(
    "space, trials, model, message",
    [
        ("common: [unclosed", 3, "cnn", "is not valid YAML"),
        ("common:\n  learning_rate: {type: float, low: 0.1, high: 0.2}\n", 3, "cnn", "unknown parameter"),
        ("models:\n  cnn:\n    model.kernel: {type: categorical, choices: [3]}\n", 3, "cnn", "has no option.s. kernel"),
        ("common:\n  lr: {type: float, low: 0.2, high: 0.1}\n", 3, "cnn", "needs low < high"),
        (
            "models:\n  cnn:\n    model.pool: {type: categorical, choices: [max, median]}\n",
            3,
            "cnn",
            "pool='median' is not one of",
        ),
        (SPACE, 0, "cnn", "trials=0 must be >= 1"),
        (SPACE, 3, "cnnn", "Unknown model 'cnnn'"),
    ],
)
def test_bad_sweep_input_fails_before_any_run(space, trials, model, message, synthetic_env, mlflow_store, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(space)
    with pytest.raises(ConfigError, match=message):
        run_sweep(
            base(model=model),
            trials=trials,
            space_file=str(path),
            storage=f"sqlite:///{tmp_path / 'o.db'}",
            progress=False,
        )
    assert all_runs() == []


@pytest.mark.slow
def test_leaderboard_table_and_plot(synthetic_env, mlflow_store):
    from training.workflows.leaderboard import run_leaderboard

    parent_id, rows = run_leaderboard(
        ["mlp", "cnn"],
        ["breastmnist", "bloodmnist"],
        lambda model, dataset: shrunk(model=model, dataset=dataset, epochs=1),
        progress=False,
    )
    assert sorted((r["dataset"], r["model"]) for r in rows) == [
        ("bloodmnist", "cnn"),
        ("bloodmnist", "mlp"),
        ("breastmnist", "cnn"),
        ("breastmnist", "mlp"),
    ]
    children = [r for r in all_runs() if r.data.tags.get("mlflow.parentRunId") == parent_id]
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    table = mlflow.artifacts.load_text(f"runs:/{parent_id}/leaderboard.md")
    assert table.count("\n| b") == 4 and "| breastmnist | " in table and "0.863" in table and "0.958" in table
    csv_text = mlflow.artifacts.load_text(f"runs:/{parent_id}/leaderboard.csv")
    assert csv_text.splitlines()[0].startswith("model,dataset,best_val_acc") and len(csv_text.splitlines()) == 5
    plots = {a.path for a in mlflow.MlflowClient().list_artifacts(parent_id, "plots")}
    assert plots == {"plots/accuracy_vs_train_time.png"}


@pytest.mark.e2e
def test_a_trial_whose_worker_was_killed_is_failed_when_the_sweep_starts_again(
    synthetic_env, mlflow_store, space_file, tmp_path
):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    mlflow.search_experiments()
    command = [sys.executable, "-m", "training.cli", "sweep", "--model", "cnn", "--dataset", "breastmnist"]
    command += ["--epochs", "200", "--batch-size", "32", "--trials", "1", "--space-file", space_file]
    command += ["--storage", storage, "--study-name", "killed", "--no-progress"]
    worker = subprocess.Popen(command, cwd=tmp_path, env=project_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    trial_run = None
    while time.monotonic() < deadline and trial_run is None:
        assert worker.poll() is None, worker.communicate()
        running = [r for r in all_runs() if r.data.tags.get("trial") == "0"]
        if running and "medzoo.checkpoint_epoch" in running[0].data.tags:
            trial_run = running[0]
        time.sleep(0.2)
    worker.kill()  # mid-trial, without a word
    worker.communicate(timeout=60)
    assert mlflow.get_run(trial_run.info.run_id).info.status == "RUNNING"

    result = run_sweep(base(epochs=1), 1, space_file, storage, study_name="killed")
    states = {t.number: t.state.name for t in result.study.trials}
    assert states == {0: "FAIL", 1: "COMPLETE"}  # the dead trial failed, the study went on
    dead = mlflow.get_run(trial_run.info.run_id)
    assert dead.info.status == "FAILED" and "worker died mid-trial" in dead.data.tags["medzoo.error"]


def test_a_sweep_refuses_select_metric_last(synthetic_env, mlflow_store, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    with pytest.raises(ConfigError, match="select_metric='last' ranks nothing"):
        run_sweep(base(select_metric="last"), 2, str(space), f"sqlite:///{tmp_path / 'o.db'}")
    assert all_runs() == []


def test_leaderboards_and_pipelines_with_nothing_to_train_are_refused_before_any_run(mlflow_store):
    from training.workflows.leaderboard import run_leaderboard
    from training.workflows.pipeline import run_pipeline

    with pytest.raises(ConfigError, match="models and datasets must each name at least one entry"):
        run_leaderboard([], ["breastmnist"], lambda model, dataset: shrunk(model=model, dataset=dataset))
    with pytest.raises(ConfigError, match="models is empty"):
        run_pipeline([], lambda model: shrunk(model=model))
    with pytest.raises(ConfigError, match="Unknown model 'resnet-18'"):
        run_pipeline(["cnn", "resnet-18"], lambda model: shrunk(model=model))
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []
