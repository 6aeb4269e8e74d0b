"""Train one zoo model on one dataset as one MLflow run.

    python -m training.cli train --model cnn --dataset breastmnist --epochs 5
    mlflow run . -e train --env-manager local -P model=mobilenetv2

The validation split selects the best epoch; the test split is evaluated once, at the end, with those
weights. Everything later steps need is logged with the model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import mlflow
import numpy as np
import torch
from sklearn.metrics import classification_report

import zoo
from contract import ModelCard, Preprocessing
from training import distributed, plots, policy, tracking
from training.checkpoint import CheckpointError, RollingCheckpoint, load_checkpoint
from training.config import ConfigError, TrainConfig
from training.data import ImageDataset, load_dataset
from training.distributed import World
from training.engine import EpochResult, FitOptions, FitResult, evaluate, fit, resolve_device
from training.options import NONE, to_text

if TYPE_CHECKING:
    from training.members import MembersOutcome


class ResumeError(ConfigError):
    """A run that cannot be resumed; the message says why and what to do."""


MEMBERS_IN_ONE_PROCESS = "members > 1 train one after the other in one process (nproc=1)."


@dataclass
class TrainOutcome:
    run_id: str
    fit: FitResult
    val_metrics: dict[str, float]
    test_metrics: dict[str, float]
    model_uri: str

    def summary(self) -> str:
        val, test = self.val_metrics, self.test_metrics
        return (
            f"run {self.run_id}: best epoch {self.fit.best_epoch}, val acc {val['best_val_acc']:.4f}, "
            f"test acc {test['test_acc']:.4f}, test auc {test['test_auc']:.4f}, "
            f"{self.fit.images_per_second:.0f} images/s"
        )


def input_size_for(config: TrainConfig) -> tuple[int, list[str]]:
    """The requested size, raised to the model's minimum where the architecture needs more."""
    minimum = zoo.get_model_config(config.model).min_input_size
    if config.size >= minimum:
        return config.size, []
    return minimum, [f"size raised from {config.size} to {minimum} px, the minimum for {config.model}"]


def build_model(config: TrainConfig, dataset: ImageDataset) -> tuple[torch.nn.Module, Preprocessing]:
    """The zoo model wrapped with its normalisation: pretrained mean/std, else the train split's z-score."""
    model_config = zoo.get_model_config(config.model)
    backbone = zoo.create_model(
        config.model,
        in_chans=dataset.channels,
        num_classes=dataset.num_classes,
        input_size=dataset.size,
        **config.model_options(),
    )
    if config.uses_pretrained:
        mean, std = model_config.pretrained_mean, model_config.pretrained_std
        if dataset.channels == 1:  # timm folds RGB stems into one channel; fold the statistics alike
            mean, std = (float(np.mean(mean)),), (float(np.mean(std)),)
    else:
        mean, std = dataset.channel_stats()
    preprocessing = Preprocessing(input_size=dataset.size, in_chans=dataset.channels, mean=mean, std=std)
    if config.freeze != "none":
        try:
            zoo.freeze(backbone, config.freeze)
        except zoo.ZooError as err:
            raise ConfigError(str(err)) from None
    return zoo.NormalizedClassifier(backbone, mean, std), preprocessing


def fit_options(
    config: TrainConfig, dataset: ImageDataset, model: torch.nn.Module, device: str, world: World = World()
) -> FitOptions:
    """The engine's settings for this run: the config with dataset-dependent choices (augmentation) resolved."""
    return FitOptions(
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        optimizer=config.optimizer,
        weight_decay=config.weight_decay,
        l1=config.l1,
        scheduler=config.scheduler,
        warmup_epochs=config.warmup_epochs,
        patience=config.patience,
        select_metric=config.select_key,
        seed=config.seed,
        label_smoothing=config.label_smoothing,
        mixup=config.mixup,
        cutmix=config.cutmix,
        ema=config.ema,
        clip_grad=config.clip_grad,
        class_balance=config.class_balance,
        augment=policy.resolve_augment(config.augment, dataset.name, dataset.channels),
        head_lr=config.head_lr,
        head_parameters=zoo.head_parameter_names(model.backbone, prefix="backbone."),
        device=device,
        world=world,
    )


def _load(config: TrainConfig, size: int) -> ImageDataset:
    return load_dataset(
        config.dataset,
        config.data_path,
        size=size,
        max_train_samples=config.max_train_samples or None,
        seed=config.seed,
    )


def _train_share(config: TrainConfig, device: str, world: World) -> None:
    """A rank other than 0: the same data and model, its share of every batch, nothing logged."""
    dataset = _load(config, input_size_for(config)[0])
    model, _ = build_model(config, dataset)
    options = fit_options(config, dataset, model, device, world)
    fit(model, dataset.train, dataset.val, dataset.class_names, options, progress=False)


def run_training(
    config: TrainConfig,
    *,
    nested: bool = False,
    on_epoch_end: Callable[[EpochResult], None] | None = None,
    extra_tags: dict | None = None,
    progress: bool = True,
    resume: Resumption | None = None,
) -> TrainOutcome | MembersOutcome | None:
    """Validate, then train and track one run. Bad values fail before any run is created.

    ``members > 1`` trains that many member runs and their ensemble in one parent run (training.members).

    A checkpoint is written after every epoch; ``resume`` (from :func:`resumption`) continues a stopped run in
    that same MLflow run from its last checkpoint. Under torchrun every rank calls this: rank 0 trains and logs
    the run, the others train their share and return None.
    """
    config.validate()
    device = resolve_device(config.device)
    world = distributed.current()
    if config.members > 1:
        if world.distributed:
            raise distributed.DistributedError(MEMBERS_IN_ONE_PROCESS)
        from training.members import train_members

        run_id = resume.run_id if resume else None
        return train_members(config, nested=nested, extra_tags=extra_tags, progress=progress, resume_run_id=run_id)
    distributed.check(world.size, config.batch_size, device)
    if resume is not None and world.distributed:
        raise distributed.DistributedError("a run goes on from its checkpoint in one process (nproc=1).")
    distributed.setup(world, device)
    if not world.is_main:
        _train_share(config, device, world)
        distributed.teardown()
        return None
    size, notes = input_size_for(config)
    tta_views = policy.resolve_tta(config.tta, config.dataset)
    torch.manual_seed(config.seed)
    tags = {
        "model": config.model,
        "dataset": config.dataset,
        "size": str(size),
        "recipe": config.recipe,
        "device": device,
        **(extra_tags or {}),
    }
    run_name = f"{config.model}-{config.dataset}"
    run_id = resume.run_id if resume else None
    with tracking.tracked_run(run_name, tags, nested=nested, experiment=config.dataset, run_id=run_id) as run:
        started = time.perf_counter()
        dataset = _load(config, size)
        model, preprocessing = build_model(config, dataset)
        n_params = sum(p.numel() for p in model.parameters())
        tracking.log_new_params(
            {
                **config.to_params(),
                "resume": NONE,  # what `mlflow run -P resume=...` logs for a new run, so both ways log alike
                "nproc": world.size,
                **{f"model.{k}": to_text(v) for k, v in config.model_kwargs.items()},
                "input_size": size,
                "in_chans": dataset.channels,
                "num_classes": dataset.num_classes,
                "task": dataset.task,
                "mean": to_text(preprocessing.mean),
                "std": to_text(preprocessing.std),
                "train_samples": len(dataset.train),
                "val_samples": len(dataset.val),
                "test_samples": len(dataset.test),
            }
        )
        if resume is None:
            tracking.log_dataset(dataset)
        tracking.log_notes(notes + dataset.notes)

        def log_epoch(result: EpochResult) -> None:
            mlflow.log_metrics(result.metrics, step=result.epoch)
            if on_epoch_end is not None:
                on_epoch_end(result)

        options = fit_options(config, dataset, model, device, world)
        tracking.log_new_params(
            {"augment_ops": to_text(options.augment) or "none", "tta_views": to_text(tta_views) or "none"}
        )
        if resume is not None:
            _relog_missing_epochs(run.info.run_id, resume.state)
            mlflow.set_tag("medzoo.resumed_from_epoch", str(resume.state["epoch"]))
        fit_result = fit(
            model,
            dataset.train,
            dataset.val,
            dataset.class_names,
            options,
            log_epoch,
            progress,
            on_checkpoint=RollingCheckpoint(run.info.run_id),
            resume=resume.state if resume else None,
        )
        distributed.teardown()
        if fit_result.data_parallel is not None:
            tracking.log_json(fit_result.data_parallel, "distributed.json")
        mlflow.set_tag("selected_weights", fit_result.best_weights)
        # The final model averages the test-time views inside itself, so export and serving answer the same.
        model = zoo.TTAClassifier(model, tta_views) if tta_views else model
        # Selection is done; the test split is touched exactly once, with the selected weights.
        val_metrics, val_probs = evaluate(model, dataset.val, dataset.class_names, "best_val")
        test_metrics, test_probs = evaluate(model, dataset.test, dataset.class_names, "test")
        mlflow.log_metrics(
            {
                **val_metrics,
                **test_metrics,
                "best_epoch": fit_result.best_epoch,
                "train_time": fit_result.train_time,
                "train_images_per_sec": fit_result.images_per_second,
                "n_params": n_params,
                "wall_time": time.perf_counter() - started,
            }
        )
        mlflow.set_tag("stopped_early", str(fit_result.stopped_early))
        _log_reports(config, dataset, fit_result, val_probs, test_probs)
        card = ModelCard(
            architecture=config.model,
            dataset=dataset.name,
            task=dataset.task,
            class_names=tuple(dataset.class_names),
            preprocessing=preprocessing,
            model_options={k: to_text(v) for k, v in config.model_options().items()},
            tta=tta_views,
        ).with_run(run.info.run_id, {**val_metrics, **test_metrics, "n_params": n_params})
        model_info = tracking.log_model(model.cpu(), dataset.val.images[: tracking.PARITY_IMAGES], card)
        return TrainOutcome(run.info.run_id, fit_result, val_metrics, test_metrics, model_info.model_uri)


@dataclass
class Resumption:
    run_id: str
    state: dict | None  # the last checkpoint; None for a members parent, whose members hold theirs


RESUMABLE = ("FAILED", "KILLED")


def resumption(run_id: str) -> tuple[TrainConfig, Resumption]:
    """The configuration and last checkpoint of a stopped run; ResumeError says why a run cannot go on."""
    from training.runs import process_state

    try:
        run = mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise ResumeError(f"resume={run_id!r}: no such run in {mlflow.get_tracking_uri()}.") from None
    status = run.info.status
    if status == "RUNNING":
        state = process_state(run)
        if state != "orphaned":
            raise ResumeError(f"resume={run_id!r}: the run is still running ({state}); stop it first.")
    elif status not in RESUMABLE:
        raise ResumeError(f"resume={run_id!r}: the run is {status}; only FAILED, KILLED or orphaned runs go on.")
    if tracking.is_members_parent(run):  # its members hold the checkpoints
        return config_from_params(run.data.params), Resumption(run_id, None)
    if run.data.tags.get("kind", "train") != "train" or "model" not in run.data.params:
        raise ResumeError(f"resume={run_id!r} is not a training run.")
    try:
        state = load_checkpoint(run_id)
    except CheckpointError as err:
        raise ResumeError(str(err)) from None
    return config_from_params(run.data.params), Resumption(run_id, state)


def config_from_params(params: dict[str, str]) -> TrainConfig:
    """The TrainConfig a run logged (every field as text), parsed back."""
    from training.options import parser_for

    return TrainConfig(**{name: parser_for(TrainConfig, name)(params[name]) for name in TrainConfig.field_names()})


def _relog_missing_epochs(run_id: str, state: dict) -> None:
    """Epochs the checkpoint holds but the run lost (killed between checkpoint and logging): log them."""
    logged = {m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "train_loss")}
    for epoch, metrics in state["result"]["history"]:
        if epoch not in logged:
            mlflow.log_metrics(metrics, step=epoch)


def _log_reports(config, dataset: ImageDataset, fit_result: FitResult, val_probs, test_probs) -> None:
    names = dataset.class_names
    title = f"{config.model} on {dataset.name} ({dataset.size} px)"
    labels = {split: dataset.split(split).labels.numpy() for split in ("val", "test")}
    tracking.log_confusion_matrices(labels, {"val": val_probs, "test": test_probs}, names, title)
    tracking.log_figure(
        plots.learning_curves_figure(fit_result.history, fit_result.best_epoch, title), "plots/learning_curves.png"
    )
    test = dataset.test
    tracking.log_figure(
        plots.mistakes_figure(
            test.images.numpy(), test.labels.numpy(), test_probs, names, f"{title}: most confident test mistakes"
        ),
        "plots/test_mistakes.png",
    )
    report = classification_report(
        test.labels.numpy(),
        test_probs.argmax(1),
        labels=list(range(len(names))),
        target_names=names,
        digits=4,
        zero_division=0,
    )
    mlflow.log_text(report, "reports/test_classification_report.txt")
    tracking.log_json(
        {
            "config": config.to_dict(),
            "input_size": dataset.size,
            "notes": dataset.notes,
            "best_epoch": fit_result.best_epoch,
        },
        "config.json",
    )


if __name__ == "__main__":  # python -m training.train ... is `python -m training.cli train ...`
    import sys

    from training.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
