"""In-process training runs against a temporary MLflow store: selection, tracking, failure states."""

import dataclasses
import math

import mlflow
import numpy as np
import pytest

from tests.helpers.runs import shrunk
from training.core.config import ConfigError, TrainConfig, parse_model_kwargs
from training.core.data import DatasetError
from training.workflows.train import run_training

PER_EPOCH = ("train_loss", "train_acc", "val_loss", "val_acc", "val_auc", "lr", "epoch_time")


def tiny(**overrides) -> TrainConfig:
    values = dict(model="cnn", epochs=3, model_kwargs={"filters": "8,16", "hidden": 32})
    values.update(overrides)
    return shrunk(**values)


def runs(status=None):
    found = mlflow.search_runs(search_all_experiments=True, output_format="list")
    return [r for r in found if status is None or r.info.status == status]


def test_training_selects_the_best_validation_epoch_and_tests_once(synthetic_env, mlflow_store):
    # float32 steps: selection then scores epochs with the same numbers as the final evaluation (with bf16 steps it
    # scores them in bf16, within an image or so of these).
    outcome = run_training(tiny(epochs=4, select_metric="acc", tta="none", precision="fp32"), progress=False)
    # Each epoch offers its raw weights and their EMA; the best of all of them is kept.
    history = [max(h.metrics["val_acc"], h.metrics["ema_val_acc"]) for h in outcome.fit.history]
    assert outcome.fit.best_epoch == 1 + int(np.argmax(history))
    assert outcome.val_metrics["best_val_acc"] == pytest.approx(max(history))
    assert outcome.test_metrics["test_acc"] > 0.5  # 8 learnable classes: chance is 0.125

    run = mlflow.get_run(outcome.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "cnn-bloodmnist"
    assert (
        run.data.tags["model"] == "cnn" and run.data.tags["dataset"] == "bloodmnist" and run.data.tags["size"] == "28"
    )
    client = mlflow.MlflowClient()
    for key in PER_EPOCH:
        assert [m.step for m in client.get_metric_history(outcome.run_id, key)] == [1, 2, 3, 4], key
    assert len(client.get_metric_history(outcome.run_id, "test_acc")) == 1


@pytest.mark.slow
def test_runs_land_in_a_training_experiment_named_after_the_dataset_unless_one_is_chosen(
    synthetic_env, mlflow_store, monkeypatch
):
    client = mlflow.MlflowClient()
    first = mlflow.get_run(run_training(tiny(epochs=1), progress=False).run_id)
    experiment = client.get_experiment(first.info.experiment_id)
    # MLflow 3's UI opens a model-training experiment on its runs table, not on the GenAI overview
    assert experiment.name == "bloodmnist" and experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    second = mlflow.get_run(run_training(tiny(epochs=1), progress=False).run_id)
    assert second.info.experiment_id == experiment.experiment_id

    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "my-experiment")
    chosen = client.get_experiment_by_name("my-experiment") or client.get_experiment(
        client.create_experiment("my-experiment")
    )
    third = mlflow.get_run(run_training(tiny(epochs=1), progress=False).run_id)
    assert third.info.experiment_id == chosen.experiment_id
    assert client.get_experiment(chosen.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_select_metric_last_keeps_the_final_raw_weights(synthetic_env, mlflow_store):
    # calibration=none: a temperature keeps the accuracy but moves the AUC (class probabilities across images);
    # fp32: the epochs' scores are then the final evaluation's numbers
    outcome = run_training(
        tiny(epochs=3, select_metric="last", tta="none", ema=0.9, calibration="none", precision="fp32"), progress=False
    )
    assert (outcome.fit.best_epoch, outcome.fit.best_weights) == (3, "raw")
    final = outcome.fit.history[-1].metrics
    assert outcome.val_metrics["best_val_acc"] == pytest.approx(final["val_acc"])
    assert outcome.val_metrics["best_val_auc"] == pytest.approx(final["val_auc"])


def test_selection_keeps_the_best_candidate_and_counts_patience():
    from training.core.engine import Selection

    selection, states = Selection(patience=2), {}
    scores = [{"raw": 0.5}, {"raw": 0.7, "ema": 0.8}, {"raw": 0.79, "ema": 0.8}, {"raw": float("nan")}]
    for epoch, candidates in enumerate(scores, 1):
        selection.update(epoch, candidates, lambda source, e=epoch: states.setdefault((e, source), {"w": (e, source)}))
    assert (selection.best_epoch, selection.best_source, selection.best_score) == (2, "ema", 0.8)
    assert selection.state == {"w": (2, "ema")} and selection.exhausted  # epochs 3 and 4 brought no gain
    assert not Selection(patience=0).exhausted


@pytest.mark.slow
def test_early_stopping_follows_the_recorded_validation_scores(synthetic_env, mlflow_store):
    outcome = run_training(tiny(epochs=6, patience=1, scheduler="plateau", select_metric="acc"), progress=False)
    # Each epoch offers the raw weights and their EMA; either one improving resets the patience.
    scores = [max(h.metrics["val_acc"], h.metrics.get("ema_val_acc", -1.0)) for h in outcome.fit.history]
    best, stale, expected_stop = -1.0, 0, None
    for epoch, score in enumerate(scores, 1):
        stale = 0 if score > best else stale + 1
        best = max(best, score)
        if stale >= 1:
            expected_stop = epoch
            break
    assert outcome.fit.stopped_early == (expected_stop is not None)
    assert len(scores) == (expected_stop or 6)
    for scheduler in ("onecycle", "multistep", "cosine", "none"):
        outcome = run_training(tiny(epochs=2, scheduler=scheduler, optimizer="sgd", warmup_epochs=1), progress=False)
        assert all(math.isfinite(h.metrics["train_loss"]) for h in outcome.fit.history)


@pytest.mark.slow
def test_l1_and_weight_decay_shrink_weights(synthetic_env, mlflow_store):
    import torch

    def weight_norm(**kw):
        torch.manual_seed(0)
        outcome = run_training(
            tiny(model="mlp", epochs=2, model_kwargs={}, optimizer="sgd", lr=0.05, ema=0.0, **kw), progress=False
        )
        model = mlflow.pytorch.load_model(outcome.model_uri)
        return sum(float(p.abs().sum()) for p in model.state_dict().values() if p.dim() > 1)

    plain = weight_norm()
    assert weight_norm(l1=1e-3) < plain
    assert weight_norm(weight_decay=0.5) < plain


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(model="resnet-18"), "Unknown model 'resnet-18'"),
        (dict(dataset="chestmnist"), "multi-label"),
        (dict(optimizer="adagrad"), "optimizer='adagrad' is not one of: sgd, adam, adamw, nadamw, lamb, lion"),
        (dict(scheduler="step"), "scheduler='step' is not one of"),
        (dict(select_metric="f1"), "select_metric='f1' is not one of: auc, acc, last"),
        (dict(select_metric="last", patience=3), "patience=3 needs a validation metric"),
        (dict(epochs=0), "epochs=0 must be >= 1"),
        (dict(lr=-1.0), "lr=-1.0 must be > 0"),
        (dict(dropout=1.5), r"dropout=1.5 must be in \[0, 1\)"),
        (dict(model_kwargs={"kernel": 5}), "cnn' has no option.*kernel"),
        (dict(model="mlp", model_kwargs={}, pretrained="true"), "has no pretrained weights"),
    ],
)
def test_bad_values_fail_before_any_run_exists(overrides, message, synthetic_env, mlflow_store):
    with pytest.raises(ConfigError, match=message):
        run_training(tiny(**overrides), progress=False)
    assert runs() == []


def test_model_kwargs_parsing():
    assert parse_model_kwargs("filters=32,64 kernel_size=5 pool=avg batch_norm=false") == {
        "filters": "32,64",
        "kernel_size": 5,
        "pool": "avg",
        "batch_norm": False,
    }
    with pytest.raises(ConfigError, match="is not key=value"):
        parse_model_kwargs("filters")


def test_a_crash_ends_the_run_failed_and_ctrl_c_killed(synthetic_env, mlflow_store):
    def explode(epoch):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        run_training(tiny(epochs=2), on_epoch_end=explode, progress=False)

    def interrupt(epoch):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(tiny(epochs=2), on_epoch_end=interrupt, progress=False)
    statuses = sorted((r.info.status, r.data.tags.get("medzoo.error", "")) for r in runs())
    (failed, crash), (killed, interrupt) = statuses
    assert (failed, killed) == ("FAILED", "KILLED")
    assert crash.startswith("RuntimeError: disk full") and interrupt.startswith("interrupted by the user (Ctrl-C)")
    # both stopped after a finished epoch: the reason says how to go on from it
    assert "train --resume" in crash and "train --resume" in interrupt
    assert runs("RUNNING") == []


def test_missing_data_ends_the_run_failed(tmp_path, mlflow_store, monkeypatch):
    monkeypatch.setenv("MEDZOO_DATA_DIR", str(tmp_path / "nothing-here"))
    try:
        run_training(tiny(dataset="breastmnist", epochs=1), progress=False)
    except DatasetError as err:
        assert "place the official file" in str(err)
    else:
        pytest.skip("this machine is online: the download succeeded")
    assert [r.info.status for r in runs()] == ["FAILED"]


def test_a_run_is_resolved_once_before_it_starts():
    from training.core.config import resolve

    run = resolve(TrainConfig(model="convnext", dataset="bloodmnist", augment="auto", tta="auto", device="auto"))
    assert run.input_size == 32 and run.notes == ("size raised from 28 to 32 px, the minimum for convnext",)
    assert run.device == "cpu" or run.device == "cuda"
    assert "vflip" in run.augment and "color" in run.augment  # blood cells: no orientation, three channels
    assert run.tta[0] == "identity" and "hflip" in run.tta
    organ = resolve(TrainConfig(dataset="organamnist", augment="auto", tta="auto"))
    assert organ.augment == ("translate",) and not {"hflip", "vflip"} & set(organ.tta)  # left and right are anatomy
    with pytest.raises(ConfigError, match="augment='hflip'.*organamnist"):
        resolve(TrainConfig(dataset="organamnist", augment="hflip"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.input_size = 28


def test_lookahead_adamw_moves_halfway_to_adamw_every_k_steps_and_round_trips():
    import torch

    from training.core.optim import make_optimizer

    torch.manual_seed(0)
    model, plain = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
    plain.load_state_dict(model.state_dict())
    optimizer = make_optimizer("lookahead_adamw", model, lr=0.1, weight_decay=0.0)
    reference = make_optimizer("adamw", plain, lr=0.1, weight_decay=0.0)
    assert optimizer.defaults["fused"] is True
    k, alpha = optimizer.defaults["lookahead_k"], optimizer.defaults["lookahead_alpha"]
    after = {}
    for step in range(1, 2 * k + 1):  # the same batches for both
        batch = torch.randn(8, 4)
        for net, opt in ((model, optimizer), (plain, reference)):
            opt.zero_grad()
            net(batch).pow(2).mean().backward()
            opt.step()
        after[step] = plain.weight.detach().clone()
    # timm keeps the slow weights from the k-th step on (its first pull-back is a no-op); after k more fast steps
    # they move alpha of the way to where AdamW alone went, and the network takes them.
    torch.testing.assert_close(model.weight.detach(), after[k] + alpha * (after[2 * k] - after[k]))
    assert not torch.allclose(model.weight.detach(), after[2 * k])
    restored = make_optimizer("lookahead_adamw", model, lr=0.1, weight_decay=0.0)
    restored.load_state_dict(optimizer.state_dict())
    saved, loaded = optimizer.state_dict()["state"], restored.state_dict()["state"]
    assert saved.keys() == loaded.keys()
    for key in saved:  # AdamW's moments and the slow weights come back exactly
        for name in ("exp_avg", "exp_avg_sq", "lookahead_slow_buff"):
            torch.testing.assert_close(loaded[key][name], saved[key][name], rtol=0, atol=0)
