"""Classical estimators on CNN features: tracked runs, one ONNX graph, registered and served like a network."""

import importlib
import io
import json

import mlflow
import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from tests.conftest import shrunk, store_with_synthetic_data
from training import onnx_compose
from training.classical import ClassicalConfig, estimator_pipeline, load_grid, run_classical
from training.cli import main as cli_main
from training.data import load_dataset
from training.engine import to_input
from training.export import export_onnx, export_run, load_logged_model
from training.features import extract, rebuild_network, without_classifier
from training.register import register_best
from training.train import run_training

pytestmark = pytest.mark.slow
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


def artifacts(run_id: str, path: str = "") -> set[str]:
    return {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, path)}


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


def test_features_come_from_the_trained_network_without_its_classifier(runs):
    logged, card = load_logged_model(runs["cnn"])
    network = rebuild_network(logged, card)
    images = load_dataset(DATASET).val.images[:16]
    x = to_input(images)
    with torch.no_grad():
        features = without_classifier(network)(x)
        assert torch.allclose(network.backbone.head(features), network(x), atol=1e-5)
    assert features.shape == (16, 8 * 8)  # ResNet-9 width 8: 8x the width before the classifier


def test_one_onnx_graph_of_features_and_svm_matches_the_python_path(runs):
    logged, card = load_logged_model(runs["cnn"])
    extractor = without_classifier(rebuild_network(logged, card))
    data = load_dataset(DATASET)
    train = extract(extractor, data.train.images)
    svm = estimator_pipeline("svm", seed=0).fit(train, data.train.labels.numpy())
    graph = export_onnx(extractor, 28, 1, {}, output_name=onnx_compose.FEATURES)
    chained = onnx_compose.chain(
        graph, onnx_compose.sklearn_graph(svm, train.shape[1], onnx_compose.opset_of(graph)), {}
    )
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


def test_register_takes_the_classical_run_when_it_is_best_on_validation_and_serves_it(runs):
    from starlette.testclient import TestClient

    mlflow.MlflowClient().log_metric(runs["svm"].run_id, "best_val_acc", 1.0)  # known best on validation
    result = register_best(DATASET, "acc")
    assert result.run_id == runs["svm"].run_id and result.promoted
    from serving.deploy import deploy

    deploy([DATASET])
    local = mlflow.artifacts.download_artifacts(f"models:/medzoo-{DATASET}@champion", dst_path=str(runs["root"] / "c"))
    offline = ort.InferenceSession(f"{local}/model.onnx")
    service = importlib.reload(importlib.import_module("serving.service"))
    images = load_dataset(DATASET).test.images[:4]
    expected = torch.from_numpy(offline.run(None, {"pixels": to_input(images).numpy()})[0]).softmax(1).numpy()
    with TestClient(service.MedZoo.to_asgi()) as client:
        for image, probs in zip(images, expected):
            buffer = io.BytesIO()
            Image.fromarray(image.numpy()[0]).save(buffer, format="PNG")
            body = client.post(
                "/classify", files={"image": ("b.png", buffer.getvalue(), "image/png")}, data={"task": DATASET}
            ).json()
            assert body["class_index"] == int(probs.argmax())
            assert body["confidence"] == pytest.approx(float(probs.max()), abs=1e-5)
            assert body["model"]["architecture"] == "svm(resnet9)"


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
    before = len(mlflow.search_runs(search_all_experiments=True))
    assert cli_main(["classical", "--dataset", DATASET, *argv]) == 2
    assert message in capsys.readouterr().err
    assert len(mlflow.search_runs(search_all_experiments=True)) == before
