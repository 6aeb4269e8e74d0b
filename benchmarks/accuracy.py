"""Test accuracy of the named recipes, 3 seeds each, beside the published 28 px figures.

    python benchmarks/accuracy.py                                   # quick and best, every dataset file present
    python benchmarks/accuracy.py --recipes quick --datasets breastmnist --seeds 0

Each (recipe, dataset, seed) is one real `python -m training.cli train` run into a private MLflow store
(outputs/accuracy/); selection uses the validation split and the test split is read once per run. A finished
case is appended to benchmarks/accuracy_results.jsonl as soon as it ends, and a rerun skips it, so the
benchmark (hours of CPU) can be stopped and resumed. RESULTS.md marks the cells with fewer than 3 seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, real_data_dir, write_section

RESULTS_FILE = ROOT / "benchmarks" / "accuracy_results.jsonl"
STORE = ROOT / "outputs" / "accuracy"
DATASETS = (
    "organamnist",
    "bloodmnist",
    "breastmnist",
    "pathmnist",
    "dermamnist",
    "octmnist",
    "pneumoniamnist",
    "retinamnist",
    "tissuemnist",
    "organcmnist",
    "organsmnist",
)
SEEDS = (0, 1, 2)
# Test ACC at 28 px: MedMNIST v2 ResNet-18 (28), MedMNIST+ best at 28 px, and the notebook studies replaced.
REFERENCES = {
    "organamnist": {"MedMNIST v2 ResNet-18 (28)": 0.935, "MedMNIST+ best (28)": 0.932, "study (MobileNetV2)": 0.9249},
    "bloodmnist": {"MedMNIST v2 ResNet-18 (28)": 0.958, "MedMNIST+ best (28)": 0.949, "study (CNN+SVM)": 0.953},
    "breastmnist": {"MedMNIST v2 ResNet-18 (28)": 0.863, "MedMNIST+ best (28)": 0.8654, "study (CNN+SVM)": 0.853},
}
METRICS = ("test_acc", "test_auc", "best_val_acc", "train_time", "wall_time")


def finished() -> list[dict]:
    if not RESULTS_FILE.exists():
        return []
    return [json.loads(line) for line in RESULTS_FILE.read_text().splitlines() if line.strip()]


def run_case(recipe: str, dataset: str, seed: int, data_dir: Path) -> dict:
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{STORE / 'mlflow.db'}",
        "MEDZOO_DATA_DIR": str(data_dir),
    }
    command = [
        sys.executable,
        "-m",
        "training.cli",
        "train",
        "--recipe",
        recipe,
        "--dataset",
        dataset,
        "--seed",
        str(seed),
        "--no-progress",
    ]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=STORE, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{recipe}/{dataset}/seed {seed} failed:\n{result.stderr[-3000:]}")
    run_id = result.stdout.split("run ", 1)[1].split(":", 1)[0]
    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    metrics = mlflow.get_run(run_id).data.metrics
    return {
        "recipe": recipe,
        "dataset": dataset,
        "seed": seed,
        "run_id": run_id,
        **{k: metrics[k] for k in METRICS if k in metrics},
        "process_time": wall,
    }


def mean_std(values: list[float], digits: int = 4) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def table(rows: list[dict]) -> str:
    lines = [
        "| recipe | dataset | seeds | test ACC | test AUC | val ACC | wall time per run (s) | references (test ACC) |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    cases = sorted({(r["recipe"], r["dataset"]) for r in rows}, key=lambda c: (c[0], DATASETS.index(c[1])))
    for recipe, dataset in cases:
        found = [r for r in rows if (r["recipe"], r["dataset"]) == (recipe, dataset)]
        seeds = f"{len(found)}" + ("" if len(found) >= len(SEEDS) else " (partial)")
        walls = sorted(r["process_time"] for r in found)
        references = ", ".join(f"{k} {v:.4f}" for k, v in REFERENCES.get(dataset, {}).items()) or "-"
        lines.append(
            f"| {recipe} | {dataset} | {seeds} | {mean_std([r['test_acc'] for r in found])} | "
            f"{mean_std([r['test_auc'] for r in found])} | {mean_std([r['best_val_acc'] for r in found])} | "
            f"{statistics.median(walls):.0f} (max {walls[-1]:.0f}) | {references} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default="quick,best")
    parser.add_argument("--datasets", default="", help="default: every dataset whose 28 px file is present")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    args = parser.parse_args()
    data_dir = real_data_dir()
    datasets = [
        d for d in (args.datasets.split(",") if args.datasets else DATASETS) if (data_dir / f"{d}.npz").exists()
    ]
    recipes = [r for r in args.recipes.split(",") if r]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    STORE.mkdir(parents=True, exist_ok=True)
    done = {(r["recipe"], r["dataset"], r["seed"]) for r in finished()}
    todo = [(r, d, s) for r in recipes for d in datasets for s in seeds if (r, d, s) not in done]
    print(f"{len(done)} cases already finished; {len(todo)} to run", flush=True)
    for index, (recipe, dataset, seed) in enumerate(todo, 1):
        print(f"[{index}/{len(todo)}] {recipe} {dataset} seed {seed} ...", flush=True)
        row = run_case(recipe, dataset, seed, data_dir)
        with RESULTS_FILE.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"    test acc {row['test_acc']:.4f}, auc {row['test_auc']:.4f}, {row['process_time']:.0f} s", flush=True)
        write_results()
    write_results()


def write_results() -> None:
    rows = finished()
    if not rows:
        return
    body = (
        "## Accuracy of the recipes, 28 px, mean ± std over seeds\n\n"
        "Each run: `python -m training.cli train --recipe R --dataset D --seed S` on the official files, the "
        "whole process timed (data loading, training, evaluation with test-time augmentation, logging). "
        "Selection on the validation split; the test split is read once per run, after selection. A cell with "
        "fewer than 3 seeds is marked partial.\n"
        "Reproduce: `python benchmarks/accuracy.py` (resumable; `--recipes/--datasets/--seeds` pick a subset). "
        "Targets: `quick` above MedMNIST v2 ResNet-18 (28) on all three datasets in at most 5 minutes each; `best` "
        ">= 0.950 / 0.980 / 0.895 on OrganAMNIST / BloodMNIST / BreastMNIST within 30 minutes each.\n\n" + table(rows)
    )
    write_section("accuracy", body)


if __name__ == "__main__":
    main()
