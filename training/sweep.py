"""Hyperparameter sweeps with Optuna, one MLflow parent run per sweep and a nested run per trial.

    mlflow run . -e sweep --env-manager local -P model=cnn -P dataset=organamnist -P trials=20
    python -m training.sweep --model cnn --dataset breastmnist --trials 10 --storage sqlite:///optuna.db

TPE samples the search space in ``configs/search_spaces.yaml``; a median pruner stops trials whose
per-epoch validation metric trails the others. The study lives in ``--storage`` (SQLite by default, any
SQLAlchemy URL such as PostgreSQL): running the same command again resumes it, and several workers started
with the same command on several machines share it.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass

import mlflow
import optuna

import zoo
from training import tracking
from training.config import ConfigError, TrainConfig
from training.data import DatasetError, dataset_info
from training.engine import EpochResult, StopTraining
from training.search_space import DEFAULT_SPACE_FILE, apply, load_space
from training.train import input_size_for, run_training

DEFAULT_STORAGE = "sqlite:///optuna.db"


@dataclass
class SweepResult:
    parent_run_id: str
    study: optuna.Study
    trials_run: int


def open_study(
    name: str, storage: str, direction: str = "maximize", pruning: bool = True, attempts: int = 5
) -> optuna.Study:
    """Create or load the study. Workers started together race to create the schema: retry a few times."""
    from sqlalchemy.exc import SQLAlchemyError

    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1) if pruning else optuna.pruners.NopPruner()
    )
    for attempt in range(attempts):
        try:
            # SQLite: wait for another worker's lock instead of failing at once.
            engine_kwargs = {"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else {}
            rdb = optuna.storages.RDBStorage(storage, engine_kwargs=engine_kwargs)
            return optuna.create_study(
                study_name=name,
                storage=rdb,
                direction=direction,
                load_if_exists=True,
                sampler=optuna.samplers.TPESampler(),
                pruner=pruner,
            )
        except (SQLAlchemyError, optuna.exceptions.DuplicatedStudyError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 + random.random())
    raise AssertionError("unreachable")


def check_buildable(config: TrainConfig) -> None:
    """Build the model once with these options, so a bad option value fails before the sweep starts."""
    info = dataset_info(config.dataset)
    size, _ = input_size_for(config)
    try:
        zoo.create_model(
            config.model,
            in_chans=info["channels"],
            num_classes=len(info["class_names"]),
            input_size=size,
            **{k: v for k, v in config.model_options().items() if k != "pretrained"},
        )
    except zoo.ZooError as err:
        raise ConfigError(f"search space: {err}") from None


def run_sweep(
    base: TrainConfig,
    trials: int,
    space_file: str = str(DEFAULT_SPACE_FILE),
    storage: str = DEFAULT_STORAGE,
    study_name: str = "",
    pruning: bool = True,
    progress: bool = True,
) -> SweepResult:
    """Validate everything, then run ``trials`` more trials of the (possibly existing) study."""
    if trials < 1:
        raise ConfigError(f"trials={trials} must be >= 1.")
    base.validate()
    dimensions = load_space(base.model, space_file)
    for dimension in dimensions:  # every listed value must give a valid configuration and model
        if dimension.kind == "categorical":
            for choice in dimension.choices:
                check_buildable(apply(base, {dimension.name: choice}).validate())
    study_name = study_name or f"{base.model}-{base.dataset}"
    study = open_study(study_name, storage, pruning=pruning)

    def objective(trial: optuna.Trial) -> float:
        config = apply(base, {d.name: d.suggest(trial) for d in dimensions})

        def report(epoch: EpochResult) -> None:
            trial.report(epoch.metrics[config.select_key], epoch.epoch)
            if trial.should_prune():
                raise StopTraining

        outcome = run_training(
            config,
            nested=True,
            on_epoch_end=report,
            progress=False,
            extra_tags={"sweep": study_name, "trial": str(trial.number)},
        )
        trial.set_user_attr("mlflow_run_id", outcome.run_id)
        if outcome.fit.stopped_early and trial.should_prune():
            mlflow.MlflowClient().set_tag(outcome.run_id, "pruned", "true")
            raise optuna.TrialPruned(f"pruned after epoch {len(outcome.fit.history)}")
        return outcome.fit.best_score

    tags = {"sweep": study_name, "model": base.model, "sweep_dataset": base.dataset}
    with tracking.tracked_run(f"sweep-{study_name}", tags) as parent:
        tracking.log_new_params(
            {
                "trials": trials,
                "study_name": study_name,
                "storage": _redact(storage),
                "space_file": space_file,
                "pruning": pruning,
                **{f"base_{k}": v for k, v in base.to_dict().items()},
            }
        )
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study.optimize(objective, n_trials=trials, show_progress_bar=progress, catch=())
        _log_study(study, base)
        return SweepResult(parent.info.run_id, study, trials)


def _redact(url: str) -> str:
    """Keep passwords of database URLs out of the tracking store."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def _log_study(study: optuna.Study, base: TrainConfig) -> None:
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    states = {state.name.lower(): sum(t.state == state for t in study.trials) for state in optuna.trial.TrialState}
    mlflow.log_metrics({f"trials_{k}": v for k, v in states.items()})
    if not completed:
        return
    best = study.best_trial
    mlflow.log_metrics({f"best_{base.select_key}": best.value, "best_trial": best.number})
    tracking.log_new_params({f"best_{k}": v for k, v in best.params.items()})
    mlflow.set_tag("best_run_id", best.user_attrs.get("mlflow_run_id", ""))
    tracking.log_json(
        {
            "number": best.number,
            "value": best.value,
            "params": best.params,
            "run_id": best.user_attrs.get("mlflow_run_id"),
        },
        "best_trial.json",
    )
    from optuna.visualization import matplotlib as optuna_plots

    tracking.log_figure(optuna_plots.plot_optimization_history(study).figure, "plots/optimization_history.png")
    if len(completed) >= 2:
        try:
            tracking.log_figure(optuna_plots.plot_param_importances(study).figure, "plots/param_importances.png")
        except (ValueError, RuntimeError) as err:  # e.g. every completed trial sampled the same values
            mlflow.set_tag("param_importances", f"not computed: {err}")


def main(argv: list[str] | None = None) -> int:
    from training.train import build_parser, config_from_args

    parser = build_parser()
    parser.prog = "python -m training.sweep"
    parser.description = __doc__
    parser.add_argument("--trials", type=int, default=20, help="trials this worker runs (added to the study)")
    parser.add_argument("--space-file", default=str(DEFAULT_SPACE_FILE))
    parser.add_argument("--storage", default=DEFAULT_STORAGE, help="Optuna storage: SQLAlchemy URL")
    parser.add_argument("--study-name", default="", help="default: <model>-<dataset>")
    parser.add_argument("--pruning", default="true", help="true/false: median pruning on the validation metric")
    args = parser.parse_args(argv)
    try:
        result = run_sweep(
            config_from_args(args),
            args.trials,
            args.space_file,
            args.storage,
            args.study_name,
            args.pruning.lower() in ("true", "1", "yes"),
            progress=not args.no_progress,
        )
    except (ConfigError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        if mlflow.active_run() is None:
            tracking.record_failure_before_start(str(err), f"sweep-{args.model}-{args.dataset}")
        return 2
    study = result.study
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = (
        f"best trial {study.best_trial.number}: {study.best_value:.4f} {study.best_params}"
        if done
        else "no trial completed"
    )
    print(f"sweep {study.study_name}: {len(study.trials)} trials in the study; {best}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
