"""A zoo leaderboard: train chosen models on chosen datasets with one fixed budget, compare, plot.

    mlflow run . -e benchmark --env-manager local -P datasets=breastmnist,bloodmnist -P models=mlp,cnn,resnet18
    python -m training.cli leaderboard --datasets breastmnist --models mlp,cnn --epochs 3

Every training is a nested run of one parent run, which logs the leaderboard (Markdown and CSV) and a plot
of test accuracy against training time per dataset, beside the MedMNIST v2 ResNet-18 (28 px) references.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Callable

import mlflow
from tqdm.auto import tqdm

from training.core.config import ConfigError, TrainConfig
from training.core.options import option
from training.core.plots import plt
from training.tracking import lifecycle, records
from training.workflows.train import run_training

# Test ACC of ResNet-18 (28) in MedMNIST v2 (Yang et al., Scientific Data 2023, Table 3).
RESNET18_28_ACC = {
    "pathmnist": 0.907,
    "dermamnist": 0.735,
    "octmnist": 0.743,
    "pneumoniamnist": 0.854,
    "retinamnist": 0.524,
    "breastmnist": 0.863,
    "bloodmnist": 0.958,
    "tissuemnist": 0.681,
    "organamnist": 0.935,
    "organcmnist": 0.900,
    "organsmnist": 0.782,
}
COLUMNS = (
    "model",
    "dataset",
    "best_val_acc",
    "best_val_auc",
    "test_acc",
    "test_auc",
    "n_params",
    "train_time",
    "train_images_per_sec",
    "run_id",
)


@dataclass
class LeaderboardOptions:
    models: list = option(["mlp", "cnn", "resnet18"], "comma-separated zoo models")
    datasets: list = option(["breastmnist", "bloodmnist"], "comma-separated datasets")


def leaderboard_rows(runs: list[tuple[str, str, str]]) -> list[dict]:
    rows = []
    for model, dataset, run_id in runs:
        metrics = mlflow.get_run(run_id).data.metrics
        rows.append(
            {
                "model": model,
                "dataset": dataset,
                "run_id": run_id,
                **{k: metrics.get(k, float("nan")) for k in COLUMNS if k not in ("model", "dataset", "run_id")},
            }
        )
    return sorted(rows, key=lambda r: (r["dataset"], -r["best_val_acc"]))


def to_markdown(rows: list[dict]) -> str:
    lines = [
        "| dataset | model | val ACC | val AUC | test ACC | test AUC | ResNet-18 (28) test ACC | params | "
        "train time (s) | images/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        reference = RESNET18_28_ACC.get(r["dataset"])
        lines.append(
            f"| {r['dataset']} | {r['model']} | {r['best_val_acc']:.4f} | {r['best_val_auc']:.4f} | "
            f"{r['test_acc']:.4f} | {r['test_auc']:.4f} | {f'{reference:.3f}' if reference else '-'} | "
            f"{int(r['n_params']):,} | {r['train_time']:.2f} | {r['train_images_per_sec']:.0f} |"
        )
    return "\n".join(lines) + "\n\nRows are ordered by validation accuracy within each dataset.\n"


def to_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def accuracy_vs_time_figure(rows: list[dict]):
    datasets = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4.5), squeeze=False)
    for ax, dataset in zip(axes.flat, datasets):
        subset = [r for r in rows if r["dataset"] == dataset]
        for r in subset:
            ax.scatter(r["train_time"], r["test_acc"], s=40)
            ax.annotate(r["model"], (r["train_time"], r["test_acc"]), textcoords="offset points", xytext=(5, 4))
        if dataset in RESNET18_28_ACC:
            ax.axhline(
                RESNET18_28_ACC[dataset],
                color="crimson",
                linestyle="--",
                label=f"MedMNIST v2 ResNet-18 (28): {RESNET18_28_ACC[dataset]:.3f}",
            )
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("training time (s, log scale)")
        ax.set_ylabel("test accuracy")
        ax.set_title(dataset)
        ax.grid(alpha=0.3)
    fig.suptitle("MedZoo leaderboard: accuracy against training time")
    fig.tight_layout()
    return fig


def run_leaderboard(
    models: list[str], datasets: list[str], make_config: Callable[[str, str], TrainConfig], progress: bool = True
) -> tuple[str, list[dict]]:
    """``make_config(model, dataset)`` gives each training's configuration (one recipe for all of them)."""
    if not models or not datasets:
        raise ConfigError("models and datasets must each name at least one entry.")
    configs = [make_config(model, dataset).validate() for dataset in datasets for model in models]
    base = configs[0]
    with lifecycle.tracked_run(
        "leaderboard",
        {"leaderboard": "true", "models": ",".join(models), "datasets": ",".join(datasets)},
        experiment="leaderboard",
    ) as parent:
        records.log_new_params(
            {
                "models": ",".join(models),
                "datasets": ",".join(datasets),
                **{k: v for k, v in base.to_params().items() if k not in ("model", "dataset")},
            }
        )
        finished = []
        for config in tqdm(configs, desc="leaderboard", unit="run", disable=not progress):
            outcome = run_training(config, nested=True, progress=False, extra_tags={"leaderboard": parent.info.run_id})
            finished.append((config.model, config.dataset, outcome.run_id))
        rows = leaderboard_rows(finished)
        mlflow.log_text(to_markdown(rows), "leaderboard.md")
        mlflow.log_text(to_csv(rows), "leaderboard.csv")
        records.log_figure(accuracy_vs_time_figure(rows), "plots/accuracy_vs_train_time.png")
        return parent.info.run_id, rows
