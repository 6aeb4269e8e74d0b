"""Classical estimators on CNN features: tracked runs, one ONNX graph, registered and served like a network."""

import io
import json
import subprocess
import sys

import httpx
import mlflow
import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from tests.helpers.net import bentoml_server
from tests.helpers.runs import project_env, shrunk, store_with_synthetic_data
from training.cli import main as cli_main
from training.core.data import load_dataset
from training.core.devices import to_input
from training.core.features import extract, rebuild_network, without_classifier
from training.export import compose
from training.export.onnx import export_onnx, export_run, load_logged_model
from training.export.register import register_best
from training.workflows.classical import ClassicalConfig, estimator_pipeline, load_grid, run_classical
from training.workflows.train import run_training

DATASET = "breastmnist"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, synthetic_data_dir):
    """A tiny CNN on synthetic BreastMNIST (with test-time views), and an SVM and a forest on its features."""
    root = tmp_path_factory.mktemp("classical")
    with store_with_synthetic_data(root, synthetic_data_dir) as uri:
        cnn = run_training(shrunk(dataset=DATASET, epochs=2), progress=False)
        found = {"cnn": cnn.run_id, "uri": uri, "root": root, "data": synthetic_data_dir}
        for model in ("svm", "rf"):
            found[model] = run_classical(ClassicalConfig(dataset=DATASET, features=cnn.run_id, model=model))
        yield found


def assert_refused_before_any_run(argv: list[str], message: str, capsys) -> None:
    """The CLI exits 2 with ``message`` and the store holds no more runs than before."""
    before = len(mlflow.search_runs(search_all_experiments=True))
    assert cli_main(argv) == 2
    assert message in capsys.readouterr().err
    assert len(mlflow.search_runs(search_all_experiments=True)) == before


def artifacts(run_id: str, path: str = "") -> set[str]:
    return {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, path)}


@pytest.mark.slow
def test_estimators_on_cnn_features_are_tracked_like_training_runs(runs):
    for model in ("svm", "rf"):
        outcome = runs[model]
        run = mlflow.get_run(outcome.run_id)
        assert run.info.status == "FINISHED"
        metrics = run.data.metrics
        for key in ("best_val_acc", "best_val_auc", "test_acc", "test_auc", "cv_acc"):
            assert 0 <= metrics[key] <= 1, key
        assert {k for k in metrics if k.startswith("test_recall_")} == {
            "test_recall_malignant",
            "test_recall_normal__benign",
        }
        assert metrics["best_val_acc"] > 0.6, "features of a trained net should separate the synthetic classes"
        assert run.data.tags["features"] == runs["cnn"] and run.data.params["feature_source"] == "resnet9"
        # The grid search: one CV row per grid point, the chosen values as params.
        grid = load_grid(model)
        table = json.loads(mlflow.artifacts.load_text(f"runs:/{outcome.run_id}/cv_results.json"))
        assert len(table["data"]) == int(np.prod([len(v) for v in grid.values()]))
        for name, value in outcome.best_params.items():
            assert run.data.params[f"best.{name}"] == str(value)
        plots = artifacts(outcome.run_id, "plots")
        assert {"plots/confusion_matrix_val.png", "plots/confusion_matrix_test.png", "plots/pca_features.png"} <= plots
        assert ("plots/decision_regions_pca.png" in plots) == (model == "rf")


@pytest.mark.slow
def test_features_come_from_the_trained_network_without_its_classifier(runs):
    logged, card = load_logged_model(runs["cnn"])
    network = rebuild_network(logged, card)
    images = load_dataset(DATASET).val.images[:16]
    x = to_input(images)
    with torch.no_grad():
        features = without_classifier(network)(x)
        assert torch.allclose(network.backbone.head(features), network(x), atol=1e-5)
    assert features.shape == (16, 8 * 8)  # ResNet-9 width 8: 8x the width before the classifier


@pytest.mark.slow
def test_one_onnx_graph_of_features_and_svm_matches_the_python_path(runs):
    logged, card = load_logged_model(runs["cnn"])
    extractor = without_classifier(rebuild_network(logged, card))
    data = load_dataset(DATASET)
    train = extract(extractor, data.train.images)
    svm = estimator_pipeline("svm", seed=0).fit(train, data.train.labels.numpy())
    graph = export_onnx(extractor, 28, 1, {}, output_name=compose.FEATURES)
    chained = compose.chain(graph, compose.sklearn_graph(svm, train.shape[1], compose.opset_of(graph)), {})
    pixels = to_input(data.test.images[:32]).numpy()
    logits = ort.InferenceSession(chained.SerializeToString()).run(None, {"pixels": pixels})[0]
    python_path = svm.predict_proba(extract(extractor, data.test.images[:32]))
    assert np.abs(np.exp(logits) - python_path).max() <= 1e-4
    assert (logits.argmax(1) == python_path.argmax(1)).all()

    # The logged graph of the SVM run: pixels in, log-probabilities out, equal to the Python path.
    result = export_run(runs["svm"].run_id)
    assert result.parity.ok and result.parity.quantity == "probability"
    assert [i.name for i in result.proto.graph.input] == ["pixels"]
    assert [o.name for o in result.proto.graph.output] == ["logits"]
    session = ort.InferenceSession(result.proto.SerializeToString())
    onnx_probs = torch.from_numpy(session.run(None, {"pixels": pixels})[0]).softmax(1).numpy()
    assert np.allclose(onnx_probs.sum(1), 1, atol=1e-5)
    meta = {p.key: p.value for p in result.proto.metadata_props}
    assert meta["architecture"] == "svm(resnet9)" and json.loads(meta["class_names"]) == list(card.class_names)


@pytest.mark.e2e
@pytest.mark.slow
def test_register_takes_the_classical_run_when_it_is_best_on_validation(runs):
    mlflow.MlflowClient().log_metric(runs["svm"].run_id, "best_val_acc", 1.0)  # known best on validation
    result = register_best(DATASET, "acc")
    assert result.run_id == runs["svm"].run_id and result.promoted
    version = mlflow.MlflowClient().get_model_version(result.name, result.version)
    assert version.tags["architecture"] == "svm(resnet9)" and "max |probability difference|" in version.tags["parity"]


def assert_the_champion_is_served_like_offline(runs, tmp_path, architecture: str) -> None:
    """Deploy and serve as users do (CLI, real `bentoml serve`), in a BentoML store of the test's own."""
    local = mlflow.artifacts.download_artifacts(f"models:/medzoo-{DATASET}@champion", dst_path=str(tmp_path / "c"))
    offline = ort.InferenceSession(f"{local}/model.onnx")
    images = load_dataset(DATASET).test.images[:4]
    expected = torch.from_numpy(offline.run(None, {"pixels": to_input(images).numpy()})[0]).softmax(1).numpy()
    env = project_env(MLFLOW_TRACKING_URI=runs["uri"], BENTOML_HOME=str(tmp_path / "bentoml"), MEDZOO_WORKERS="1")
    deployed = subprocess.run(
        [sys.executable, "-m", "training.cli", "deploy", "--datasets", DATASET], env=env, capture_output=True, text=True
    )
    assert deployed.returncode == 0, deployed.stderr[-3000:]
    with bentoml_server(env) as (base, _):
        for image, probs in zip(images, expected):
            buffer = io.BytesIO()
            Image.fromarray(image.numpy()[0]).save(buffer, format="PNG")
            body = httpx.post(
                f"{base}/classify",
                files={"image": ("b.png", buffer.getvalue(), "image/png")},
                data={"task": DATASET},
                timeout=30,
            ).json()
            assert body["class_index"] == int(probs.argmax())
            assert body["confidence"] == pytest.approx(float(probs.max()), abs=1e-5)
            assert body["model"]["architecture"] == architecture


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "xgboost"], "model='xgboost' is not one of: svm, rf, dt, knn, logreg"),
        (["--features", "0123456789abcdef"], "features='0123456789abcdef': no such run"),
        (["--dataset", "bloodmnist", "--features", "CNN"], "is a run on 'breastmnist', not on dataset 'bloodmnist'"),
        (["--grid-file", "GRID", "--model", "svm"], "svm has no parameter 'degre'; allowed: C, break_ties"),
        (["--cv", "1"], "cv=1 must be >= 2"),
    ],
)
def test_bad_classical_input_names_the_value_and_creates_no_run(argv, message, runs, tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text("svm: {degre: [2, 3]}\n")
    argv = [str(grid) if a == "GRID" else runs["cnn"] if a == "CNN" else a for a in argv]
    assert_refused_before_any_run(["classical", "--dataset", DATASET, *argv], message, capsys)


# --- ensembles ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ensemble(runs):
    from training.workflows.ensemble import EnsembleConfig, run_ensemble

    return run_ensemble(EnsembleConfig(runs=[runs["cnn"], runs["svm"].run_id, runs["rf"].run_id]))


def member_probabilities(run_ids: list[str], split: str) -> list[np.ndarray]:
    from training.export.onnx import onnx_probabilities

    images = to_input(load_dataset(DATASET).split(split).images).numpy()
    return [onnx_probabilities(export_run(r).proto, images) for r in run_ids]


@pytest.mark.slow
def test_ensemble_weights_are_chosen_on_validation_alone(runs, ensemble):
    from training.workflows.ensemble import validation_weights

    run = mlflow.get_run(ensemble.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["kind"] == "ensemble"
    members = [runs["cnn"], runs["svm"].run_id, runs["rf"].run_id]
    labels = load_dataset(DATASET).val.labels.numpy()
    expected = validation_weights(member_probabilities(members, "val"), labels)
    assert ensemble.weights == pytest.approx(expected, abs=1e-6) and sum(ensemble.weights) == pytest.approx(1)
    assert run.data.params["chosen_weights"] == ",".join(f"{w:.4f}" for w in expected)
    for key in ("best_val_acc", "best_val_auc", "test_acc", "test_auc", "member0_val_acc", "member2_test_acc"):
        assert 0 <= run.data.metrics[key] <= 1, key
    assert "plots/members.png" in artifacts(ensemble.run_id, "plots")


def test_auto_weights_fall_back_to_equal_where_the_log_loss_optimum_classifies_validation_worse():
    from training.workflows.ensemble import log_loss_weights, validation_weights

    labels = np.array([0, 0, 0, 1])
    # A is confident and wrong on one image; B is right on all four but never confident
    a = np.array([[0.99, 0.01], [0.99, 0.01], [0.99, 0.01], [0.6, 0.4]])
    b = np.array([[0.55, 0.45], [0.55, 0.45], [0.55, 0.45], [0.45, 0.55]])
    fitted = log_loss_weights([a, b], labels)
    assert fitted[0] > 0.5  # the log-loss optimum leans on the confident member...
    fused = fitted[0] * a + fitted[1] * b
    assert (fused.argmax(1) == labels).mean() == 0.75  # ...which misclassifies the last image; equal weights do not
    assert validation_weights([a, b], labels) == [0.5, 0.5]
    # where the optimum classifies more of the validation split right, it is kept
    c = np.array([[0.9, 0.1], [0.9, 0.1], [0.9, 0.1], [0.1, 0.9]])
    d = np.array([[0.05, 0.95], [0.05, 0.95], [0.05, 0.95], [0.95, 0.05]])
    assert validation_weights([c, d], labels) == pytest.approx(log_loss_weights([c, d], labels))
    assert validation_weights([c, d], labels)[0] > 0.9


@pytest.mark.slow
def test_the_ensemble_graph_averages_its_members_like_the_python_path(runs, ensemble):
    result = export_run(ensemble.run_id)
    assert result.parity.ok and result.parity.quantity == "probability"
    members = [runs["cnn"], runs["svm"].run_id, runs["rf"].run_id]
    expected = sum(w * p for w, p in zip(ensemble.weights, member_probabilities(members, "test")))
    pixels = to_input(load_dataset(DATASET).test.images).numpy()
    logits = ort.InferenceSession(result.proto.SerializeToString()).run(None, {"pixels": pixels})[0]
    # The graph's output is the log of the average divided by the temperature calibrated on validation.
    temperature = mlflow.get_run(ensemble.run_id).data.metrics["temperature"]
    assert result.card.temperature == pytest.approx(temperature)
    assert np.abs(logits * temperature - np.log(np.maximum(expected, 1e-12))).max() <= 1e-3
    assert (logits.argmax(1) == expected.argmax(1)).all()
    assert mlflow.get_run(ensemble.run_id).data.metrics["test_acc"] == pytest.approx(
        float((expected.argmax(1) == load_dataset(DATASET).test.labels.numpy()).mean())
    )


@pytest.mark.e2e
@pytest.mark.slow
def test_register_takes_the_ensemble_when_it_is_best_on_validation_and_serves_it(runs, ensemble, tmp_path):
    client = mlflow.MlflowClient()
    for run_id in (runs["cnn"], runs["svm"].run_id, runs["rf"].run_id):  # known validation scores
        client.log_metric(run_id, "best_val_auc", 0.9)
    client.log_metric(ensemble.run_id, "best_val_auc", 0.99)
    # force: the champion's recorded score (from its own registration) is not what this test controls
    result = register_best(DATASET, "auc", force=True)
    assert result.run_id == ensemble.run_id and result.created and result.promoted, result.message
    champion = mlflow.MlflowClient().get_model_version_by_alias(f"medzoo-{DATASET}", "champion")
    assert champion.tags["source_run"] == ensemble.run_id
    assert_the_champion_is_served_like_offline(runs, tmp_path, "ensemble(resnet9 + svm(resnet9) + rf(resnet9))")


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--runs", "CNN"], "give two or more different run ids"),
        (["--runs", "CNN,0123456789abcdef"], "runs: run_id='0123456789abcdef' does not exist"),
        (["--runs", "CNN,SVM", "--weights", "0.5,0.25,0.25"], "gives 3 weights for 2 runs"),
        (["--runs", "CNN,SVM", "--weights", "0.5,0.6"], "must be >= 0 and sum to 1 (they sum to 1.1)"),
        (["--runs", "CNN,BLOOD"], "runs of different datasets cannot be combined"),
    ],
)
def test_bad_ensemble_input_names_the_value_and_creates_no_run(argv, message, runs, blood_run, capsys):
    names = {"CNN": runs["cnn"], "SVM": runs["svm"].run_id, "BLOOD": blood_run}
    argv = [",".join(names.get(part, part) for part in a.split(",")) for a in argv]
    assert_refused_before_any_run(["ensemble", *argv], message, capsys)


@pytest.fixture(scope="module")
def blood_run(runs):
    return run_training(shrunk(dataset="bloodmnist", epochs=1, tta="none"), progress=False).run_id


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(model="xgboost"), "model='xgboost' is not one of: svm, rf, dt, knn, logreg"),
        (dict(cv=1), "cv=1 must be >= 2"),
        (dict(dataset="bloodmnst"), "Unknown dataset 'bloodmnst'. Did you mean bloodmnist"),
        (dict(model="svm", grid_file="configs/nowhere.yaml"), "nowhere.yaml"),
    ],
)
def test_classical_values_are_checked_before_any_run_exists(values, message, mlflow_store):
    from training.workflows.classical import ClassicalError

    with pytest.raises(ClassicalError, match=message.replace("(", r"\(").replace(".", r"\.")):
        run_classical(ClassicalConfig(**values))
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []
