"""Studies: a YAML file becomes a parent run with nested runs and a reported-vs-measured report."""

import io
import json

import mlflow
import pandas as pd
import pytest
import yaml

from tests.helpers.runs import store_with_synthetic_data
from training.cli import main as cli_main
from training.tracking.lifecycle import EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT
from training.workflows.study.report import top_confusions
from training.workflows.study.run import run_study
from training.workflows.study.spec import STUDIES_DIR, StudyError, StudyOptions, load_study, study_names

SHIPPED = ["blood-transfer-learning", "breast-blood-classical-hybrid", "fashion-fcn-alexnet"]
SHIPPED += ["mnist-fashion-cnn-mlp", "organamnist-architectures"]

# A study with every kind of entry, shrunk to seconds: a network, a varied network, an SVM on its features, a
# fixed-weight fusion, and a reported figure.
TINY = {
    "title": "tiny study",
    "source": "a test",
    "datasets": ["breastmnist"],
    "defaults": {"recipe": "none", "optimizer": "adam", "lr": 0.01, "batch_size": 16, "select_metric": "acc"},
    "budgets": {"quick": {"max_train_samples": 64, "max_epochs": 2}, "full": {}},
    "plots": ["bar", "learning_curves", "confusion_matrices", "curves", "confusions"],
    "runs": [
        {"name": "cnn", "train": {"model": "cnn", "model.filters": "8,16", "epochs": 5}, "reported": 0.853},
        {"name": "cnn-lr", "train": {"model": "cnn", "model.filters": "8,16"}, "vary": {"lr": [0.03, 0.003]}},
        {"name": "cnn-svm", "classical": {"features": "cnn", "model": "svm"}},
        {"name": "fusion", "ensemble": {"members": ["cnn", "cnn-svm"], "weights": "0.3,0.7"}},
        {"name": "mlp-full-only", "train": {"model": "mlp"}, "budgets": ["full"]},
    ],
}


def write_study(tmp_path, document, name="tiny") -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return str(path)


def options(name: str, **overrides) -> StudyOptions:
    return StudyOptions(name=name, **{"seeds": [0], **overrides})


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("budget", ["quick", "full"])
def test_every_shipped_study_file_validates(name, budget):
    study = load_study(StudyOptions(name=name, budget=budget), probe_weights=False)
    assert study.configurations and study.title
    assert any(c.reported for c in study.configurations) or study.unreported_because
    ours = [c for c in study.configurations if c.entry == "ours"]
    assert {c.dataset for c in ours} == set(study.datasets) and len(ours) == len(study.datasets) * 3
    if budget == "quick":  # minutes on 2 cores: every run capped
        assert all(
            c.train.epochs <= 4 and 0 < c.train.max_train_samples <= 3000 for c in study.configurations if c.train
        )


def test_the_shipped_studies_are_the_five_of_the_design():
    assert study_names() == sorted(SHIPPED)
    assert sorted(p.stem for p in STUDIES_DIR.iterdir()) == sorted(SHIPPED)


def broken(change) -> dict:
    document = json.loads(json.dumps(TINY))
    change(document)
    return document


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d["runs"][0]["train"].update(model="resnet1000"), "resnet1000"),
        (lambda d: d["runs"][0]["train"].update(epochz=3), "'epochz' is not a training parameter"),
        (lambda d: d["runs"][0]["train"].update({"model.filterz": 8}), "filterz"),
        (lambda d: d["defaults"].update(recipe="fastest"), "recipe='fastest' is not one of"),
        (lambda d: d["runs"][0].pop("reported"), "no run gives the figure the original study reported"),
        (lambda d: d["runs"][0].update(reported=85.3), "must be a test accuracy in (0, 1]"),
        (lambda d: d["runs"][2]["classical"].update(features="resnet"), "'resnet' is not an earlier run"),
        (lambda d: d["runs"][2]["classical"].update(features="cnn-lr"), "varies a parameter"),
        (lambda d: d["runs"][2]["classical"].update(model="xgboost"), "model='xgboost' is not one of: svm"),
        (lambda d: d["runs"][3]["ensemble"].update(weights="0.5,0.6"), "sum to 1"),
        (lambda d: d["runs"][3]["ensemble"].update(members=["cnn", "fusion"]), "'fusion' is not an earlier run"),
        (lambda d: d["runs"][0].update(sweep=True), "unknown key 'sweep'"),
        (lambda d: d.update(datasets=["cifar10"]), "cifar10"),
        (lambda d: d["budgets"].pop("full"), "give both budgets"),
        (lambda d: d.update(plots=["pie"]), "'pie' is not one of"),
        (lambda d: d["runs"].append({"name": "cnn", "train": {"model": "cnn"}}), "used twice"),
    ],
)
def test_a_bad_study_file_fails_before_any_run_naming_the_problem(change, message, tmp_path, mlflow_store, capsys):
    path = write_study(tmp_path, broken(change))
    with pytest.raises(StudyError, match=None) as err:
        load_study(options(path), probe_weights=False)
    assert message in str(err.value) and path in str(err.value)
    assert cli_main(["study", "--name", path, "--seeds", "0"]) == 2
    assert message in capsys.readouterr().err
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_unknown_study_name_lists_the_studies(mlflow_store, capsys):
    assert cli_main(["study", "--name", "organ-study"]) == 2
    err = capsys.readouterr().err
    assert "name='organ-study' is not a study" in err and "organamnist-architectures" in err


def test_unavailable_pretrained_weights_train_from_scratch_and_say_so(tmp_path):
    document = broken(lambda d: d["runs"][0]["train"].update(model="mobilenetv2", pretrained="/nowhere/w.pth"))
    document["runs"][0]["train"].pop("model.filters")
    document["runs"] = document["runs"][:1]
    study = load_study(options(write_study(tmp_path, document)))
    (config, *_) = study.configurations
    assert config.train.pretrained == "false" and config.train.freeze == "none"
    assert "trained from scratch" in config.notes[0] and "/nowhere/w.pth" in config.notes[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, synthetic_data_dir):
    root = tmp_path_factory.mktemp("study")
    with store_with_synthetic_data(root, synthetic_data_dir):
        path = write_study(root, TINY)
        outcome = run_study(options(path, seeds=[0, 1]), progress=False)
        yield outcome


@pytest.mark.slow
def test_a_study_is_one_parent_with_a_nested_run_per_configuration_and_seed(tiny):
    client = mlflow.MlflowClient()
    parent = client.get_run(tiny.run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "study-tiny"
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.name == "study-tiny" and experiment.tags[EXPERIMENT_KIND_TAG] == TRAINING_EXPERIMENT
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{tiny.run_id}'", max_results=100
    )
    # cnn, cnn-lr x2, cnn-svm, fusion, ours; two seeds; the full-budget-only entry is not run
    assert len(children) == 12 and {c.info.status for c in children} == {"FINISHED"}
    names = {c.info.run_name for c in children}
    assert names == {"cnn-breastmnist", "svm-breastmnist", "ensemble-breastmnist", "resnet9-breastmnist"}
    configs = {(c.data.tags["study_config"], c.data.tags["study_seed"]) for c in children}
    assert ("cnn-lr lr=0.03", "1") in configs and ("ours: recipe quick", "0") in configs
    by_config = {(c.data.tags["study_config"], c.data.tags["study_seed"]): c for c in children}
    cnn = by_config[("cnn", "0")]
    assert cnn.data.params["epochs"] == "2" and cnn.data.params["max_train_samples"] == "64"  # quick budget caps
    fusion = by_config[("fusion", "1")]
    svm = by_config[("cnn-svm", "1")]
    assert fusion.data.params["runs"] == f"{by_config[('cnn', '1')].info.run_id},{svm.info.run_id}"
    assert fusion.data.params["chosen_weights"] == "0.3000,0.7000"
    assert svm.data.tags["features"] == by_config[("cnn", "1")].info.run_id  # the same seed's network


@pytest.mark.slow
def test_the_parent_reports_reported_vs_measured_with_its_plots(tiny):
    client = mlflow.MlflowClient()
    parent = tiny.run_id
    table = pd.read_csv(io.StringIO(mlflow.artifacts.load_text(f"runs:/{parent}/study.csv")))
    assert list(table["configuration"]) == [
        "cnn",
        "cnn-lr lr=0.03",
        "cnn-lr lr=0.003",
        "cnn-svm",
        "fusion",
        "ours: recipe quick",
    ]
    row = table.set_index("configuration").loc["cnn"]
    assert row["reported_test_acc"] == 0.853 and row["seeds"] == 2
    runs = [client.get_run(r) for r in row["run_ids"].split(",")]
    measured = [r.data.metrics["test_acc"] for r in runs]
    assert row["test_acc_mean"] == pytest.approx(sum(measured) / 2)
    assert row["minus_reported"] == pytest.approx(row["test_acc_mean"] - 0.853)
    ours = table.set_index("configuration").loc["ours: recipe quick"]
    assert row["ours_quick_test_acc"] == pytest.approx(ours["test_acc_mean"])

    markdown = mlflow.artifacts.load_text(f"runs:/{parent}/study.md")
    assert "| configuration | dataset | reported (original) | ours, same protocol | ours, recipe `quick`" in markdown
    assert f"| cnn | breastmnist | 0.8530 | {row['test_acc_mean']:.4f} ± " in markdown
    assert "quick budget" in markdown and "not run: mlp-full-only" in markdown
    assert "## Most common confusions" in markdown and "**cnn**:" in markdown
    assert markdown == tiny.report_markdown
    plots = {a.path for a in client.list_artifacts(parent, "plots")}
    assert plots == {f"plots/{p}.png" for p in ("bar", "learning_curves", "confusion_matrices", "curves")}
    assert "study/tiny.yaml" in {a.path for a in client.list_artifacts(parent, "study")}


def test_top_confusions_name_the_largest_off_diagonal_cells():
    import numpy as np

    names = ["a", "b", "c"]
    counts = np.array([[10, 4, 1], [0, 9, 0], [2, 0, 7]])
    assert top_confusions([(names, counts), (names, counts)], count=2) == ["a → b: 8 (26.7%)", "c → a: 4 (22.2%)"]


@pytest.mark.slow
def test_the_mnist_study_runs_on_synthetic_files_of_the_real_format(tmp_path, synthetic_data_dir, monkeypatch):
    """MNIST and Fashion-MNIST cannot be downloaded here: the shipped study runs on idx files of the same format."""
    with store_with_synthetic_data(tmp_path, synthetic_data_dir):
        outcome = run_study(options("mnist-fashion-cnn-mlp"), progress=False)
        table = pd.read_csv(io.StringIO(mlflow.artifacts.load_text(f"runs:/{outcome.run_id}/study.csv")))
    reported = table.set_index("configuration")["reported_test_acc"]
    assert reported["cnn @mnist"] == 0.99 and reported["mlp @fashionmnist"] == 0.87
    assert set(table["dataset"]) == {"mnist", "fashionmnist"} and len(table) == 10
    protocol = table[~table["configuration"].str.startswith("ours")]
    assert (protocol["test_acc_mean"] > 0.5).all()  # learnable synthetic classes; chance is 0.1


def test_a_study_can_run_on_some_of_its_datasets():
    study = load_study(
        StudyOptions(name="breast-blood-classical-hybrid", seeds=[0], datasets=["breastmnist"]), probe_weights=False
    )
    assert {c.dataset for c in study.configurations} == {"breastmnist"} and study.datasets == ["breastmnist"]
    assert "every run on bloodmnist (datasets=breastmnist)" in study.skipped
    with pytest.raises(StudyError, match="lung is not a dataset of this study; it has: breastmnist, bloodmnist"):
        load_study(StudyOptions(name="breast-blood-classical-hybrid", datasets=["lung"]), probe_weights=False)
