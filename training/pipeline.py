"""The whole chain for users: train several models on one dataset, then register the best.

    mlflow run . -e main --env-manager local -P dataset=bloodmnist -P models=cnn,mobilenetv2 -P epochs=5

Each step is a nested ``mlflow.run`` of this project, run with the caller's environment manager.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlflow
from mlflow.utils.mlflow_tags import MLFLOW_PROJECT_ENV

import zoo
from training.data import DatasetError, check_dataset_name

PROJECT_DIR = Path(__file__).resolve().parents[1]


def caller_env_manager() -> str:
    """`mlflow run` tags the run with conda/virtualenv/uv/docker environments and leaves local untagged."""
    run = mlflow.active_run()
    tag = mlflow.get_run(run.info.run_id).data.tags.get(MLFLOW_PROJECT_ENV) if run else None
    return {"conda": "conda", "virtualenv": "virtualenv", "uv": "uv"}.get(tag or "", "local")


def run_pipeline(models: list[str], dataset: str, train_params: dict, metric: str, data_dir: str) -> None:
    with mlflow.start_run(run_name=f"main-{dataset}"):
        env_manager = caller_env_manager()
        mlflow.set_tags({"pipeline": "main", "models": ",".join(models), "target_dataset": dataset})
        for model in models:
            print(f"== training {model} on {dataset}", flush=True)
            mlflow.run(
                str(PROJECT_DIR),
                entry_point="train",
                env_manager=env_manager,
                parameters={"model": model, "dataset": dataset, "data_dir": data_dir, **train_params},
            )
        print(f"== registering the best {dataset} model", flush=True)
        mlflow.run(
            str(PROJECT_DIR),
            entry_point="register",
            env_manager=env_manager,
            parameters={"dataset": dataset, "metric": metric, "data_dir": data_dir},
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.pipeline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="cnn,mobilenetv2", help="comma-separated zoo models")
    parser.add_argument("--dataset", default="organamnist")
    parser.add_argument("--epochs", default="10")
    parser.add_argument("--size", default="28")
    parser.add_argument("--metric", default="auc", help="validation metric for selection and registration")
    parser.add_argument("--max-train-samples", default="0")
    parser.add_argument("--data-dir", default="")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    try:
        check_dataset_name(args.dataset)
        for model in models:
            zoo.get_model_config(model)
        if not models:
            raise ValueError("models is empty; name at least one zoo model.")
    except (DatasetError, zoo.ZooError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    train_params = {
        "epochs": args.epochs,
        "size": args.size,
        "select_metric": args.metric,
        "max_train_samples": args.max_train_samples,
    }
    run_pipeline(models, args.dataset, train_params, args.metric, args.data_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
