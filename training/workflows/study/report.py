"""What a study's parent run shows: the reported-vs-measured table (``study.md``, ``study.csv``) and its plots.

Everything is read back from the nested runs (metrics, metric histories, the confusion-matrix counts each run
logs), so the report shows exactly what the runs recorded.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass

import mlflow
import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator
from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR

from training.core.plots import plt
from training.tracking import records
from training.workflows.study.spec import OURS, Configuration, Study

MAX_MATRICES = 12
TOP_CONFUSIONS = 3
TRAIN_SAMPLES = "max_train_samples"


@dataclass
class Row:
    label: str
    entry: str
    dataset: str
    kind: str
    model: str
    reported: float | None
    run_ids: list[str]
    metrics: list[dict]  # one per seed
    params: list[dict]
    varied: dict
    notes: list[str]

    def values(self, key: str) -> np.ndarray:
        return np.array([m.get(key, np.nan) for m in self.metrics], dtype=float)

    def mean(self, key: str) -> float:
        values = self.values(key)
        return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")

    def std(self, key: str) -> float:
        values = self.values(key)
        return float(np.nanstd(values)) if np.isfinite(values).sum() > 1 else float("nan")


def collect_rows(study: Study, run_ids: dict[tuple[str, int], str]) -> list[Row]:
    """One row per configuration label, its seeds' runs read back from the tracking store."""
    client = mlflow.MlflowClient()
    by_label: dict[str, list[Configuration]] = {}
    for config in study.configurations:
        by_label.setdefault(config.label, []).append(config)
    rows = []
    for label, configs in by_label.items():
        ids = [run_ids[(label, c.seed)] for c in configs]
        runs = [client.get_run(run_id) for run_id in ids]
        first = configs[0]
        rows.append(
            Row(
                label=label,
                entry=first.entry,
                dataset=first.dataset,
                kind=first.kind,
                model=first.model,
                reported=first.reported,
                run_ids=ids,
                metrics=[r.data.metrics for r in runs],
                params=[r.data.params for r in runs],
                varied=first.varied,
                notes=first.notes,
            )
        )
    return rows


def _ours_by_dataset(rows: list[Row]) -> dict[str, Row]:
    return {r.dataset: r for r in rows if r.entry == OURS}


def to_frame(study: Study, rows: list[Row]) -> pd.DataFrame:
    ours = _ours_by_dataset(rows)
    records = []
    for r in rows:
        best = ours.get(r.dataset)
        records.append(
            {
                "configuration": r.label,
                "dataset": r.dataset,
                "kind": r.kind,
                "model": r.model,
                "reported_test_acc": r.reported,
                "test_acc_mean": r.mean("test_acc"),
                "test_acc_std": r.std("test_acc"),
                "test_auc_mean": r.mean("test_auc"),
                "test_recall_mean": r.mean("test_recall"),
                "best_val_acc_mean": r.mean("best_val_acc"),
                f"ours_{study.ours_recipe}_test_acc": best.mean("test_acc") if best else float("nan"),
                "minus_reported": r.mean("test_acc") - r.reported if r.reported is not None else float("nan"),
                "train_time_s": r.mean("train_time"),
                "wall_time_s": r.mean("wall_time"),
                "n_params": r.mean("n_params"),
                "seeds": len(r.run_ids),
                "run_ids": ",".join(r.run_ids),
                "notes": "; ".join(r.notes),
            }
        )
    return pd.DataFrame.from_records(records)


def _score(row: Row, key: str = "test_acc") -> str:
    mean, std = row.mean(key), row.std(key)
    if not np.isfinite(mean):
        return "-"
    return f"{mean:.4f}" + (f" ± {std:.4f}" if np.isfinite(std) else "")


def to_markdown(study: Study, rows: list[Row]) -> str:
    ours = _ours_by_dataset(rows)
    seeds = len(study.seeds)
    lines = [
        f"# {study.title}",
        "",
        f"Study `{study.name}`, **{study.budget} budget**, {seeds} seed{'s' if seeds > 1 else ''} "
        f"({', '.join(map(str, study.seeds))}); test accuracy as mean ± std over the seeds. "
        f"Every configuration selected its weights on the validation split and read the test split once.",
    ]
    if study.source:
        lines += ["", f"Original study: {study.source}"]
    lines += [
        "",
        f"| configuration | dataset | reported (original) | ours, same protocol | ours, recipe `{study.ours_recipe}` "
        "| test AUC | test recall (macro) | train time (s) | params |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        best = ours.get(r.dataset)
        reported = f"{r.reported:.4f}" if r.reported is not None else "-"
        train_time = r.mean("train_time")
        params = r.mean("n_params")
        lines.append(
            f"| {r.label} | {r.dataset} | {reported} | {_score(r) if r.entry != OURS else '-'} | "
            f"{_score(best) if best else '-'} | {_score(r, 'test_auc')} | {_score(r, 'test_recall')} | "
            f"{f'{train_time:.1f}' if np.isfinite(train_time) else '-'} | "
            f"{f'{params:,.0f}' if np.isfinite(params) else '-'} |"
        )
    notes = [f"ours: our recipe `{study.ours_recipe}` on the same data, under the same budget."]
    if study.budget == "quick":
        notes.append(
            "quick budget: every run is capped (training subsample, epochs) so the study takes minutes; "
            "its figures are not the protocol's. Run `-P budget=full` for the protocol as written."
        )
    notes += [f"not run: {s}" for s in study.skipped]
    notes += [f"{r.label}: {n}" for r in rows for n in r.notes]
    if study.unreported_because:
        notes.append(f"no reported figure: {study.unreported_because}")
    if notes:
        lines += ["", "Notes:", *(f"- {n}" for n in notes)]
    if "confusions" in study.plots:
        lines += ["", "## Most common confusions (test split, all seeds)", ""]
        for r in _highlighted(rows):
            matrices = [m for m in (_confusion(run_id) for run_id in r.run_ids) if m is not None]
            if matrices:
                lines.append(f"- **{r.label}**: " + "; ".join(top_confusions(matrices)))
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _quiet_downloads():
    name = MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name
    before = os.environ.get(name)
    os.environ[name] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name)
        else:
            os.environ[name] = before


def _confusion(run_id: str) -> tuple[list[str], np.ndarray] | None:
    # One small file per run: MLflow's download progress bar would print a line for each.
    try:
        with _quiet_downloads():
            text = mlflow.artifacts.load_text(f"runs:/{run_id}/{records.confusion_matrix_path('test')}")
    except mlflow.exceptions.MlflowException:
        return None
    document = json.loads(text)
    return document["class_names"], np.array(document["counts"])


def top_confusions(matrices: list[tuple[list[str], np.ndarray]], count: int = TOP_CONFUSIONS) -> list[str]:
    """The off-diagonal cells with the most images, summed over runs: 'true -> predicted: n (share of true)'."""
    names = matrices[0][0]
    total = sum(m for _, m in matrices)
    off = total.astype(float)
    np.fill_diagonal(off, -1)
    order = np.argsort(-off, axis=None)[:count]
    found = []
    for flat in order:
        i, j = np.unravel_index(flat, off.shape)
        if off[i, j] <= 0:
            break
        found.append(f"{names[i]} → {names[j]}: {int(total[i, j])} ({total[i, j] / max(total[i].sum(), 1):.1%})")
    return found or ["none"]


def _highlighted(rows: list[Row]) -> list[Row]:
    """Rows that matter most for the eye: the reported configurations and ours (else every row), at most 12."""
    chosen = [r for r in rows if r.reported is not None or r.entry == OURS]
    return (chosen if len(chosen) > 1 else rows)[:MAX_MATRICES]


def bar_figure(study: Study, rows: list[Row]):
    datasets = sorted({r.dataset for r in rows})
    fig, axes = plt.subplots(
        len(datasets), 1, figsize=(max(7, 0.75 * max(len(rows) / len(datasets), 4) + 3), 4.6 * len(datasets))
    )
    axes = np.atleast_1d(axes)
    for ax, dataset in zip(axes, datasets):
        here = [r for r in rows if r.dataset == dataset]
        x = np.arange(len(here))
        measured = [r.mean("test_acc") for r in here]
        spread = [0 if not np.isfinite(r.std("test_acc")) else r.std("test_acc") for r in here]
        colours = ["tab:green" if r.entry == OURS else "tab:blue" for r in here]
        bars = ax.bar(x + 0.2, measured, 0.4, yerr=spread, color=colours, label="ours (green: our recipe)")
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
        reported = [r.reported if r.reported is not None else np.nan for r in here]
        if np.isfinite(reported).any():
            rep = ax.bar(x - 0.2, reported, 0.4, color="tab:grey", label="reported by the original study")
            ax.bar_label(rep, labels=[f"{v:.3f}" if np.isfinite(v) else "" for v in reported], fontsize=7)
        finite = [v for v in measured + reported if np.isfinite(v)]
        ax.set_ylim(max(0.0, min(finite, default=0) - 0.05), 1.0)
        ax.set_xticks(x, [r.label.replace(f" @{dataset}", "") for r in here], rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{dataset}: reported vs ours ({study.budget} budget)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def learning_curves_figure(study: Study, rows: list[Row]):
    client = mlflow.MlflowClient()
    datasets = sorted({r.dataset for r in rows if r.kind == "train"})
    fig, axes = plt.subplots(len(datasets), 2, figsize=(13, 4.4 * len(datasets)), squeeze=False)
    for (ax_acc, ax_loss), dataset in zip(axes, datasets):
        for r in (r for r in rows if r.dataset == dataset and r.kind == "train"):
            style = dict(linewidth=2.5, color="black") if r.entry == OURS else dict(linewidth=1.2)
            label = r.label.replace(f" @{dataset}", "")
            for ax, key in ((ax_acc, "val_acc"), (ax_loss, "train_loss")):
                history = sorted(client.get_metric_history(r.run_ids[0], key), key=lambda m: m.step)
                ax.plot([m.step for m in history], [m.value for m in history], label=label, **style)
        ax_acc.set_ylabel("validation accuracy")
        ax_loss.set_ylabel("training loss")
        for ax in (ax_acc, ax_loss):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            ax.set_title(f"{dataset} (seed {study.seeds[0]})")
        ax_acc.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def confusion_matrices_figure(rows: list[Row]):
    chosen = [(r, _confusion(r.run_ids[0])) for r in _highlighted(rows)]
    chosen = [(r, m) for r, m in chosen if m is not None]
    cols = min(4, max(1, len(chosen)))
    grid_rows = max(1, int(np.ceil(len(chosen) / cols)))
    fig, axes = plt.subplots(grid_rows, cols, figsize=(4.2 * cols, 4.0 * grid_rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (row, (names, counts)) in zip(axes.flat, chosen):
        rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        ax.axis("on")
        ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
        ticks = range(len(names))
        short = [n[:12] for n in names]
        ax.set_xticks(ticks, short, rotation=60, ha="right", fontsize=6)
        ax.set_yticks(ticks, short, fontsize=6)
        accuracy = np.trace(counts) / max(counts.sum(), 1)
        ax.set_title(f"{row.label}\n{row.dataset}, test ACC {accuracy:.3f}", fontsize=8)
    fig.suptitle("test confusion matrices (rows: true class, share of it; first seed)")
    fig.tight_layout()
    return fig


def varied_numeric(rows: list[Row]) -> dict[str, list[Row]]:
    """Entries that vary exactly one numeric parameter, with their rows: what a curve can show."""
    groups: dict[str, list[Row]] = {}
    for r in rows:
        if len(r.varied) == 1 and all(isinstance(v, (int, float)) for v in r.varied.values()):
            groups.setdefault(r.entry, []).append(r)
    return {entry: group for entry, group in groups.items() if len(group) > 1}


def curves_figure(rows: list[Row]):
    groups = varied_numeric(rows)
    if not groups:
        return None
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.2), squeeze=False)
    for ax, (entry, group) in zip(axes[0], groups.items()):
        parameter = next(iter(group[0].varied))
        for dataset in sorted({r.dataset for r in group}):
            here = [r for r in group if r.dataset == dataset]
            # "0 samples" means all of them: plot the number the run actually trained on
            xs = [
                float(r.params[0].get("train_samples", 0)) if parameter == TRAIN_SAMPLES else r.varied[parameter]
                for r in here
            ]
            order = np.argsort(xs)
            for key, marker in (("test_acc", "o-"), ("best_val_acc", "s--")):
                means = np.array([r.mean(key) for r in here])[order]
                stds = np.nan_to_num(np.array([r.std(key) for r in here])[order])
                ax.errorbar(np.array(xs)[order], means, yerr=stds, fmt=marker, capsize=3, label=f"{dataset} {key}")
        positive = [x for r in group for x in [r.varied[parameter]] if x > 0]
        if parameter != TRAIN_SAMPLES and positive and max(positive) / min(positive) > 20:
            ax.set_xscale("log")
        ax.set_xlabel("training samples" if parameter == TRAIN_SAMPLES else parameter)
        ax.set_ylabel("accuracy")
        ax.set_title(f"{entry}: accuracy against {parameter}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def log_report(study: Study, run_ids: dict[tuple[str, int], str]) -> str:
    """Log study.md, study.csv and the chosen plots to the active (parent) run; returns the Markdown."""
    rows = collect_rows(study, run_ids)
    markdown = to_markdown(study, rows)
    mlflow.log_text(markdown, "study.md")
    buffer = io.StringIO()
    to_frame(study, rows).to_csv(buffer, index=False)
    mlflow.log_text(buffer.getvalue(), "study.csv")
    figures = {
        "bar": lambda: bar_figure(study, rows),
        "learning_curves": lambda: learning_curves_figure(study, rows),
        "confusion_matrices": lambda: confusion_matrices_figure(rows),
        "curves": lambda: curves_figure(rows),
    }
    for name in study.plots:
        if name in figures:
            figure = figures[name]()
            if figure is not None:
                records.log_figure(figure, f"plots/{name}.png")
    return markdown
