"""Robustness to the MedMNIST-C corruptions: the package's corruptions and formulas, and the logged evaluation."""

import json

import mlflow
import numpy as np
import pytest

from contract import ROBUSTNESS_TAG
from tests.helpers.runs import shrunk
from training.core import corruptions
from training.core.corruptions import CorruptionError
from training.export.register import register_best
from training.workflows.robustness import RobustnessError, RobustnessOptions, balanced_errors, run_robustness
from training.workflows.train import run_training

REAL_BREAST = "breastmnist"


def grey_images(n: int = 6, size: int = 28) -> np.ndarray:
    ramp = np.linspace(40, 200, size * size).reshape(size, size)
    return np.stack([np.roll(ramp, 3 * i, axis=1) for i in range(n)])[:, None].astype(np.uint8)


def test_corruptions_keep_shape_and_dtype_repeat_with_the_seed_and_grow_with_the_severity():
    images = grey_images()
    noise = corruptions.corruptions_of("organamnist", ["gaussian_noise"])["gaussian_noise"]
    mild, strong = (corruptions.corrupt(images, noise, s, seed=3) for s in (1, 5))
    assert mild.shape == images.shape and mild.dtype == np.uint8
    assert np.array_equal(mild, corruptions.corrupt(images, noise, 1, seed=3))
    assert not np.array_equal(mild, corruptions.corrupt(images, noise, 1, seed=4))
    change = [np.abs(x.astype(float) - images).mean() for x in (mild, strong)]
    assert 0 < change[0] < change[1]
    colour = np.repeat(images, 3, axis=1)
    darker = corruptions.corrupt(colour, corruptions.corruptions_of("bloodmnist")["brightness_down"], 5, seed=0)
    assert darker.shape == colour.shape and darker.mean() < 0.7 * colour.mean()


@pytest.mark.parametrize("dataset, channels", [("organamnist", 1), ("bloodmnist", 3), ("breastmnist", 1)])
def test_every_corruption_of_the_three_datasets_runs_on_our_library_versions(dataset, channels):
    """medmnistc pins older numpy-era libraries; each of its corruptions must run on ours (motion blur needs the
    module's shim) and change the image."""
    images = np.repeat(grey_images(2), channels, axis=1)
    for name, corruption in corruptions.corruptions_of(dataset).items():
        damaged = corruptions.corrupt(images, corruption, 5, seed=0)
        assert damaged.shape == images.shape and damaged.dtype == np.uint8, name
        assert not np.array_equal(damaged, images), name


def test_unknown_datasets_corruptions_and_severities_name_what_exists():
    with pytest.raises(CorruptionError, match="no corruptions for 'mnist'.*breastmnist"):
        corruptions.corruptions_of("mnist")
    with pytest.raises(CorruptionError, match="'fog' is not defined for organamnist.*gaussian_noise"):
        corruptions.corruptions_of("organamnist", ["fog"])
    noise = corruptions.corruptions_of("organamnist", ["gaussian_noise"])["gaussian_noise"]
    with pytest.raises(CorruptionError, match="severity=6 is not one of 1-5"):
        corruptions.corrupt(grey_images(), noise, 6, seed=0)


def test_be_and_rbe_are_the_packages_own_numbers(tmp_path):
    """Our formulas against medmnistc's Evaluator on the same predictions."""
    from medmnistc.eval import Evaluator

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 60)
    names = ["pixelate", "speckle_noise"]
    evaluator = Evaluator(REAL_BREAST, labels[:, None], names, str(tmp_path), "ours", "binary-class")

    def probs(flip_share):
        flipped = np.where(rng.random(60) < flip_share, 1 - labels, labels)
        return np.eye(2)[flipped]

    clean = probs(0.1)
    evaluator.evaluate_clean(clean)
    scores = {}
    for name in names:
        per_severity = [probs(0.1 + 0.05 * s) for s in range(5)]
        evaluator.evaluate(np.concatenate(per_severity), name)
        scores[name] = [1 - e for e in evaluator.corruption_errors[name]]
    evaluator.output_log = {}
    evaluator.populate_summary()
    ours = balanced_errors(scores, 1 - evaluator.clean_score, corruptions.alexnet_baseline(REAL_BREAST))
    for name in names:
        assert ours[name]["be"] == pytest.approx(evaluator.output_log["be_scores"][name])
        assert ours[name]["rbe"] == pytest.approx(evaluator.output_log["rbe_scores"][name])
    assert balanced_errors(scores, 0.9, None) == {}


@pytest.mark.slow
def test_a_registered_version_is_evaluated_logged_and_its_card_gains_the_summary(mlflow_store, synthetic_env):
    run_id = run_training(
        shrunk(dataset="bloodmnist", model="cnn", epochs=1, model_kwargs={"filters": "8", "hidden": 8}, tta="none"),
        progress=False,
    ).run_id
    register_best("bloodmnist")
    client = mlflow.MlflowClient()
    runs_before = len(mlflow.search_runs(search_all_experiments=True, output_format="list"))
    for options, error, message in (
        (RobustnessOptions(run=run_id, model="medzoo-bloodmnist@champion"), RobustnessError, "exactly one of"),
        (RobustnessOptions(model="medzoo-bloodmnist@best"), RobustnessError, "medzoo-bloodmnist .@champion."),
        (RobustnessOptions(run=run_id, corruptions=["fog"]), CorruptionError, "'fog' is not defined"),
        (RobustnessOptions(run=run_id, max_images=-1), RobustnessError, "max_images=-1"),
    ):
        with pytest.raises(error, match=message):
            run_robustness(options, progress=False)
    assert len(mlflow.search_runs(search_all_experiments=True, output_format="list")) == runs_before  # no run

    chosen = ["pixelate", "brightness_down"]
    outcome = run_robustness(
        RobustnessOptions(model="medzoo-bloodmnist@champion", corruptions=chosen, max_images=24), progress=False
    )
    run = mlflow.get_run(outcome.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["kind"] == "robustness"
    assert run.data.tags["source_run"] == run_id and run.data.tags["model_version"] == "1"
    assert set(outcome.scores) == set(chosen) and all(len(v) == 5 for v in outcome.scores.values())
    history = client.get_metric_history(outcome.run_id, "bacc_brightness_down")
    assert [m.step for m in history] == [1, 2, 3, 4, 5]
    assert [m.value for m in history] == pytest.approx(outcome.scores["brightness_down"])
    summary = outcome.summary
    assert summary["images"] == 24 and summary["worst_corruption"] in chosen
    assert summary["corrupted_balanced_acc"] == pytest.approx(np.mean([np.mean(v) for v in outcome.scores.values()]))
    assert run.data.metrics["rbe"] == pytest.approx(summary["rbe"])
    artifacts = {a.path for a in client.list_artifacts(outcome.run_id)} | {
        a.path for a in client.list_artifacts(outcome.run_id, "plots")
    }
    assert {"robustness.json", "plots/robustness.png"} <= artifacts

    version = client.get_model_version("medzoo-bloodmnist", "1")
    assert json.loads(version.tags[ROBUSTNESS_TAG])["run_id"] == outcome.run_id
    assert f"Measured by run `{outcome.run_id}`" in version.description
    assert "## Robustness (MedMNIST-C corruptions)" in version.description


def test_the_corrupted_copy_changes_every_image_once_and_repeats_with_the_seed():
    images = np.repeat(grey_images(12), 3, axis=1)
    copy = corruptions.corrupted_copy(images, "bloodmnist", seed=1)
    assert copy.shape == images.shape and copy.dtype == np.uint8
    assert all(not np.array_equal(a, b) for a, b in zip(copy, images))
    assert np.array_equal(copy, corruptions.corrupted_copy(images, "bloodmnist", seed=1))


@pytest.mark.parametrize(
    "values, message",
    [
        ({"corruption_augment": 1.5}, r"corruption_augment=1.5 must be in \[0, 1\]"),
        ({"corruption_augment": 0.5, "dataset": "mnist"}, "MedMNIST-C defines no corruptions for 'mnist'"),
    ],
)
def test_bad_corruption_augment_values_fail_before_training(values, message):
    from training.core.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        shrunk(**values).validate()


@pytest.mark.slow
def test_corruption_augment_trains_on_the_corrupted_copy(synthetic_env):
    """Same seed, same batches: only the images drawn from the corrupted copy differ, so the weights do."""
    import torch

    from training.core.config import resolve
    from training.workflows.network import build_model, fit_options, load

    weights = []
    for share in (0.0, 1.0):
        run = resolve(shrunk(dataset="breastmnist", epochs=1, corruption_augment=share, ema=0.0))
        dataset = load(run)
        assert (dataset.train.corrupted is not None) == (share > 0)
        model, _ = build_model(run.config, dataset)
        from training.core.engine import fit

        fit(model, dataset.train, dataset.val, dataset.class_names, fit_options(run, model), progress=False)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.allclose(weights[0], weights[1])
