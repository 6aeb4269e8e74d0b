"""The whole chain for users: train several models on one dataset, then register the best.

    mlflow run . -e main --env-manager local -P dataset=bloodmnist -P models=cnn,mobilenetv2 -P epochs=5

Each step is a nested ``mlflow.run`` of this project, run with the caller's environment manager; every
training parameter given to ``main`` is passed on to each ``train`` step unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mlflow
from mlflow.utils.mlflow_tags import MLFLOW_PROJECT_ENV

from training.core.config import ConfigError, TrainConfig
from training.core.options import option
from training.core.paths import PROJECT_DIR


@dataclass
class PipelineOptions:
    models: list = option(["cnn", "mobilenetv2"], "comma-separated zoo models, each trained as a nested run")


def caller_env_manager() -> str:
    """`mlflow run` tags the run with conda/virtualenv/uv/docker environments and leaves local untagged."""
    run = mlflow.active_run()
    tag = mlflow.get_run(run.info.run_id).data.tags.get(MLFLOW_PROJECT_ENV) if run else None
    return {"conda": "conda", "virtualenv": "virtualenv", "uv": "uv"}.get(tag or "", "local")


def run_pipeline(models: list[str], make_config: Callable[[str], TrainConfig]) -> str:
    """Validate every model's configuration (``make_config(model)``) first, then train each and register the best."""
    if not models:
        raise ConfigError("models is empty; name at least one zoo model.")
    configs = [make_config(model).validate() for model in models]
    base = configs[0]
    dataset = base.dataset
    with mlflow.start_run(run_name=f"main-{dataset}"):
        mlflow.set_tag("mlflow.runName", f"main-{dataset}")
        env_manager = caller_env_manager()
        mlflow.set_tags({"pipeline": "main", "models": ",".join(models), "target_dataset": dataset})
        for config in configs:
            print(f"== training {config.model} on {dataset}", flush=True)
            mlflow.run(str(PROJECT_DIR), entry_point="train", env_manager=env_manager, parameters=config.to_params())
        print(f"== registering the best {dataset} model", flush=True)
        mlflow.run(
            str(PROJECT_DIR),
            entry_point="register",
            env_manager=env_manager,
            parameters={"dataset": dataset, "metric": base.ranking_metric},
        )
    return f"trained {', '.join(models)} on {dataset} and registered the best"
