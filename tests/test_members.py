"""``members=N``: one parent run of N seeded member runs and their equal-weight ensemble; a stopped one goes on."""

import mlflow
import numpy as np
import pytest

import training.workflows.network
from tests.helpers.runs import shrunk
from training.core.calibration import tempered
from training.core.config import ConfigError
from training.export.onnx import export_run, onnx_probabilities
from training.tracking.resume import resumption
from training.workflows.members import MEMBER_OF_TAG, MEMBER_TAG
from training.workflows.train import run_training


class Crash(RuntimeError):
    pass


def config(**overrides):
    return shrunk(**{"epochs": 2, "members": 2, "seed": 1, **overrides})


def member_runs(parent_id: str) -> list:
    found = mlflow.search_runs(
        search_all_experiments=True, output_format="list", filter_string=f"tags.`{MEMBER_OF_TAG}` = '{parent_id}'"
    )
    return sorted(found, key=lambda r: int(r.data.tags[MEMBER_TAG]))


def crash_member_with_seed(seed: int, monkeypatch):
    """The member trained with ``seed`` fails after its first epoch (after that epoch's checkpoint)."""
    real_fit = training.workflows.network.fit

    def fit(model, train, val, class_names, options, log_epoch, *args, **kwargs):
        if options.seed == seed and kwargs.get("resume") is None:

            def log_then_crash(result):
                log_epoch(result)
                raise Crash("power cut in a member")

            return real_fit(model, train, val, class_names, options, log_then_crash, *args, **kwargs)
        return real_fit(model, train, val, class_names, options, log_epoch, *args, **kwargs)

    monkeypatch.setattr(training.workflows.network, "fit", fit)


@pytest.mark.slow
def test_members_train_with_their_own_seeds_and_a_stopped_parent_goes_on_to_the_same_ensemble(
    synthetic_env, mlflow_store, monkeypatch
):
    whole = run_training(config(), progress=False)
    parent = mlflow.get_run(whole.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["kind"] == "ensemble"
    assert parent.data.params["members"] == "2" and parent.data.params["chosen_weights"] == "0.5000,0.5000"
    members = member_runs(whole.run_id)
    # seed 1 of an ensemble of 2: members 2 and 3, so the ensembles of seeds 0, 1, 2 share no network
    assert [m.data.params["seed"] for m in members] == ["2", "3"]
    assert all(m.data.tags["mlflow.parentRunId"] == whole.run_id and m.info.status == "FINISHED" for m in members)
    assert [m.info.run_id for m in members] == whole.member_run_ids

    # the parent's model is the average of its members' probabilities, in one graph, calibrated as a whole
    images = np.random.default_rng(0).random((8, 3, 28, 28), dtype=np.float32)
    fused = onnx_probabilities(export_run(whole.run_id).proto, images)
    average = np.mean([onnx_probabilities(export_run(m.info.run_id).proto, images) for m in members], axis=0)
    np.testing.assert_allclose(fused, tempered(average, parent.data.metrics["temperature"]), atol=1e-5)
    assert whole.ensemble.member_test_acc == [m.data.metrics["test_acc"] for m in members]

    with monkeypatch.context() as patch, pytest.raises(Crash):
        crash_member_with_seed(3, patch)
        run_training(config(), progress=False)
    [stopped] = mlflow.search_runs(
        search_all_experiments=True,
        output_format="list",
        filter_string="attributes.status = 'FAILED' and tags.kind = 'ensemble'",
    )
    assert f"--resume {stopped.info.run_id}" in stopped.data.tags["medzoo.error"]
    first, second = member_runs(stopped.info.run_id)
    assert (first.info.status, second.info.status) == ("FINISHED", "FAILED")

    resumed_config, state = resumption(stopped.info.run_id)
    assert resumed_config == config()
    resumed = run_training(resumed_config, progress=False, resume=state)
    assert resumed.run_id == stopped.info.run_id and mlflow.get_run(resumed.run_id).info.status == "FINISHED"
    # the finished member is kept as it was, the stopped one went on in its own run from its checkpoint
    assert resumed.member_run_ids == [first.info.run_id, second.info.run_id]
    assert mlflow.get_run(first.info.run_id).info.end_time == first.info.end_time
    assert mlflow.get_run(second.info.run_id).data.tags["medzoo.resumed_from_epoch"] == "1"
    assert resumed.test_metrics == whole.test_metrics and resumed.val_metrics == whole.val_metrics


def test_members_must_be_at_least_one(synthetic_env, mlflow_store):
    with pytest.raises(ConfigError, match="members=0 must be >= 1"):
        run_training(config(members=0), progress=False)
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []
