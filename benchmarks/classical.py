"""Classical estimators on CNN features and ensembles against the notebook study (BreastMNIST, BloodMNIST).

    python benchmarks/classical.py [--datasets breastmnist,bloodmnist]

Per dataset, in a private MLflow store (outputs/classical/): three seeds of the `quick` recipe; SVM, random
forest and decision tree on the penultimate-layer features of the seed-0 net (grids: configs/classical_grids.yaml);
the CNN + SVM fusion with validation-chosen weights; the ensemble of the three nets; then `register` picks the
best candidate on validation ACC. Every step is a real CLI command; a finished step is kept in
benchmarks/classical_results.jsonl and skipped when run again. Test ACC is read once per run, after selection.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from common import ROOT, real_data_dir, write_section

RESULTS_FILE = ROOT / "benchmarks" / "classical_results.jsonl"
STORE = ROOT / "outputs" / "classical"
TRACKING_URI = f"sqlite:///{STORE / 'mlflow.db'}"
STUDY = {"breastmnist": ("CNN features + SVM", 0.853), "bloodmnist": ("0.3 CNN + 0.7 SVM fusion", 0.953)}
SEEDS = (0, 1, 2)


def finished() -> dict[str, dict]:
    if not RESULTS_FILE.exists():
        return {}
    rows = [json.loads(line) for line in RESULTS_FILE.read_text().splitlines() if line.strip()]
    return {f"{r['dataset']}/{r['step']}": r for r in rows}


def cli(*args: str, data_dir) -> tuple[str, float]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": TRACKING_URI, "MEDZOO_DATA_DIR": str(data_dir)}
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "training.cli", *args, "--no-progress"],
        cwd=STORE,
        env=env,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return result.stdout.strip().splitlines()[-1], time.perf_counter() - started


def metrics_of(run_id: str) -> dict:
    import mlflow

    mlflow.set_tracking_uri(TRACKING_URI)
    run = mlflow.get_run(run_id)
    return {k: run.data.metrics[k] for k in ("best_val_acc", "test_acc", "test_auc") if k in run.data.metrics}


def step(dataset: str, name: str, args: list[str], data_dir, done: dict) -> dict:
    key = f"{dataset}/{name}"
    if key in done:
        return done[key]
    print(f"{key} ...", flush=True)
    line, seconds = cli(*args, data_dir=data_dir)
    run_id = line.split()[1].rstrip(":") if line.startswith("run ") else ""  # a new run, or the one registered
    row = {"dataset": dataset, "step": name, "run_id": run_id, "seconds": seconds, "output": line}
    if run_id:
        row.update(metrics_of(run_id))
    with RESULTS_FILE.open("a") as f:
        f.write(json.dumps(row) + "\n")
    done[key] = row
    print(f"    {line}", flush=True)
    return row


def run_dataset(dataset: str, data_dir, done: dict) -> None:
    nets = [
        step(
            dataset,
            f"quick seed {s}",
            ["train", "--recipe", "quick", "--dataset", dataset, "--seed", str(s)],
            data_dir,
            done,
        )
        for s in SEEDS
    ]
    features = nets[0]["run_id"]
    for model in ("svm", "rf", "dt"):
        step(
            dataset,
            model,
            ["classical", "--dataset", dataset, "--features", features, "--model", model],
            data_dir,
            done,
        )
    svm = done[f"{dataset}/svm"]["run_id"]
    step(dataset, "CNN + SVM fusion", ["ensemble", "--runs", f"{features},{svm}"], data_dir, done)
    step(dataset, "ensemble of 3 nets", ["ensemble", "--runs", ",".join(n["run_id"] for n in nets)], data_dir, done)
    step(dataset, "register", ["register", "--dataset", dataset, "--metric", "acc"], data_dir, done)


def table(done: dict) -> str:
    lines = [
        "| dataset | candidate | val ACC | test ACC | test AUC | time (s) | study |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for row in done.values():
        if row["step"] == "register":
            continue
        study = STUDY[row["dataset"]]
        registered = done.get(f"{row['dataset']}/register", {}).get("output", "").split("(")[0]
        mark = " **(registered)**" if row["run_id"] and row["run_id"] in registered else ""
        scores = " | ".join(f"{row.get(k, float('nan')):.4f}" for k in ("best_val_acc", "test_acc", "test_auc"))
        lines.append(
            f"| {row['dataset']} | {row['step']}{mark} | {scores} | {row['seconds']:.0f} | {study[0]} {study[1]:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="breastmnist,bloodmnist")
    args = parser.parse_args()
    data_dir = real_data_dir()
    STORE.mkdir(parents=True, exist_ok=True)
    done = finished()
    for dataset in args.datasets.split(","):
        run_dataset(dataset, data_dir, done)
        write_results(done)


def write_results(done: dict) -> None:
    write_section(
        "classical",
        "## Classical estimators and ensembles vs the notebook study (BreastMNIST, BloodMNIST)\n\n"
        "One store per benchmark: three `quick` nets (seeds 0-2); SVM / random forest / decision tree on the seed-0 "
        "net's features (GridSearchCV on train folds); CNN + SVM fusion and the ensemble of the three nets with "
        "`--weights auto` (the validation log-loss optimum, or equal weights where they classify validation at "
        "least as well); `register --metric acc` picks the champion on validation. "
        "Test ACC is read once per run. Time: the whole CLI process on the 2-core CPU.\n"
        "Reproduce: `python benchmarks/classical.py` (resumable).\n\n" + table(done),
    )


if __name__ == "__main__":
    main()
