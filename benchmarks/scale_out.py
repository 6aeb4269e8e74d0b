"""Scale-out on one machine, against the real stack (scripts/stack.sh: PostgreSQL + mlflow server).

1. Sweep throughput: the same number of trials by 1 worker, then by 2 workers started together on one
   PostgreSQL study (each worker its share of the cores), in trials per hour of wall time.
2. Data-parallel training: ``train --nproc 1`` against ``--nproc 2`` (torchrun, gloo), the same recipe and
   global batch, in training images per second (the run's ``train_images_per_sec``).

Rounds alternate the variants; the table gives medians and the ratio to the 1-process baseline. Every finished
case is kept in ``benchmarks/scale_out_results.jsonl``; a rerun skips those (``--fresh`` starts over).

    python benchmarks/scale_out.py [--rounds 3] [--trials 8] [--train-epochs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, real_data_dir, write_section

from tests.helpers.stack import start_stack

RESULTS_FILE = ROOT / "benchmarks" / "scale_out_results.jsonl"
SPACE = """
common:
  lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
models:
  cnn:
    model.filters: {type: categorical, choices: ["16,32", "32,64"]}
"""


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "training.cli", *args, "--no-progress"]


def sweep_case(env: dict, workers: int, trials: int, study: str, space: Path, workdir: Path) -> dict:
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    command = cli(
        *("sweep", "--model", "cnn", "--dataset", "breastmnist", "--epochs", "8", "--tta", "none"),
        *("--trials", str(trials // workers), "--space-file", str(space), "--study-name", study),
        *("--pruning", "false"),
    )
    started = time.perf_counter()
    processes = [
        subprocess.Popen(
            command,
            cwd=workdir,
            env={**env, "OMP_NUM_THREADS": threads},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(workers)
    ]
    for process in processes:
        _, stderr = process.communicate()
        if process.returncode != 0:
            raise SystemExit(f"sweep worker failed:\n{stderr[-3000:]}")
    wall = time.perf_counter() - started
    return {"wall_s": wall, "trials": trials, "trials_per_hour": trials / wall * 3600}


def train_case(env: dict, nproc: int, epochs: int, experiment: str, workdir: Path) -> dict:
    import mlflow

    command = cli(
        *("train", "--recipe", "quick", "--dataset", "bloodmnist", "--epochs", str(epochs), "--tta", "none"),
        *("--nproc", str(nproc)),
    )
    started = time.perf_counter()
    done = subprocess.run(
        command, cwd=workdir, env={**env, "MLFLOW_EXPERIMENT_NAME": experiment}, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"training failed:\n{done.stderr[-3000:]}")
    wall = time.perf_counter() - started
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    (run,) = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    return {
        "wall_s": wall,
        "images_per_s": run.data.metrics["train_images_per_sec"],
        "best_val_acc": run.data.metrics["best_val_acc"],
    }


def load_results() -> dict[str, dict]:
    if not RESULTS_FILE.exists():
        return {}
    return {row["case"]: row for row in map(json.loads, RESULTS_FILE.read_text().splitlines())}


def keep(row: dict) -> None:
    with RESULTS_FILE.open("a") as out:
        out.write(json.dumps(row) + "\n")


def table(results: dict[str, dict], rounds: int) -> str:
    def median(kind: str, variant: int, key: str) -> float | None:
        values = [r[key] for r in results.values() if r["kind"] == kind and r["variant"] == variant]
        return statistics.median(values) if values else None

    def count(kind: str, variant: int) -> int:
        return sum(r["kind"] == kind and r["variant"] == variant for r in results.values())

    lines = [
        "| what | 1 process | 2 processes | ratio | rounds |",
        "|---|---:|---:|---:|---|",
    ]
    for kind, key, label, fmt in (
        ("sweep", "trials_per_hour", "sweep: trials per hour (cnn, BreastMNIST, 8 epochs a trial)", "{:.0f}"),
        ("train", "images_per_s", "training: images/s in the epochs (quick recipe, BloodMNIST, batch 128)", "{:.0f}"),
        ("train", "wall_s", "training: wall time of the whole command, s (start-up, evaluation, logging)", "{:.1f}"),
    ):
        one, two = median(kind, 1, key), median(kind, 2, key)
        done = min(count(kind, 1), count(kind, 2))
        ratio = f"{two / one:.2f}x" if one and two else "-"
        status = f"{done} of {rounds}" + ("" if done >= rounds else " (partial)")
        lines.append(
            f"| {label} | {fmt.format(one) if one else '-'} | {fmt.format(two) if two else '-'} | {ratio} | {status} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=8, help="trials per sweep case (even)")
    parser.add_argument("--train-epochs", type=int, default=2)
    parser.add_argument("--fresh", action="store_true", help="forget the kept results")
    args = parser.parse_args()
    if args.fresh and RESULTS_FILE.exists():
        RESULTS_FILE.unlink()
    results = load_results()
    stack = start_stack(prefix="medzoo-bench-stack-")
    folder, workdir = stack.folder, stack.folder / "worker"
    env = {**os.environ, **stack.env, "MEDZOO_DATA_DIR": str(real_data_dir())}
    workdir.mkdir()
    space = folder / "space.yaml"
    space.write_text(SPACE)
    try:
        for round_ in range(args.rounds):
            for kind in ("sweep", "train"):
                for variant in (1, 2) if round_ % 2 == 0 else (2, 1):  # alternate which goes first
                    case = f"{kind}-{variant}-round{round_}"
                    if case in results:
                        continue
                    name = f"{case}-{time.time_ns()}"
                    if kind == "sweep":
                        row = sweep_case(env, variant, args.trials, name, space, workdir)
                    else:
                        row = train_case(env, variant, args.train_epochs, name, workdir)
                    results[case] = {"case": case, "kind": kind, "variant": variant, **row}
                    keep(results[case])
                    print(json.dumps(results[case]), flush=True)
    finally:
        stack.run("purge")
        shutil.rmtree(folder, ignore_errors=True)
    body = (
        "## Scale-out on one machine: 1 vs 2 sweep workers and 1 vs 2 training processes "
        "(`benchmarks/scale_out.py`)\n\n"
        "Against the real stack (PostgreSQL + `mlflow server`, proxied artifacts). Sweep: the same number of trials "
        "by one worker, then by two started together on one PostgreSQL study, each worker its share of the cores "
        "(`OMP_NUM_THREADS`). Training: `train --nproc 1` vs `--nproc 2` (torchrun, gloo), same global batch. "
        "Medians over rounds, alternating which goes first.\n\n"
        + table(results, args.rounds)
        + "\n\nOn 2 cores, two sweep workers use the machine better than one (the process start-up, data loading and "
        "logging of one worker overlap the other's training). Data-parallel training splits the same 2 cores "
        "between two processes of 1 thread each, so the epochs gain little and torchrun's start-up and rank 0's "
        "evaluation, while the other rank waits, add to the wall time: `--nproc` pays where each process has its "
        "own GPU or several cores, not on this machine."
    )
    write_section("scale-out", body)
    print(table(results, args.rounds))


if __name__ == "__main__":
    main()
