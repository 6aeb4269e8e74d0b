"""Selecting, exporting and registering champions in a temporary MLflow store."""

import json

import mlflow
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tests.helpers.runs import shrunk, store_with_synthetic_data
from training.export.onnx import ExportError, ParityError, check_parity, export_onnx, export_run, load_logged_model
from training.export.register import RegistrationError, candidate_runs, choose_best, register_best, register_run
from training.workflows import network
from training.workflows.train import run_training

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory, synthetic_data_dir):
    """Three tiny trained runs on synthetic BloodMNIST with known validation/test metrics."""
    with store_with_synthetic_data(tmp_path_factory.mktemp("registry"), synthetic_data_dir):
        client = mlflow.MlflowClient()
        runs = {}
        for label, model, kwargs in (
            ("small", "cnn", {"filters": "8,16", "hidden": 32}),
            ("large", "mlp", {"hidden": "64"}),
            ("runner_up", "cnn", {"filters": "8", "hidden": 16}),
        ):
            outcome = run_training(
                shrunk(model=model, epochs=1, model_kwargs=kwargs, tta="none"),
                progress=False,
            )
            runs[label] = outcome.run_id
        # Known metrics: small and large tie on validation, large is best on test (which must not matter).
        for label, val_auc, test_auc in (("small", 0.95, 0.70), ("large", 0.95, 0.99), ("runner_up", 0.90, 0.99)):
            client.log_metric(runs[label], "best_val_auc", val_auc)
            client.log_metric(runs[label], "test_auc", test_auc)
        yield runs


def registry_snapshot():
    client = mlflow.MlflowClient()
    return sorted(
        (
            m.name,
            sorted((v.version, v.tags.get("source_run")) for v in client.search_model_versions(f"name = '{m.name}'")),
            sorted(m.aliases),
        )
        for m in client.search_registered_models()
    )


def test_selection_uses_validation_metrics_and_prefers_smaller_models(store):
    runs = candidate_runs("bloodmnist")
    assert {r.info.run_id for r in runs} == set(store.values())
    assert choose_best(runs, "best_val_auc").info.run_id == store["small"]  # tie on val -> fewer params
    with pytest.raises(RegistrationError, match="no run logged .best_val_kappa.; the runs have: best_val_acc"):
        choose_best(runs, "best_val_kappa")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dataset="bloodmnst"), "Unknown dataset 'bloodmnst'. Did you mean bloodmnist"),
        (
            dict(dataset="pathmnist"),
            "no finished runs with a model for dataset 'pathmnist'; datasets with runs: bloodmnist",
        ),
        (dict(dataset="bloodmnist", metric="f1"), "metric='f1' is not one of: auc, acc"),
    ],
)
def test_bad_register_inputs_change_nothing(store, kwargs, message):
    before = registry_snapshot()
    with pytest.raises(RegistrationError, match=message):
        register_best(**kwargs)
    assert registry_snapshot() == before


def test_export_of_unknown_or_modelless_runs_is_a_clear_error(store):
    with pytest.raises(ExportError, match="run_id='0123456789abcdef' does not exist"):
        export_run("0123456789abcdef")
    with mlflow.start_run() as empty:
        pass
    with pytest.raises(ExportError, match=f"run {empty.info.run_id} logged no model"):
        export_run(empty.info.run_id)


def test_a_corrupted_export_fails_the_parity_check(store):
    model, _ = load_logged_model(store["small"])
    wrong = torch.nn.Sequential()
    wrong.add_module("shift", _Scale(1.05))  # a wrong normalisation in front of the real network
    wrong.add_module("net", model)
    proto = export_onnx(wrong, 28, 3, {"dataset": "bloodmnist"})
    images = np.random.default_rng(0).random((16, 3, 28, 28), dtype=np.float32)
    report = check_parity(proto, model, images)
    assert not report.ok and report.max_abs_diff > report.allowed
    # The tolerance grows with the logits' scale (1e-4 + 1e-5 x the largest |logit|), and only with it.
    assert report.allowed == pytest.approx(1e-4 + 1e-5 * report.max_abs_value) and report.max_abs_value > 0
    from training.export.onnx import require_parity

    with pytest.raises(ParityError, match=r"max \|logit difference\| .* \(allowed .*: 1e-04 \+ 1e-05 x the largest"):
        require_parity(proto, model, images)
    # A temperature below 1 divides the network's logits, and their kernels' differences, by it; above 1 it is no
    # excuse. The 5% error is still caught at the temperature of an underconfident net.
    sharpened = check_parity(proto, model, images, temperature=0.01)
    assert sharpened.allowed == pytest.approx(1e-2 + 1e-5 * report.max_abs_value) and not sharpened.ok
    assert check_parity(proto, model, images, temperature=4.0).allowed == report.allowed
    with pytest.raises(ParityError, match=r"\(allowed .*: 1e-04 / temperature 0.01 \+ 1e-05 x"):
        require_parity(proto, model, images, temperature=0.01)


class _Scale(torch.nn.Module):
    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def test_register_champion_gate_force_and_idempotence(store, synthetic_data_dir, monkeypatch):
    # Registering needs no dataset file: parity uses the validation images logged with the model.
    monkeypatch.setenv("MEDZOO_DATA_DIR", str(synthetic_data_dir / "absent"))
    client = mlflow.MlflowClient()
    first = register_best("bloodmnist")
    assert (first.version, first.run_id, first.promoted, first.created) == ("1", store["small"], True, True)
    version = client.get_model_version("medzoo-bloodmnist", "1")
    assert version.tags["source_run"] == store["small"] and version.tags["architecture"] == "cnn"
    assert version.tags["best_val_auc"] == "0.95" and version.tags["test_auc"] == "0.7"
    assert json.loads(version.tags["class_names"])[0] == "basophil"
    assert json.loads(version.tags["preprocessing"])["input_size"] == 28
    # The description is the model card: what it is for, the version, the command that trains it again.
    card = version.description
    assert "Not for diagnosis" in card and "version 1" in card and "ONNX parity vs PyTorch" in card
    assert "mlflow run . -e train --env-manager local" in card and "-P dataset=bloodmnist" in card
    assert "| train | " in card and "basophil" in card

    # The ONNX file: one self-contained graph with its metadata and a dynamic batch.
    local = mlflow.artifacts.download_artifacts("models:/medzoo-bloodmnist@champion")
    proto = onnx.load(f"{local}/model.onnx")
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["dataset"] == "bloodmnist" and props["source_run"] == store["small"]
    assert "model_version" not in props  # the registry version is never guessed into the file
    assert json.loads(props["class_names"])[7] == "platelet" and props["input_size"] == "28"
    assert props["in_chans"] == "3" and props["resize"] == "bilinear"
    onnx.checker.check_model(proto, full_check=True)
    session = ort.InferenceSession(proto.SerializeToString())
    assert isinstance(session.get_inputs()[0].shape[0], str)  # a symbolic, dynamic batch dimension
    five = np.random.default_rng(1).random((5, 3, 28, 28), dtype=np.float32)
    assert session.run(None, {session.get_inputs()[0].name: five})[0].shape == (5, 8)
    assert not any(str(f).endswith(".data") for f in __import__("pathlib").Path(local).iterdir())

    # Parity on real validation images, and the pyfunc of the champion predicts on a batch.
    pytorch_model, _ = load_logged_model(store["small"])
    from training.core.data import load_dataset

    images = load_dataset("bloodmnist", synthetic_data_dir).val.images[:32].float().numpy() / 255
    with torch.no_grad():
        expected = pytorch_model(torch.from_numpy(images)).numpy()
    pyfunc = mlflow.pyfunc.load_model("models:/medzoo-bloodmnist@champion")
    predicted = pyfunc.predict(images)["logits"]
    assert np.abs(predicted - expected).max() <= 1e-4
    assert (predicted.argmax(1) == expected.argmax(1)).all()

    again = register_best("bloodmnist")
    assert (again.version, again.created, again.promoted) == ("1", False, False)
    assert len(client.search_model_versions("name = 'medzoo-bloodmnist'")) == 1
    onnx_models = mlflow.search_logged_models(
        filter_string=f"source_run_id = '{store['small']}' AND name = 'onnx'", output_format="list"
    )
    assert len(onnx_models) == 1  # exporting again reuses the run's ONNX model

    # The champion's run is deleted: the next best is registered but does not beat the champion.
    client.delete_run(store["small"])
    client.delete_run(store["large"])
    held = register_best("bloodmnist")
    assert (held.version, held.run_id, held.promoted) == ("2", store["runner_up"], False)
    assert "champion stays v1" in held.message and "0.9000" in held.message
    assert str(client.get_model_version_by_alias("medzoo-bloodmnist", "champion").version) == "1"

    forced = register_best("bloodmnist", force=True)
    assert (forced.version, forced.created, forced.promoted) == ("2", False, True)
    assert str(client.get_model_version_by_alias("medzoo-bloodmnist", "champion").version) == "2"


def test_a_version_whose_card_cannot_be_built_never_becomes_champion(store, monkeypatch):
    """A run trained before cards (simulated: its card says nothing of the data) registers, but even ``force``
    does not crown it; the champion and its alias stay where they were."""
    monkeypatch.setattr(network, "card_data", lambda dataset: {})
    run_id = run_training(shrunk(model="cnn", epochs=1, model_kwargs={"filters": "8", "hidden": 8}, tta="none")).run_id
    client = mlflow.MlflowClient()
    champion = str(client.get_model_version_by_alias("medzoo-bloodmnist", "champion").version)
    result = register_run(mlflow.get_run(run_id), "bloodmnist", "best_val_auc", force=True)
    assert result.created and not result.promoted
    assert "champion not moved" in result.message and "data.splits.train" in result.message
    assert str(client.get_model_version_by_alias("medzoo-bloodmnist", "champion").version) == champion
    assert "No model card" in client.get_model_version("medzoo-bloodmnist", result.version).description


REGISTER_ONE = """
import sys, mlflow
from training.export.register import register_run
run = mlflow.get_run(sys.argv[1])
print(register_run(run, "bloodmnist", "best_val_auc", force=False).message)
"""


@pytest.mark.e2e
def test_concurrent_registrations_add_one_version_per_run_and_crown_the_better(tmp_path, synthetic_data_dir):
    import subprocess
    import sys

    from tests.helpers.paths import ROOT
    from tests.helpers.runs import project_env

    with store_with_synthetic_data(tmp_path, synthetic_data_dir) as uri:
        client = mlflow.MlflowClient()
        runs = {}
        for label, score in (("better", 0.97), ("worse", 0.91)):
            runs[label] = run_training(
                shrunk(model="cnn", epochs=1, model_kwargs={"filters": "8", "hidden": 8}, tta="none"), progress=False
            ).run_id
            client.log_metric(runs[label], "best_val_auc", score)
        env = project_env(PYTHONPATH=str(ROOT), MLFLOW_TRACKING_URI=uri)
        # all at the same moment, the better run twice (one version for it), the worse run last
        order = [runs["better"], runs["better"], runs["worse"]]
        workers = [
            subprocess.Popen(
                [sys.executable, "-c", REGISTER_ONE, run_id],
                env=env,
                cwd=tmp_path,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for run_id in order
        ]
        for worker in workers:
            _, stderr = worker.communicate(timeout=600)
            assert worker.returncode == 0, stderr[-3000:]
        versions = client.search_model_versions("name = 'medzoo-bloodmnist'")
        assert sorted(v.tags["source_run"] for v in versions) == sorted(runs.values())  # no duplicate
        champion = client.get_model_version_by_alias("medzoo-bloodmnist", "champion")
        assert champion.tags["source_run"] == runs["better"]


def test_onnx_probabilities_of_a_split_larger_than_one_call_match_one_pass(tmp_path):
    """A split is scored in bounded calls (whole OrganAMNIST splits at once ran out of memory), same numbers."""
    from training.export.onnx import ONNX_IMAGES_PER_CALL, onnx_probabilities

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(1 * 28 * 28, 5)).eval()
    path = tmp_path / "linear.onnx"
    example = torch.rand(2, 1, 28, 28)
    torch.onnx.export(
        model, (example,), str(path), dynamo=False, input_names=["pixels"], dynamic_axes={"pixels": {0: "n"}}
    )
    images = torch.rand(2 * ONNX_IMAGES_PER_CALL + 3, 1, 28, 28)
    probabilities = onnx_probabilities(onnx.load(str(path)), images.numpy())
    with torch.no_grad():
        expected = model(images).softmax(1).numpy()
    assert probabilities.shape == (len(images), 5)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
