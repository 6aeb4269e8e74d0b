"""The command line of every entry point, and the one place that turns errors into exit codes.

    python -m training.cli train --model cnn --dataset breastmnist --epochs 5
    python -m training.cli COMMAND --help     # COMMAND: train, sweep, leaderboard, pipeline, register, export,
                                              # classical, ensemble, robustness, study, runs, deploy

Each sub-command's flags are generated from dataclasses: :class:`training.core.config.TrainConfig` for everything
that trains, and the small option sets below. Training flags start from a named recipe (``--recipe``, default
``quick``): a flag given overrides the recipe's value, one not given takes it. MLproject's entry points call
these sub-commands with the same parameter names and types (``tests/test_project_files.py`` keeps them equal).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlflow

from serving.deploy import bentoml_home
from serving.deploy import deploy as deploy_champions
from training.core import distributed, termination
from training.core.config import TrainConfig, resolve
from training.core.options import AUTO, NONE, OptionError, help_of, option, parse_key_values, parser_for, to_text
from training.core.recipes import NOT_IN_RECIPES, config_from_recipe
from training.export.onnx import ExportOptions, export_run, write_onnx
from training.export.register import RegisterOptions, register_best
from training.tracking import orphans
from training.tracking.resume import resumption
from training.tracking.stores import BackendError, check_tracking, masked
from training.tracking.ui import runs_table_links
from training.workflows.classical import ClassicalConfig, run_classical
from training.workflows.ensemble import EnsembleConfig, run_ensemble
from training.workflows.leaderboard import LeaderboardOptions, run_leaderboard
from training.workflows.leaderboard import to_markdown as leaderboard_markdown
from training.workflows.pipeline import PipelineOptions, run_pipeline
from training.workflows.robustness import RobustnessOptions, run_robustness
from training.workflows.study.run import run_study
from training.workflows.study.spec import StudyOptions
from training.workflows.study.spec import describe as describe_study
from training.workflows.sweep import SweepOptions, run_sweep
from training.workflows.sweep import summary as sweep_summary
from training.workflows.train import MEMBERS_IN_ONE_PROCESS, DistributedOptions, ResumeOptions, run_training

# MLflow 3 starts a job runner with every server (eight huey consumer processes, ~3 s of CPU each to start) for
# GenAI jobs MedZoo never submits; off unless MLFLOW_SERVER_ENABLE_JOB_EXECUTION says otherwise (scripts/stack.sh too).
JOB_RUNNER_OFF = ("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")

DEFAULT_RECIPE = "quick"
MODEL_OPTION_FLAG = "--model."
ALL = "all"
FROM_RECIPE = "from the recipe"


# serving/ imports nothing of training/ (its contract), so the deploy command's options live here.
@dataclass
class DeployOptions:
    datasets: list = option([ALL], f"comma-separated datasets ({ALL}: every champion)")


@dataclass
class UiOptions:
    host: str = option("127.0.0.1", "address the MLflow UI listens on")
    port: int = option(5000, "port of the MLflow UI")


RUNS_ACTIONS = {
    "list": "every RUNNING run, and whether its process is alive, orphaned (this host, pid gone) or on another host",
    "reap": "mark the orphaned runs FAILED with the reason (then resume them with train --resume RUN_ID)",
}


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    run: Callable[[argparse.Namespace], str]
    # The option dataclasses whose fields become flags.
    options: tuple[type, ...]
    # The name of the run `mlflow run` creates for this entry point.
    run_name: Callable[[argparse.Namespace], str]
    # Training parameters this command takes (TrainConfig fields less these); None: it trains nothing.
    training_excludes: tuple[str, ...] | None = None
    # A positional ACTION argument (name -> help), the first the default: `runs list`, `runs reap`.
    actions: dict[str, str] | None = None
    # An MLproject entry point calls it (housekeeping commands are not runs of their own).
    entry_point: bool = True

    @property
    def trains(self) -> bool:
        return self.training_excludes is not None


def _flags(name: str) -> list[str]:
    """``--batch-size``, and ``--batch_size`` as `mlflow run` writes parameters MLproject does not declare."""
    dashed = f"--{name.replace('_', '-')}"
    return [dashed] if "_" not in name else [dashed, f"--{name}"]


def add_fields(parser: argparse.ArgumentParser, cls: type) -> None:
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        default = f.default if f.default is not dataclasses.MISSING else (f.default_factory() if has_default else None)
        group.add_argument(
            *_flags(f.name),
            dest=f.name,
            default=to_text(default) if has_default else None,
            required=not has_default,
            help=help_of(cls, f.name).replace("%", "%%"),
        )


def add_training_fields(parser: argparse.ArgumentParser, exclude: tuple[str, ...]) -> None:
    """TrainConfig's fields: the recipe's values unless given (recipes set no dataset, folder, seed or device)."""
    group = parser.add_argument_group("training (every value not given comes from the recipe)")
    for f in dataclasses.fields(TrainConfig):
        if f.name in exclude:
            continue
        default = None
        if f.name in NOT_IN_RECIPES:
            default = DEFAULT_RECIPE if f.name == "recipe" else to_text(f.default)
        group.add_argument(
            *_flags(f.name),
            dest=f.name,
            default=default,
            metavar=f.name.upper(),
            help=help_of(TrainConfig, f.name).replace("%", "%%"),
        )


def build(cls: type, args: argparse.Namespace, **values):
    """An instance of ``cls`` from the parsed text flags; a value that does not parse names the flag."""
    for f in dataclasses.fields(cls):
        if f.name not in values:
            values[f.name] = _parse(cls, f.name, getattr(args, f.name))
    return cls(**values)


def build_training(args: argparse.Namespace, exclude: tuple[str, ...] = (), **values) -> TrainConfig:
    """The recipe named by ``--recipe``, overridden by every training flag given."""
    for f in dataclasses.fields(TrainConfig):
        text = getattr(args, f.name, None)
        if f.name not in exclude and f.name != "recipe" and text is not None:
            values[f.name] = _parse(TrainConfig, f.name, text)
    if getattr(args, "model_options", None):
        values["model_kwargs"] = {**values.get("model_kwargs", {}), **args.model_options}
    return config_from_recipe(args.recipe, **values)


def model_options(extra: list[str]) -> dict:
    """``--model.filters 32,64 --model.kernel_size=5`` -> model options. One flag per option, so that `mlflow run`
    (``-P model.filters=32,64``) logs each as a plain value where a spaced ``model_kwargs`` string gets shell-quoted.
    """
    options, items = {}, list(extra)
    while items:
        flag = items.pop(0)
        if not flag.startswith(MODEL_OPTION_FLAG) or len(flag) == len(MODEL_OPTION_FLAG):
            raise OptionError(f"unrecognized argument {flag!r}; model options are passed as --model.<option> VALUE.")
        name, sep, value = flag[len(MODEL_OPTION_FLAG) :].partition("=")
        if not sep:
            if not items:
                raise OptionError(f"{flag} needs a value.")
            value = items.pop(0)
        options.update(parse_key_values(f"{name}={shlex.quote(value)}"))
    return options


def _parse(cls, name: str, text: str):
    try:
        return parser_for(cls, name)(text)
    except (OptionError, ValueError) as err:
        raise OptionError(f"{name}={text!r}: {err}") from None


# -- the sub-commands -----------------------------------------------------------------------------------------


def _progress(args) -> bool:
    return not args.no_progress


def train(args) -> str:

    resume = build(ResumeOptions, args).resume
    nproc, world = build(DistributedOptions, args).nproc, distributed.current()
    distributed.check_count(nproc)
    if world.distributed and nproc not in (1, world.size):
        raise distributed.DistributedError(f"nproc={nproc}, but torchrun started {world.size} processes.")
    if nproc > 1 and not world.distributed:  # check everything here, then run this command under torchrun
        if resume != NONE:
            raise distributed.DistributedError("a run goes on from its checkpoint in one process (nproc=1).")
        run = resolve(build_training(args))
        if run.config.members > 1:
            raise distributed.DistributedError(MEMBERS_IN_ONE_PROCESS)
        distributed.check(nproc, run.config.batch_size, run.device)
        distributed.launch(args.argv, nproc)
    if resume == NONE:
        outcome = run_training(build_training(args), progress=_progress(args))
    else:
        config, state = resumption(resume)
        # The run goes on as it was configured; only where the data lives and the device may differ now.
        overrides = {k: getattr(args, k) for k in ("data_dir", "device") if getattr(args, k) not in (None, AUTO)}
        config = dataclasses.replace(config, **{k: _parse(TrainConfig, k, v) for k, v in overrides.items()})
        _tag_project_run(**{"mlflow.runName": f"resume-{resume}", "medzoo.resumes": resume})
        outcome = run_training(config, progress=_progress(args), resume=state)
    if outcome is None:
        return f"rank {world.rank} of {world.size}: trained its share of every batch (rank 0 logs the run)"
    return outcome.summary()


def sweep(args) -> str:

    options = build(SweepOptions, args)
    result = run_sweep(build_training(args), options, progress=_progress(args))
    return sweep_summary(result)


def leaderboard(args) -> str:

    options = build(LeaderboardOptions, args)

    def make_config(model: str, dataset: str) -> TrainConfig:
        return build_training(args, exclude=("model", "dataset"), model=model, dataset=dataset)

    _, rows = run_leaderboard(options.models, options.datasets, make_config, progress=_progress(args))
    return leaderboard_markdown(rows)


def pipeline(args) -> str:

    options = build(PipelineOptions, args)
    return run_pipeline(options.models, lambda model: build_training(args, exclude=("model",), model=model))


def register(args) -> str:

    options = build(RegisterOptions, args)
    result = register_best(options.dataset, options.metric, options.force)
    _tag_project_run(
        registered_model=result.name,
        registered_version=result.version,
        source_run=result.run_id,
        champion_moved=str(result.promoted).lower(),
        outcome=result.message,
    )
    return result.message


def export(args) -> str:

    options = build(ExportOptions, args)
    result = export_run(options.run_id)
    output = "" if options.output == AUTO else options.output
    if output:
        write_onnx(result.proto, output)
    _tag_project_run(source_run=options.run_id, onnx_model=result.model_uri)
    return (
        f"exported run {options.run_id}: {result.model_uri}"
        + (f", file {output}" if output else "")
        + f"; parity: {result.parity.describe()}"
    )


def classical(args) -> str:

    outcome = run_classical(build(ClassicalConfig, args))
    return (
        f"run {outcome.run_id}: {outcome.best_params}, val acc {outcome.val_metrics['best_val_acc']:.4f}, "
        f"test acc {outcome.test_metrics['test_acc']:.4f}, test auc {outcome.test_metrics['test_auc']:.4f}; "
        f"ONNX parity: max |probability difference| {outcome.parity_max_diff:.1e}"
    )


def ensemble(args) -> str:

    outcome = run_ensemble(build(EnsembleConfig, args))
    weights = ", ".join(f"{w:.3f}" for w in outcome.weights)
    members = ", ".join(f"{v:.4f}" for v in outcome.member_val_acc)
    return (
        f"run {outcome.run_id}: weights {weights}; val acc {outcome.val_metrics['best_val_acc']:.4f} "
        f"(members {members}), test acc {outcome.test_metrics['test_acc']:.4f}, "
        f"test auc {outcome.test_metrics['test_auc']:.4f}"
    )


def robustness(args) -> str:

    outcome = run_robustness(build(RobustnessOptions, args), progress=_progress(args))
    s = outcome.summary
    rows = [
        f"  {name:<18} " + " ".join(f"{acc:.3f}" for acc in accuracies) for name, accuracies in outcome.scores.items()
    ]
    return "\n".join(
        [
            f"run {outcome.run_id}: balanced accuracy on {s['images']} test images, by severity 1-5",
            f"  {'clean':<18} {s['clean_balanced_acc']:.3f}",
            *rows,
            f"corrupted (mean) {s['corrupted_balanced_acc']:.3f}, BE {s['be']:.3f}, rBE {s['rbe']:.3f}; "
            f"worst: {s['worst_corruption']} ({s['worst_balanced_acc']:.3f})",
        ]
    )


def deploy(args) -> str:

    options = build(DeployOptions, args)
    lines = deploy_champions(None if options.datasets == [ALL] else options.datasets)
    _tag_project_run(deployed="; ".join(lines))
    return "\n".join(lines + [f"serve with: bentoml serve serving.service:MedZoo (BentoML home: {bentoml_home()})"])


def study(args) -> str:

    options = build(StudyOptions, args)
    if options.dry_run:
        return describe_study(options)
    outcome = run_study(options, progress=_progress(args))
    return f"study run {outcome.run_id} ({len(outcome.run_ids)} nested runs):\n\n{outcome.report_markdown}"


def ui(args) -> str:
    """Print the runs-table link of every experiment, then become `mlflow ui` on this tracking store. On a
    tracking server (http URI) the links point at that server and nothing is started."""
    options, uri = build(UiOptions, args), mlflow.get_tracking_uri()
    served_elsewhere = uri.startswith(("http://", "https://"))
    base = uri if served_elsewhere else f"http://{options.host}:{options.port}"
    links = runs_table_links(base)
    width = max((len(name) for name, _ in links), default=0)
    lines = [f"MLflow UI for {masked(uri)}; each experiment's runs table:"]
    lines += [f"  {name:<{width}}  {link}" for name, link in links] or ["  (no experiments yet: train something first)"]
    if served_elsewhere:
        return "\n".join(lines)
    print("\n".join(lines), flush=True)
    command = ["mlflow", "ui", "--backend-store-uri", uri, "--host", options.host, "--port", str(options.port)]
    os.environ.setdefault(*JOB_RUNNER_OFF)
    os.execvp(command[0], command)


def runs(args) -> str:

    if args.action == "list":
        found = orphans.running_runs()
        return "\n".join(orphans.describe(r) for r in found) if found else "no RUNNING runs"
    reaped = orphans.reap()
    return "\n".join(f"marked FAILED: {orphans.describe(r)}" for r in reaped) if reaped else "no orphaned runs"


COMMANDS = {
    c.name: c
    for c in (
        Command(
            "train",
            "train one model on one dataset as one MLflow run",
            train,
            (ResumeOptions, DistributedOptions),
            run_name=lambda a: f"{a.model or 'recipe'}-{a.dataset or TrainConfig.dataset_default()}",
            training_excludes=(),
        ),
        Command(
            "sweep",
            "Optuna hyperparameter sweep, a nested run per trial",
            sweep,
            (SweepOptions,),
            run_name=lambda a: f"sweep-{a.model or 'recipe'}-{a.dataset or TrainConfig.dataset_default()}",
            training_excludes=(),
        ),
        Command(
            "leaderboard",
            "train several models on several datasets with one recipe and compare",
            leaderboard,
            (LeaderboardOptions,),
            run_name=lambda a: "leaderboard",
            training_excludes=("model", "dataset"),
        ),
        Command(
            "pipeline",
            "train several models on one dataset, then register the best",
            pipeline,
            (PipelineOptions,),
            run_name=lambda a: f"main-{a.dataset or TrainConfig.dataset_default()}",
            training_excludes=("model",),
        ),
        Command(
            "register",
            "register a dataset's best run as a parity-checked ONNX model version",
            register,
            (RegisterOptions,),
            run_name=lambda a: f"register-{a.dataset}",
        ),
        Command(
            "export",
            "export a run's model to a parity-checked ONNX file, logged to that run",
            export,
            (ExportOptions,),
            run_name=lambda a: f"export-{a.run_id}",
        ),
        Command(
            "classical",
            "a scikit-learn estimator (svm, rf, dt, knn, logreg) on a run's CNN features or on the pixels",
            classical,
            (ClassicalConfig,),
            run_name=lambda a: f"{a.model}-{a.dataset}",
        ),
        Command(
            "ensemble",
            "weighted average of the class probabilities of finished runs of one dataset",
            ensemble,
            (EnsembleConfig,),
            run_name=lambda a: "ensemble",
        ),
        Command(
            "robustness",
            "balanced accuracy of a run or registered version on its dataset's MedMNIST-C corruptions",
            robustness,
            (RobustnessOptions,),
            run_name=lambda a: "robustness",
        ),
        Command(
            "study",
            "a notebook study as nested runs (configs/studies/NAME.yaml), reported vs measured",
            study,
            (StudyOptions,),
            run_name=lambda a: f"study-{Path(a.name).stem}",
        ),
        Command(
            "ui",
            "print each experiment's runs-table link, then start the MLflow UI on this tracking store",
            ui,
            (UiOptions,),
            run_name=lambda a: "ui",
            entry_point=False,
        ),
        Command(
            "runs",
            "RUNNING runs whose process died (kill -9, power loss): list them, or reap them (mark them FAILED)",
            runs,
            (),
            run_name=lambda a: f"runs-{a.action}",
            actions=RUNS_ACTIONS,
            entry_point=False,
        ),
        Command(
            "deploy",
            "import the registry champions into the BentoML model store",
            deploy,
            (DeployOptions,),
            run_name=lambda a: "deploy",
        ),
    )
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.cli", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS.values():
        sub = commands.add_parser(
            command.name,
            help=command.help,
            description=command.help,
            formatter_class=ArgumentDefaultsFormatter,
            allow_abbrev=False,  # --model.<option> flags must not be read as an abbreviation of --model
        )
        if command.actions:
            choices = "; ".join(f"{name}: {text}" for name, text in command.actions.items())
            sub.add_argument(
                "action",
                nargs="?",
                choices=list(command.actions),
                default=next(iter(command.actions)),
                help=choices.replace("%", "%%"),
            )
        if command.trains:
            add_training_fields(sub, command.training_excludes)
        for cls in command.options:
            add_fields(sub, cls)
        sub.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


EMPTY = '""'


class ArgumentDefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default, empty ones too."""

    def _get_help_string(self, action):
        if not action.option_strings or action.default is argparse.SUPPRESS or action.required:
            return action.help
        if action.default is None:
            return f"{action.help} (default: {FROM_RECIPE})"
        return f"{action.help} (default: {action.default or EMPTY})"


def is_user_error(err: BaseException) -> bool:
    """Errors the project raises about its input (bad values, missing files, nothing to register, ...)."""
    return isinstance(err, ValueError) and type(err).__module__.split(".")[0] in ("training", "zoo", "serving")


def _project_run_id() -> str | None:
    """The run `mlflow run` created for this entry point, when that is how we were started."""
    return os.environ.get("MLFLOW_RUN_ID")


def _tag_project_run(**tags: str) -> None:
    run_id = _project_run_id()
    if run_id and mlflow.active_run() is None:
        client = mlflow.MlflowClient()
        for key, value in tags.items():
            client.set_tag(run_id, key, str(value)[:5000])


def _record_failure(message: str, run_name: str) -> None:
    """A run `mlflow run` created for us that failed before training took it over: name it and say why."""
    run_id = _project_run_id()
    if run_id and mlflow.active_run() is None:
        client = mlflow.MlflowClient()
        client.set_tag(run_id, "medzoo.error", message[:5000])
        client.set_tag(run_id, "mlflow.runName", run_name)


def main(argv: list[str] | None = None) -> int:
    with termination.handling_sigterm():
        try:
            return _main(argv)
        except termination.Terminated as err:  # before or after a run's own handling: still exit 143
            print(f"{err}", file=sys.stderr)
            return termination.EXIT_CODE


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    command = COMMANDS[args.command]
    try:
        args.model_options = model_options(extra) if command.trains else {}
        if extra and not command.trains:
            raise OptionError(f"unrecognized arguments: {' '.join(extra)}")
    except OptionError as err:
        parser.error(str(err))
    run_name = command.run_name(args)
    if not command.trains:
        _tag_project_run(**{"mlflow.runName": run_name})
    try:
        check_tracking()
        print(command.run(args))
    except BackendError as err:  # nothing can be recorded where the store is out of reach
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(f"{err or 'interrupted'}: the run was marked KILLED", file=sys.stderr)
        return termination.EXIT_CODE if isinstance(err, termination.Terminated) else 130
    except Exception as err:
        if not is_user_error(err):
            raise
        print(f"error: {err}", file=sys.stderr)
        _record_failure(str(err), run_name)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
