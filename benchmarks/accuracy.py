"""Test accuracy of the named recipes, 3 seeds each, beside the published 28 px figures.

    python benchmarks/accuracy.py                                   # quick and best, every dataset file present
    python benchmarks/accuracy.py --recipes quick --datasets breastmnist --seeds 0
    python benchmarks/accuracy.py --recipes best --device cuda --jobs 3        # on a GPU machine
    python benchmarks/accuracy.py --recipes quick --datasets breastmnist --rerun  # again, after a code change

Each (recipe, dataset, seed, device) is one real `python -m training.cli train` run into a private MLflow store
(outputs/accuracy/); selection uses the validation split and the test split is read once per run. A finished
case is appended to benchmarks/accuracy_results.jsonl as soon as it ends, with a fingerprint of the recipe's
values for that dataset: a rerun skips finished cases, and reruns (and leaves out of the table) those whose recipe
has changed since. The benchmark (hours of CPU) can be stopped and resumed. RESULTS.md marks the cells with fewer
than 3 seeds. The time targets are for the 2-core CPU; GPU rows give accuracy only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import ROOT, real_data_dir, write_section

RESULTS_FILE = ROOT / "benchmarks" / "accuracy_results.jsonl"
# Runs of other benchmarks that trained a recipe exactly as it stands count here too (same fingerprint).
ALSO_RECIPE_RUNS = (ROOT / "benchmarks" / "rule_choice_results.jsonl",)
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
COVERAGE_PERCENTS = (90, 95, 99)
CALIBRATION_METRICS = (
    "temperature",
    "test_ece",
    "test_ece_uncalibrated",
    "test_nll",
    "test_nll_uncalibrated",
    *(f"test_{kind}_{p}" for p in COVERAGE_PERCENTS for kind in ("coverage", "set_size")),
)
METRICS = ("test_acc", "test_auc", "best_val_acc", "train_time", "wall_time", *CALIBRATION_METRICS)


def fingerprint(recipe: str, dataset: str) -> str:
    """What the recipe sets for this dataset, hashed: a result is current only while this is unchanged."""
    from training.core.options import to_text
    from training.core.recipes import load_recipes

    values = load_recipes()[recipe].values_for(dataset)
    text = json.dumps({k: to_text(v) for k, v in sorted(values.items())})
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def finished() -> list[dict]:
    """The results of the recipes as they are now (older results stay in the file, out of the table); of a case
    run again (``--rerun``), the latest."""
    files = [f for f in (*ALSO_RECIPE_RUNS, RESULTS_FILE) if f.exists()]  # this benchmark's own rows win
    rows = [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]
    from training.core.recipes import load_recipes

    rows = [r for r in rows if r.get("recipe") in load_recipes()]
    current = [r for r in rows if r.get("fingerprint") == fingerprint(r["recipe"], r["dataset"])]
    latest = {(r["recipe"], r["dataset"], r["seed"], device_of(r)): r for r in current}
    return list(latest.values())


def commit() -> str:
    """The code a result was measured with (rows before this field was kept have none)."""
    found = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return found.stdout.strip() or "unknown"


def device_name(device: str) -> str:
    """The device, and on CPUs whether the step runs in bfloat16 (``precision=auto``): rows of both kinds differ."""
    import torch

    from training.core.devices import native_bf16

    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return f"cuda ({torch.cuda.get_device_name()})"
    return f"cpu ({os.cpu_count()} cores{', bf16' if native_bf16() else ''})"


TRACKING_URI = f"sqlite:///{STORE / 'mlflow.db'}"


def create_store() -> None:
    """Create the SQLite store once, up front: parallel runs migrating a new store at once collide."""
    import mlflow

    STORE.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(TRACKING_URI)
    mlflow.search_experiments()


def run_case(
    recipe: str, dataset: str, seed: int, data_dir: Path, device: str, extra: tuple[str, ...] = (), mark: str = ""
) -> dict:
    """One training process; ``extra`` are further command-line parameters, ``mark`` the fingerprint to record
    (default: the recipe's values for the dataset)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": TRACKING_URI, "MEDZOO_DATA_DIR": str(data_dir)}
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
        "--device",
        device,
        "--no-progress",
        *extra,
    ]
    # What the case runs, taken before it starts: an edit of configs/recipes.yaml during a run belongs to later cases.
    measured_with = {"fingerprint": mark or fingerprint(recipe, dataset), "commit": commit()}
    started = time.perf_counter()
    result = subprocess.run(command, cwd=STORE, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{recipe}/{dataset}/seed {seed} failed:\n{result.stderr[-3000:]}")
    run_id = result.stdout.split("run ", 1)[1].split(":", 1)[0]
    import mlflow

    metrics = mlflow.get_run(run_id).data.metrics
    return {
        "recipe": recipe,
        "dataset": dataset,
        "seed": seed,
        "device": device_name(device),
        **measured_with,
        "run_id": run_id,
        **{k: metrics[k] for k in METRICS if k in metrics},
        "process_time": wall,
    }


def mean_std(values: list[float], digits: int = 4) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def device_of(row: dict) -> str:
    return row.get("device", f"cpu ({os.cpu_count()} cores)")


def table(rows: list[dict]) -> str:
    lines = [
        "| recipe | dataset | device | seeds | test ACC | test AUC | val ACC | wall time per run (s) "
        "| references (test ACC) |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    cases = sorted(
        {(r["recipe"], r["dataset"], device_of(r)) for r in rows}, key=lambda c: (c[0], DATASETS.index(c[1]), c[2])
    )
    for recipe, dataset, device in cases:
        found = [r for r in rows if (r["recipe"], r["dataset"], device_of(r)) == (recipe, dataset, device)]
        seeds = f"{len(found)}" + ("" if len(found) >= len(SEEDS) else " (partial)")
        walls = sorted(r["process_time"] for r in found)
        shared = " (shared CPU)" if any(r.get("shared_cpu") for r in found) else ""
        references = ", ".join(f"{k} {v:.4f}" for k, v in REFERENCES.get(dataset, {}).items()) or "-"
        lines.append(
            f"| {recipe} | {dataset} | {device} | {seeds} | {mean_std([r['test_acc'] for r in found])} | "
            f"{mean_std([r['test_auc'] for r in found])} | {mean_std([r['best_val_acc'] for r in found])} | "
            f"{statistics.median(walls):.0f} (max {walls[-1]:.0f}){shared} | {references} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default="quick,best")
    parser.add_argument("--datasets", default="", help="default: every dataset whose 28 px file is present")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--jobs", type=int, default=1, help="cases run at once (GPU machines; times then overlap)")
    parser.add_argument("--rerun", action="store_true", help="run the chosen cases again (the latest result counts)")
    args = parser.parse_args()
    data_dir = real_data_dir()
    datasets = [
        d for d in (args.datasets.split(",") if args.datasets else DATASETS) if (data_dir / f"{d}.npz").exists()
    ]
    recipes = [r for r in args.recipes.split(",") if r]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    create_store()
    device = device_name(args.device)
    done = {(r["recipe"], r["dataset"], r["seed"]) for r in finished() if device_of(r) == device and not args.rerun}
    todo = [(r, d, s) for r in recipes for d in datasets for s in seeds if (r, d, s) not in done]
    print(f"{len(done)} cases already finished on {device}; {len(todo)} to run", flush=True)
    lock = threading.Lock()

    def one(case: tuple[str, str, int]) -> None:
        recipe, dataset, seed = case
        print(f"{recipe} {dataset} seed {seed} ...", flush=True)
        row = run_case(recipe, dataset, seed, data_dir, args.device)
        with lock:
            with RESULTS_FILE.open("a") as f:
                f.write(json.dumps(row) + "\n")
            write_results()
        print(
            f"    {recipe} {dataset} seed {seed}: test acc {row['test_acc']:.4f}, auc {row['test_auc']:.4f}, "
            f"{row['process_time']:.0f} s",
            flush=True,
        )

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        list(pool.map(one, todo))
    write_results()


def calibration_table(rows: list[dict]) -> str:
    """Calibration and conformal coverage of the recipes' runs that recorded them (the targets: ECE after <= 0.015
    on OrganAMNIST and BloodMNIST with quick, lower than before everywhere; coverage at most 1.5 points below)."""
    rows = [r for r in rows if "test_ece" in r]
    lines = [
        "| recipe | dataset | device | seeds | temperature | test ECE before -> after | test NLL before -> after | "
        + " | ".join(f"coverage {p}% (mean set size)" for p in COVERAGE_PERCENTS)
        + " |",
        "|---|---|---|---:|---:|---|---|" + "---|" * len(COVERAGE_PERCENTS),
    ]
    cases = sorted(
        {(r["recipe"], r["dataset"], device_of(r)) for r in rows}, key=lambda c: (c[0], DATASETS.index(c[1]))
    )
    for recipe, dataset, device in cases:
        found = [r for r in rows if (r["recipe"], r["dataset"], device_of(r)) == (recipe, dataset, device)]

        def values(key: str, found=found) -> list[float]:
            return [r[key] for r in found]

        coverage = " | ".join(
            f"{mean_std(values(f'test_coverage_{p}'), 3)} ({statistics.mean(values(f'test_set_size_{p}')):.2f})"
            for p in COVERAGE_PERCENTS
        )
        lines.append(
            f"| {recipe} | {dataset} | {device} | {len(found)} | {mean_std(values('temperature'), 2)} | "
            f"{mean_std(values('test_ece_uncalibrated'))} -> {mean_std(values('test_ece'))} | "
            f"{mean_std(values('test_nll_uncalibrated'), 3)} -> {mean_std(values('test_nll'), 3)} | {coverage} |"
        )
    return "\n".join(lines)


def write_results() -> None:
    rows = finished()
    if not rows:
        return
    calibrated = calibration_table(rows)
    if calibrated.count("\n") > 1:
        write_section(
            "calibration",
            "## Calibration and conformal sets of the recipes, mean ± std over seeds\n\n"
            "From the same runs as the accuracy table: test ECE (15 equal-width bins) and NLL of the served graph "
            "before and after the temperature (fitted on half of validation), and the measured coverage of the "
            "conformal sets (calibrated on the other half) on the test split with their mean size. Targets: ECE "
            "after <= 0.015 on OrganAMNIST and BloodMNIST with `quick` and lower than before on all three; "
            "coverage at most 1.5 points below each level.\n\n" + calibrated,
        )
    body = (
        "## Accuracy of the recipes, 28 px, mean ± std over seeds\n\n"
        "Each run: `python -m training.cli train --recipe R --dataset D --seed S` on the official files, the "
        "whole process timed (data loading, training, evaluation with test-time augmentation, logging). "
        "Selection on the validation split; the test split is read once per run, after selection. A cell with "
        "fewer than 3 seeds is marked partial. GPU rows (bfloat16 autocast) show what the same recipe reaches there; "
        "their times are not the CPU budget's. (shared CPU): other work ran on the same 2 cores during these runs "
        "(marked `shared_cpu` in the results file), so their times are upper bounds.\n"
        "Reproduce: `python benchmarks/accuracy.py` (resumable; `--recipes/--datasets/--seeds` pick a subset; "
        "`--rerun` measures cases again after a code change, the latest row counting; new rows record their "
        "commit). "
        "Targets: `quick` above MedMNIST v2 ResNet-18 (28) on all three datasets in at most 5 minutes each; `best` "
        ">= 0.950 / 0.980 / 0.895 on OrganAMNIST / BloodMNIST / BreastMNIST within 30 minutes each.\n\n" + table(rows)
    )
    write_section("accuracy", body)


if __name__ == "__main__":
    main()
