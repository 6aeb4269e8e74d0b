"""What an epoch spends outside the optimisation steps: evaluation (raw and EMA weights) and the checkpoint.

For each dataset the `quick` recipe's network is trained for a few epochs with the product's own pieces:
``train_one_epoch`` (the steps), then ``end_of_epoch`` (evaluate raw and EMA weights on validation, select,
checkpoint) with the real ``RollingCheckpoint`` writing into a temporary local MLflow store. The table gives the
median seconds per epoch of each part and the share of the epoch that is not training: on small datasets that
fixed cost can be most of a run.

    python benchmarks/epoch_overhead.py [--epochs 3] [--datasets organamnist bloodmnist breastmnist]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import mlflow
from common import real_data_dir, write_section

from training.core.config import resolve
from training.core.devices import channels_last
from training.core.engine import Checkpointing, FitResult, Selection, end_of_epoch, prepare, train_one_epoch
from training.core.recipes import config_from_recipe
from training.tracking.checkpoint import RollingCheckpoint
from training.workflows.network import build_model, fit_options, load


def measure(dataset_name: str, epochs: int) -> dict:
    run = resolve(config_from_recipe("quick", dataset=dataset_name, data_dir=str(real_data_dir())))
    dataset = load(run)
    model, _ = build_model(run.config, dataset)
    options = fit_options(run, model)
    parts = {"steps": [], "evaluation": [], "checkpoint": []}
    with mlflow.start_run() as mlflow_run, channels_last(model):
        checkpoint = RollingCheckpoint(mlflow_run.info.run_id)

        def timed_checkpoint(state: dict) -> None:
            started = time.perf_counter()
            checkpoint(state)
            parts["checkpoint"].append(time.perf_counter() - started)

        every_epoch = Checkpointing(timed_checkpoint, every_s=0)  # the cost of one write, measured each epoch
        training = prepare(model, dataset.train, dataset.num_classes, options)
        selection, result = Selection(0), FitResult()
        for epoch in range(1, epochs + 1):
            stats = train_one_epoch(training, dataset.train, epoch, progress=False)
            started = time.perf_counter()
            end_of_epoch(training, epoch, stats, dataset.val, dataset.class_names, selection, result, every_epoch)
            parts["steps"].append(stats.seconds)
            parts["evaluation"].append(time.perf_counter() - started - parts["checkpoint"][-1])
    medians = {part: statistics.median(seconds) for part, seconds in parts.items()}
    return {
        "dataset": dataset_name,
        "train": len(dataset.train),
        "val": len(dataset.val),
        "recipe_epochs": run.config.epochs,
        **medians,
        "share": (medians["evaluation"] + medians["checkpoint"]) / sum(medians.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3, help="epochs measured per dataset (medians reported)")
    parser.add_argument("--datasets", nargs="+", default=["organamnist", "bloodmnist", "breastmnist"])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="medzoo-overhead-") as tmp:
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        mlflow.set_experiment("epoch-overhead")
        for name in args.datasets:
            rows.append(measure(name, args.epochs))
            r = rows[-1]
            print(
                f"{name:12s} steps {r['steps']:6.2f} s  evaluation {r['evaluation']:5.2f} s  "
                f"checkpoint {r['checkpoint']:5.2f} s  not training {r['share']:.0%}",
                flush=True,
            )
    table = [
        "| dataset | train / val images | epochs in quick | steps (s) | evaluation, raw + EMA (s) | checkpoint (s) "
        "| not training |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    table += [
        f"| {r['dataset']} | {r['train']} / {r['val']} | {r['recipe_epochs']} | {r['steps']:.2f} | "
        f"{r['evaluation']:.2f} | "
        f"{r['checkpoint']:.2f} | {r['share']:.0%} |"
        for r in rows
    ]
    write_section(
        "epoch_overhead",
        (
            "## What an epoch of `quick` spends outside the steps (`benchmarks/epoch_overhead.py`)\n\n"
            f"Medians over {args.epochs} epochs per dataset of the product's `train_one_epoch` and `end_of_epoch` "
            "(validation of the raw and the EMA weights, selection, the rolling checkpoint into a local MLflow "
            "store). Validation runs without test-time views; those are only in the final evaluation.\n\n"
            + "\n".join(table)
        ),
    )


if __name__ == "__main__":
    main()
