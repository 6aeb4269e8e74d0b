"""One robustness lever, measured: `quick` trained with `corruption_augment` against `quick` as it ships.

    python benchmarks/robustness_lever.py [--datasets organamnist,breastmnist] [--share 0.5] [--max-images 1000]

For each dataset and seed (0, 1, 2): `python -m training.cli train --recipe quick --corruption-augment SHARE`
into the accuracy benchmark's store (outputs/accuracy), then `robustness` on it as benchmarks/robustness.py
evaluates the shipped `quick` runs (same test subsample, same corruptions). The share was set before measuring
(0.5, half of each batch corrupted); nothing here is chosen on test. Writes RESULTS.md's "robustness-lever"
section beside the shipped runs' rows of robustness_results.jsonl: clean test ACC (the whole split) and clean and
corrupted balanced accuracy. Target: corrupted accuracy up, clean test ACC down by at most 0.3 points (mean of 3
seeds). Resumable: a (dataset, seed, share) in robustness_lever_results.jsonl is not trained again.
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
from robustness import ACCURACY_RESULTS, STORE, TRACKING_URI, evaluate, quick_runs
from robustness import RESULTS_FILE as SHIPPED_FILE

RESULTS_FILE = ROOT / "benchmarks" / "robustness_lever_results.jsonl"
SEEDS = (0, 1, 2)


def train(dataset: str, seed: int, share: float) -> tuple[str, float]:
    import mlflow

    env = dict(os.environ, MLFLOW_TRACKING_URI=TRACKING_URI, MEDZOO_DATA_DIR=str(real_data_dir()))
    command = [
        *(sys.executable, "-m", "training.cli", "train", "--recipe", "quick", "--dataset", dataset),
        *("--seed", str(seed), "--corruption-augment", str(share), "--no-progress"),
    ]
    started = time.perf_counter()
    finished = subprocess.run(command, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE)
    if finished.returncode:
        raise SystemExit(f"training {dataset} seed {seed} failed ({finished.returncode})")
    mlflow.set_tracking_uri(TRACKING_URI)
    (run,) = mlflow.search_runs(
        search_all_experiments=True,
        output_format="list",
        filter_string=f"params.corruption_augment = '{share}' and params.seed = '{seed}' "
        f"and tags.dataset = '{dataset}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return run.info.run_id, time.perf_counter() - started


def test_acc(run_id: str) -> float:
    import mlflow

    mlflow.set_tracking_uri(TRACKING_URI)
    return mlflow.get_run(run_id).data.metrics["test_acc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="organamnist,breastmnist")
    parser.add_argument("--share", type=float, default=0.5)
    parser.add_argument("--max-images", type=int, default=1000)
    parser.add_argument("--shared-cpu", action="store_true", help="mark the wall times: other work shared the CPU")
    parser.add_argument("--report-only", action="store_true", help="write RESULTS.md from the recorded rows only")
    args = parser.parse_args()
    datasets = args.datasets.split(",")
    rows = [json.loads(line) for line in RESULTS_FILE.read_text().splitlines()] if RESULTS_FILE.exists() else []
    done = {(r["dataset"], r["seed"], r["share"]) for r in rows}
    for dataset in datasets:
        for seed in SEEDS:
            if (dataset, seed, args.share) in done or args.report_only:
                continue
            if not STORE.exists():
                raise SystemExit(f"run benchmarks/accuracy.py first: no store in {STORE}")
            print(f"== {dataset} seed {seed}: quick + corruption_augment={args.share}", flush=True)
            run_id, wall = train(dataset, seed, args.share)
            result = evaluate(run_id, args.max_images)
            row = {
                "dataset": dataset,
                "seed": seed,
                "share": args.share,
                "run_id": run_id,
                "train_wall_time": wall,
                "shared_cpu": args.shared_cpu,
                "test_acc": test_acc(run_id),
                "max_images": args.max_images,
                **result,
            }
            with RESULTS_FILE.open("a") as f:
                f.write(json.dumps(row) + "\n")
            rows.append(row)
    write_section("robustness-lever", report(rows, datasets, args))


def partial(rows: list[dict], datasets: list[str], share: float) -> str:
    missing = [d for d in datasets if sum(r["dataset"] == d and r["share"] == share for r in rows) < len(SEEDS)]
    return f" **Partial: {', '.join(missing)} not (fully) measured yet.**" if missing else ""


def report(rows: list[dict], datasets: list[str], args) -> str:
    shipped = {}
    if SHIPPED_FILE.exists():
        for r in map(json.loads, SHIPPED_FILE.read_text().splitlines()):
            if r["max_images"] == args.max_images:
                shipped[r["source_run"]] = r
    runs = quick_runs(datasets)
    trained = {r["run_id"]: r for r in map(json.loads, ACCURACY_RESULTS.read_text().splitlines())}
    lines = [
        "## A robustness lever: `quick` with `corruption_augment`",
        "",
        f"`python benchmarks/robustness_lever.py --share {args.share}`: `quick` trained with half of each batch "
        "drawn from a MedMNIST-C corrupted copy of the training split, against the shipped `quick` runs, 3 seeds "
        f"each; robustness as in the section above ({args.max_images} test images). Clean test ACC on the whole test "
        "split. Target: corrupted balanced accuracy up, clean test ACC down by at most 0.3 points."
        + partial(rows, datasets, args.share),
        "",
        "| dataset | training | seeds | clean test ACC | clean balanced ACC | corrupted balanced ACC | rBE | "
        "training wall time per run (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]

    def stat(values):
        values = np.array(values)
        return f"{values.mean():.4f} ± {values.std():.4f}"

    for dataset in datasets:
        base = [shipped[runs[(dataset, s)]] for s in SEEDS if runs.get((dataset, s)) in shipped]
        lever = [r for r in rows if r["dataset"] == dataset and r["share"] == args.share]
        base_walls = [trained[r["source_run"]]["wall_time"] for r in base]
        for label, group, accs, walls in (
            ("quick (shipped)", base, [trained[r["source_run"]]["test_acc"] for r in base], base_walls),
            (
                f"quick + corruption_augment={args.share}",
                lever,
                [r["test_acc"] for r in lever],
                [r["train_wall_time"] for r in lever],
            ),
        ):
            if not group:
                continue
            lines.append(
                f"| {dataset} | {label} | {len(group)} | {stat(accs)} | "
                f"{stat([r['summary']['clean_balanced_acc'] for r in group])} | "
                f"{stat([r['summary']['corrupted_balanced_acc'] for r in group])} | "
                f"{stat([r['summary']['rbe'] for r in group])} | "
                f"{np.median(walls):.0f}{' (shared CPU)' if any(r.get('shared_cpu') for r in group) else ''} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
