"""Hyperparameter sweeps with Optuna, one MLflow parent run per sweep and a nested run per trial.

    mlflow run . -e sweep --env-manager local -P model=cnn -P dataset=organamnist -P trials=20
    python -m training.cli sweep --model cnn --dataset breastmnist --trials 10 --storage sqlite:///optuna.db

TPE samples the search space in ``configs/search_spaces.yaml``; a median pruner stops trials whose
per-epoch validation metric trails the others. The study lives in ``storage`` ($MEDZOO_OPTUNA_STORAGE or a
local SQLite file by default, any SQLAlchemy URL such as PostgreSQL): running the same command again resumes
it, and several workers started with the same command, on one machine or several, share it. The study
remembers its MLflow parent run: every later worker nests its trials under that first parent.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import socket
import time
import warnings
from dataclasses import dataclass

import mlflow
import optuna

import zoo
from training.core.config import ConfigError, TrainConfig, resolve
from training.core.data import dataset_info
from training.core.engine import EpochResult, StopTraining
from training.core.options import AUTO, option
from training.tracking import lifecycle, records, stores
from training.tracking.orphans import ORPHANED, is_alive, process_state
from training.workflows.search_space import apply, load_space
from training.workflows.train import run_training

# The study's user attribute holding its MLflow parent run.
PARENT_RUN_ATTR = "mlflow_parent_run_id"
# A trial's worker (host, pid): a trial whose worker died is failed when a sweep starts again.
WORKER_ATTR = "worker"
# Optuna's heartbeat: a RUNNING trial without a beat for this long is failed by the next worker (any host).
HEARTBEAT_S, GRACE_S = 30, 120


@dataclass
class SweepOptions:
    trials: int = option(20, "trials this worker runs (added to the study's count)")
    space_file: str = option("configs/search_spaces.yaml", "YAML search space (relative: to here, else the project)")
    storage: str = option(
        AUTO, f"Optuna storage as an SQLAlchemy URL ({AUTO}: $MEDZOO_OPTUNA_STORAGE, else sqlite:///optuna.db)"
    )
    study_name: str = option(AUTO, f"the study's name ({AUTO}: <model>-<dataset>)")
    pruning: bool = option(True, "median pruning on the per-epoch validation metric")


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
            with warnings.catch_warnings():  # the heartbeat is marked experimental on every use
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                rdb = optuna.storages.RDBStorage(
                    storage, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S
                )
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
    size = resolve(config).input_size
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


def run_sweep(base: TrainConfig, options: SweepOptions, progress: bool = True) -> SweepResult:
    """Validate everything, then run ``options.trials`` more trials of the (possibly existing) study."""
    if options.trials < 1:
        raise ConfigError(f"trials={options.trials} must be >= 1.")
    base.validate()
    if base.select_metric == "last":
        raise ConfigError("select_metric='last' ranks nothing; a sweep compares trials on auc or acc.")
    if base.members > 1:
        raise ConfigError(f"members={base.members}: a sweep trial is one network (members=1).")
    dimensions = load_space(base.model, options.space_file)
    for dimension in dimensions:  # every listed value must give a valid configuration and model
        if dimension.kind == "categorical":
            for choice in dimension.choices:
                check_buildable(apply(base, {dimension.name: choice}).validate())
    study_name = base.model + "-" + base.dataset if options.study_name == AUTO else options.study_name
    storage = stores.optuna_storage(options.storage)
    stores.check_database(storage, "the Optuna storage")
    study = open_study(study_name, storage, pruning=options.pruning)

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr(WORKER_ATTR, [socket.gethostname(), os.getpid()])
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
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with contextlib.ExitStack() as parent_scope:
        # Workers started together: one at a time finds the study's parent or opens it, so all share the first,
        # and writes on it and on dead trials' runs (MLflow's SQL store writes a tag as select-then-insert).
        with study_lock(storage, study_name):
            parent = parent_scope.enter_context(
                lifecycle.tracked_run(
                    f"sweep-{study_name}", tags, run_id=_first_parent(study, study_name), experiment=base.dataset
                )
            )
            study.set_user_attr(PARENT_RUN_ATTR, parent.info.run_id)
            records.log_new_params(
                {
                    "study_name": study_name,
                    "storage": stores.masked(storage),
                    "space_file": options.space_file,
                    "pruning": str(options.pruning).lower(),
                    **{f"base_{k}": v for k, v in base.to_params().items()},
                }
            )
            for line in fail_dead_trials(study, study_name):
                print(line, flush=True)
        study.optimize(objective, n_trials=options.trials, show_progress_bar=progress, catch=())
        log_study_results(study, base, storage)
        return SweepResult(parent.info.run_id, study, options.trials)


@contextlib.contextmanager
def study_lock(storage: str, study_name: str, timeout_s: int = 600):
    """A lock named after the study, held in its storage: PostgreSQL's advisory lock or MySQL's GET_LOCK for
    workers on several machines, a file beside an SQLite storage for workers on one. Optuna has no such lock."""
    import sqlalchemy

    key = hashlib.sha256(f"medzoo-sweep|{study_name}".encode()).digest()
    if storage.startswith("sqlite"):
        from filelock import FileLock

        path = sqlalchemy.engine.make_url(storage).database or "optuna"
        with FileLock(f"{path}.{key.hex()[:12]}.lock", timeout=timeout_s):
            yield
        return
    if storage.startswith("postgresql"):
        take, give = "SELECT pg_advisory_lock(:key)", "SELECT pg_advisory_unlock(:key)"
        key_value = int.from_bytes(key[:8], "big", signed=True)
    elif storage.startswith("mysql"):
        take, give = f"SELECT GET_LOCK(:key, {timeout_s})", "SELECT RELEASE_LOCK(:key)"
        key_value = key.hex()[:32]
    else:
        raise ConfigError(f"storage={stores.masked(storage)!r}: sweeps take SQLite, PostgreSQL or MySQL storages.")
    engine = sqlalchemy.create_engine(storage, poolclass=sqlalchemy.pool.NullPool)
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text(take), {"key": key_value})
        try:
            yield
        finally:
            connection.execute(sqlalchemy.text(give), {"key": key_value})


def fail_dead_trials(study: optuna.Study, study_name: str) -> list[str]:
    """Trials left RUNNING by a killed worker: FAILED in Optuna (their worker's pid is gone on this host, or
    Optuna's heartbeat expired) and their MLflow runs FAILED with the reason. Returns what was done."""
    here = socket.gethostname()
    storage = study._storage  # Optuna's public way to change a trial's state from outside its objective
    done = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        host, pid = trial.user_attrs.get(WORKER_ATTR, [None, None])
        if host == here and pid and not is_alive(pid):
            storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
    with warnings.catch_warnings():  # other hosts' dead workers, once the heartbeat's grace period is over
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    failed = {t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))}
    client = mlflow.MlflowClient()
    experiments = [e.experiment_id for e in mlflow.search_experiments()]
    running = mlflow.search_runs(
        experiment_ids=experiments,
        filter_string=f"tags.sweep = '{study_name}' and attributes.status = 'RUNNING'",
        output_format="list",
    )
    for run in running:
        trial = run.data.tags.get("trial")
        if trial is None or not (int(trial) in failed or process_state(run) == ORPHANED):
            continue
        reason = f"trial {trial}'s worker died mid-trial; the trial is FAILED in the Optuna study too"
        client.set_tag(run.info.run_id, lifecycle.ERROR_TAG, reason)
        client.set_terminated(run.info.run_id, "FAILED")
        done.append(f"marked FAILED: run {run.info.run_id} of trial {trial} (its worker died)")
    return done


def _first_parent(study: optuna.Study, study_name: str) -> str | None:
    """The run the study's first worker opened as parent, if it still exists."""
    parent_id = study.user_attrs.get(PARENT_RUN_ATTR)
    if not parent_id or not _run_exists(parent_id):
        return None
    project_run = os.environ.get("MLFLOW_RUN_ID")
    if project_run and project_run != parent_id:
        # `mlflow run` made a run for this worker; it stays empty and points at the parent it continues.
        client = mlflow.MlflowClient()
        client.set_tag(project_run, "mlflow.runName", f"sweep-{study_name}-worker")
        client.set_tag(project_run, "sweep_parent_run", parent_id)
    return parent_id


def _run_exists(run_id: str) -> bool:
    try:
        return mlflow.get_run(run_id).info.lifecycle_stage == "active"
    except mlflow.exceptions.MlflowException:
        return False


def log_study_results(study: optuna.Study, base: TrainConfig, storage: str) -> None:
    """The study's best trial and plots on the active parent run, one worker at a time: workers that share the
    parent finish together, and MLflow's SQL store writes a tag as select-then-insert, so two workers setting
    `best_run_id` at once make one of them fail on a duplicate key (seen on PostgreSQL)."""
    with study_lock(storage, study.study_name):
        _log_study(study, base)


def _log_study(study: optuna.Study, base: TrainConfig) -> None:  # called under the study lock only
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    states = {state.name.lower(): sum(t.state == state for t in study.trials) for state in optuna.trial.TrialState}
    mlflow.log_metrics({f"trials_{k}": v for k, v in states.items()})
    if not completed:
        return
    best = study.best_trial
    mlflow.log_metrics({f"best_{base.select_key}": best.value, "best_trial": best.number})
    # Tags, not params: a resumed study may find a better trial, and params cannot change.
    mlflow.set_tags({f"best_{k}": str(v) for k, v in best.params.items()})
    mlflow.set_tag("best_run_id", best.user_attrs.get("mlflow_run_id", ""))
    records.log_json(
        {
            "number": best.number,
            "value": best.value,
            "params": best.params,
            "run_id": best.user_attrs.get("mlflow_run_id"),
        },
        "best_trial.json",
    )
    from optuna.visualization import matplotlib as optuna_plots

    with warnings.catch_warnings():
        # Optuna marks its matplotlib plots experimental and says so on every call; nothing a user can act on.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        records.log_figure(optuna_plots.plot_optimization_history(study).figure, "plots/optimization_history.png")
        if len(completed) >= 2:
            try:
                records.log_figure(optuna_plots.plot_param_importances(study).figure, "plots/param_importances.png")
            except (ValueError, RuntimeError) as err:  # e.g. every completed trial sampled the same values
                mlflow.set_tag("param_importances", f"not computed: {err}")


def summary(result: SweepResult) -> str:
    study = result.study
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = (
        f"best trial {study.best_trial.number}: {study.best_value:.4f} {study.best_params}"
        if done
        else "no trial completed"
    )
    return f"sweep {study.study_name}: {len(study.trials)} trials in the study; {best}"
