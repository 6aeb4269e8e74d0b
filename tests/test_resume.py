"""Long work survives faults: the rolling checkpoint, resume in the same run, SIGTERM, orphans reaped."""

import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest

from tests.helpers.paths import ROOT
from tests.helpers.runs import project_env, shrunk
from training.cli import main as cli_main
from training.tracking.checkpoint import SLOTS, load_checkpoint
from training.tracking.resume import resumption
from training.workflows.train import run_training


class Crash(RuntimeError):
    pass


def crash_after(epoch: int):
    def on_epoch_end(result):
        if result.epoch == epoch:
            raise Crash(f"power cut after epoch {epoch}")

    return on_epoch_end


def config(**overrides):
    # the real default recipe (augmentation, OneCycle, EMA, label smoothing, test-time views), tiny
    return shrunk(**{"epochs": 4, **overrides})


def history(run_id: str, key: str = "train_loss") -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in mlflow.MlflowClient().get_metric_history(run_id, key))


@pytest.mark.slow
def test_a_resumed_run_ends_exactly_where_an_uninterrupted_one_does(synthetic_env, mlflow_store):
    whole = run_training(config(), progress=False)
    with pytest.raises(Crash):
        run_training(config(), progress=False, on_epoch_end=crash_after(2))
    [stopped] = mlflow.search_runs(
        filter_string="attributes.status = 'FAILED'", search_all_experiments=True, output_format="list"
    )
    assert "power cut" in stopped.data.tags["medzoo.error"] and "--resume" in stopped.data.tags["medzoo.error"]
    assert stopped.data.tags["medzoo.checkpoint_epoch"] == "2"
    # one rolling checkpoint in two slots, not one file per epoch
    files = {a.path for a in mlflow.MlflowClient().list_artifacts(stopped.info.run_id, "checkpoint")}
    assert files == {f"checkpoint/{s}" for s in SLOTS}

    resumed_config, state = resumption(stopped.info.run_id)
    assert resumed_config == config() and state.state["epoch"] == 2
    resumed = run_training(resumed_config, progress=False, resume=state)

    assert resumed.run_id == stopped.info.run_id  # the same MLflow run goes on
    run = mlflow.get_run(resumed.run_id)
    assert run.info.status == "FINISHED" and "medzoo.error" not in run.data.tags
    assert "power cut" in run.data.tags["medzoo.previous_error"]
    # metrics continue at the next step: every epoch once, equal to the uninterrupted run's
    assert [step for step, _ in history(resumed.run_id)] == [1, 2, 3, 4]
    for key in ("train_loss", "val_acc", "ema_val_acc"):
        assert history(resumed.run_id, key) == history(whole.run_id, key), key
    assert resumed.test_metrics == whole.test_metrics and resumed.val_metrics == whole.val_metrics
    assert resumed.fit.best_epoch == whole.fit.best_epoch


def test_runs_that_cannot_go_on_say_why(synthetic_env, mlflow_store, capsys):
    finished = run_training(config(epochs=1), progress=False)
    assert cli_main(["train", "--resume", finished.run_id]) == 2
    assert "the run is FINISHED; only FAILED, KILLED or orphaned runs go on" in capsys.readouterr().err
    assert cli_main(["train", "--resume", "0123456789abcdef0123456789abcdef"]) == 2
    assert "no such run" in capsys.readouterr().err
    with pytest.raises(Crash):  # fails before its first epoch ends: nothing to continue from
        run_training(config(), progress=False, on_epoch_end=crash_after(1))
    [failed] = mlflow.search_runs(
        filter_string="attributes.status = 'FAILED'", search_all_experiments=True, output_format="list"
    )
    failed_id = failed.info.run_id
    mlflow.MlflowClient().delete_tag(failed_id, "medzoo.checkpoint")
    assert cli_main(["train", "--resume", failed_id]) == 2
    assert "has no checkpoint" in capsys.readouterr().err
    assert mlflow.get_run(failed_id).info.status == "FAILED"  # untouched


def start_training(epochs: int) -> subprocess.Popen:
    args = [
        sys.executable,
        "-m",
        "training.cli",
        "train",
        "--model",
        "cnn",
        "--model.filters",
        "8,16",
        "--dataset",
        "bloodmnist",
        "--epochs",
        str(epochs),
        "--batch-size",
        "16",
        "--tta",
        "none",
        "--no-progress",
    ]
    return subprocess.Popen(
        args,
        cwd=os.getcwd(),
        env=project_env(PYTHONPATH=str(ROOT)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_epochs(process: subprocess.Popen, logged: int, within_s: float = 120) -> str:
    """The run's id once it has a checkpoint and has logged ``logged`` epochs. With the default interval (30 s)
    the checkpoint is still the first epoch's: the later epochs are in the run's metrics only."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
        if runs and "medzoo.checkpoint_epoch" in runs[0].data.tags and len(history(runs[0].info.run_id)) >= logged:
            return runs[0].info.run_id
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint and {logged} logged epochs within {within_s} s")


def resume_in_subprocess(run_id: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "training.cli", "train", "--resume", run_id, "--no-progress"]
    return subprocess.run(args, env=project_env(PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=600)


@pytest.mark.e2e
def test_sigterm_ends_the_run_killed_with_its_checkpoint_and_resume_finishes_it(synthetic_env, mlflow_store):
    process = start_training(epochs=12)
    run_id = wait_for_epochs(process, logged=3)
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGTERM)  # a scheduler repeating itself: the second lands during the first's handling
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143 and "Traceback" not in stderr, stderr[-2000:]
    run = mlflow.get_run(run_id)
    assert run.info.status == "KILLED"
    assert (
        run.data.tags["medzoo.error"].startswith("terminated by SIGTERM")
        and "--resume" in run.data.tags["medzoo.error"]
    )
    done = int(run.data.tags["medzoo.checkpoint_epoch"])
    # no finished epoch lost: the checkpoint written on the way out holds the last epoch the run logged
    assert load_checkpoint(run_id)["epoch"] == done == len(history(run_id)) >= 3

    config, state = resumption(run_id)  # in this process; the next test resumes through the command line
    run_training(config, progress=False, resume=state)
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["medzoo.resumed_from_epoch"] == str(done)
    assert [step for step, _ in history(run_id)] == list(range(1, 13))
    assert 0 <= run.data.metrics["test_acc"] <= 1


@pytest.mark.e2e
def test_a_run_killed_without_a_word_is_reaped_failed_and_resumed(synthetic_env, mlflow_store, capsys):
    process = start_training(epochs=8)
    run_id = wait_for_epochs(process, logged=3)
    process.kill()  # SIGKILL: no handler runs, the run stays RUNNING; epochs past the checkpoint are logged only
    process.communicate(timeout=60)
    killed = mlflow.get_run(run_id)
    assert killed.info.status == "RUNNING"
    assert int(killed.data.tags["medzoo.checkpoint_epoch"]) < len(history(run_id))  # logged past the checkpoint

    assert cli_main(["runs", "list"]) == 0
    listed = capsys.readouterr().out
    assert run_id in listed and "orphaned" in listed
    assert cli_main(["runs", "reap"]) == 0
    assert f"marked FAILED: {run_id}" in capsys.readouterr().out
    run = mlflow.get_run(run_id)
    assert run.info.status == "FAILED" and "died without ending the run" in run.data.tags["medzoo.error"]

    result = resume_in_subprocess(run_id)
    assert result.returncode == 0, result.stderr[-3000:]
    assert mlflow.get_run(run_id).info.status == "FINISHED"
    assert [step for step, _ in history(run_id)] == list(range(1, 9))  # trained again, logged once
