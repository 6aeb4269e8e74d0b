"""Robustness of the `quick` models to the MedMNIST-C corruptions, 3 seeds per dataset.

    python benchmarks/robustness.py [--datasets organamnist,bloodmnist,breastmnist] [--max-images 1000]

Takes the newest `quick` run of each (dataset, seed) that `benchmarks/accuracy.py` recorded (its private MLflow
store, outputs/accuracy), evaluates it with `python -m training.cli robustness --run <id>` into the same store,
and writes RESULTS.md's "robustness" section: clean and corrupted balanced accuracy, BE and rBE (against the
medmnistc package's AlexNet), mean and spread over the seeds, and the worst corruption. Resumable: a (run,
max_images) pair already in robustness_results.jsonl is not evaluated again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
from common import ROOT, real_data_dir, write_section

ACCURACY_RESULTS = ROOT / "benchmarks" / "accuracy_results.jsonl"
RESULTS_FILE = ROOT / "benchmarks" / "robustness_results.jsonl"
STORE = ROOT / "outputs" / "accuracy"
TRACKING_URI = f"sqlite:///{STORE / 'mlflow.db'}"
DATASETS = ("organamnist", "bloodmnist", "breastmnist")
SEEDS = (0, 1, 2)


def quick_runs(datasets) -> dict[tuple[str, int], str]:
    """(dataset, seed) -> the newest quick run the accuracy benchmark recorded (its rows are in run order)."""
    runs = {}
    for line in ACCURACY_RESULTS.read_text().splitlines():
        row = json.loads(line)
        if row["recipe"] == "quick" and row["dataset"] in datasets and row["seed"] in SEEDS:
            runs[(row["dataset"], row["seed"])] = row["run_id"]
    return runs


def done() -> dict[tuple[str, int], dict]:
    if not RESULTS_FILE.exists():
        return {}
    rows = [json.loads(line) for line in RESULTS_FILE.read_text().splitlines() if line.strip()]
    return {(r["source_run"], r["max_images"]): r for r in rows}


def evaluate(run_id: str, max_images: int) -> dict:
    env = dict(os.environ, MLFLOW_TRACKING_URI=TRACKING_URI, MEDZOO_DATA_DIR=str(real_data_dir()))
    started = time.perf_counter()
    finished = subprocess.run(
        [sys.executable, "-m", "training.cli", "robustness", "--run", run_id, "--max-images", str(max_images)],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
    )
    if finished.returncode:
        raise SystemExit(f"robustness of run {run_id} failed ({finished.returncode})")
    print(finished.stdout, flush=True)
    import mlflow

    mlflow.set_tracking_uri(TRACKING_URI)
    run_line = finished.stdout.strip().splitlines()[0]
    robustness_run = run_line.split()[1].rstrip(":")
    summary = json.loads(mlflow.artifacts.load_text(f"runs:/{robustness_run}/robustness.json"))
    return {**summary, "wall_time": time.perf_counter() - started}


def table(rows: list[dict]) -> str:
    lines = [
        "| dataset | test images | clean balanced ACC | corrupted balanced ACC | BE | rBE | worst corruption (mean) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for dataset in DATASETS:
        mine = [r for r in rows if r["dataset"] == dataset]
        if not mine:
            continue

        def stat(key, mine=mine):
            values = np.array([r["summary"][key] for r in mine])
            return f"{values.mean():.4f} ± {values.std():.4f}"

        worst = {}
        for r in mine:
            for name, accuracies in r["balanced_accuracy"].items():
                worst.setdefault(name, []).append(np.mean(accuracies))
        name = min(worst, key=lambda n: np.mean(worst[n]))
        lines.append(
            f"| {dataset} ({len(mine)} seeds) | {mine[0]['summary']['images']} | {stat('clean_balanced_acc')} | "
            f"{stat('corrupted_balanced_acc')} | {stat('be')} | {stat('rbe')} | {name} ({np.mean(worst[name]):.3f}) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--max-images", type=int, default=1000)
    parser.add_argument("--report-only", action="store_true", help="write RESULTS.md from the recorded rows only")
    args = parser.parse_args()
    datasets = args.datasets.split(",")
    finished = done()
    for (dataset, seed), run_id in sorted(quick_runs(datasets).items()):
        if (run_id, args.max_images) in finished or args.report_only:
            continue
        print(f"== {dataset} seed {seed}: run {run_id}", flush=True)
        result = evaluate(run_id, args.max_images)
        row = {"dataset": dataset, "seed": seed, "source_run": run_id, "max_images": args.max_images, **result}
        with RESULTS_FILE.open("a") as f:
            f.write(json.dumps(row) + "\n")
        finished[(run_id, args.max_images)] = row
    rows = [r for r in finished.values() if r["max_images"] == args.max_images]
    expected = len(quick_runs(datasets))
    partial = "" if len(rows) >= expected else f" **Partial: {len(rows)} of {expected} runs.**"
    write_section(
        "robustness",
        f"""## Robustness of `quick` to the MedMNIST-C corruptions

`python benchmarks/robustness.py --max-images {args.max_images}`: each `quick` run of the accuracy benchmark
(3 seeds per dataset) evaluated by `python -m training.cli robustness` on a seeded, stratified subsample of its
test split ({args.max_images} images, or the whole split when smaller), every corruption the `medmnistc` package
defines for the dataset at its 5 severities (applied at 224 px, then area-resized to the model's 28 px). Balanced
accuracy clean and averaged over corruptions and severities; BE and rBE as the package computes them, against its
AlexNet (trained and corrupted at 224 px, so a ratio, not a like-for-like comparison). Mean ± std over seeds.{partial}

{table(rows)}
""",
    )


if __name__ == "__main__":
    main()
