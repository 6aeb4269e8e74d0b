"""Train one zoo model on one dataset as one MLflow run.

    python -m training.train --model cnn --dataset breastmnist --epochs 5
    mlflow run . -e train --env-manager local -P model=mobilenetv2

The validation split selects the best epoch; the test split is evaluated once, at the end, with those
weights. Everything later steps need is logged with the model.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Callable

import mlflow
import numpy as np
import torch
from sklearn.metrics import classification_report

import zoo
from training import plots, tracking
from training.config import ConfigError, TrainConfig, parse_model_kwargs
from training.data import DatasetError, ImageDataset, load_dataset
from training.engine import EpochResult, FitResult, evaluate, fit
from training.metrics import confusion


@dataclass
class TrainOutcome:
    run_id: str
    fit: FitResult
    val_metrics: dict[str, float]
    test_metrics: dict[str, float]
    model_uri: str


def input_size_for(config: TrainConfig) -> tuple[int, list[str]]:
    """The requested size, raised to the model's minimum where the architecture needs more."""
    minimum = zoo.get_model_config(config.model).min_input_size
    if config.size >= minimum:
        return config.size, []
    return minimum, [f"size raised from {config.size} to {minimum} px, the minimum for {config.model}"]


def build_model(config: TrainConfig, dataset: ImageDataset) -> tuple[torch.nn.Module, zoo.Preprocessing]:
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
    preprocessing = zoo.Preprocessing(input_size=dataset.size, in_chans=dataset.channels, mean=mean, std=std)
    return zoo.NormalizedClassifier(backbone, mean, std), preprocessing


def run_training(
    config: TrainConfig,
    *,
    nested: bool = False,
    on_epoch_end: Callable[[EpochResult], None] | None = None,
    extra_tags: dict | None = None,
    progress: bool = True,
) -> TrainOutcome:
    """Validate, then train and track one run. Bad values fail before any run is created."""
    config.validate()
    size, notes = input_size_for(config)
    torch.manual_seed(config.seed)
    tags = {"model": config.model, "dataset": config.dataset, "size": str(size), **(extra_tags or {})}
    with tracking.tracked_run(f"{config.model}-{config.dataset}", tags, nested=nested) as run:
        started = time.perf_counter()
        dataset = load_dataset(
            config.dataset,
            config.data_dir or None,
            size=size,
            max_train_samples=config.max_train_samples or None,
            seed=config.seed,
        )
        model, preprocessing = build_model(config, dataset)
        n_params = sum(p.numel() for p in model.parameters())
        tracking.log_new_params(
            {
                **{k: v for k, v in config.to_dict().items() if k != "model_kwargs"},
                **{f"model_{k}": v for k, v in config.model_kwargs.items()},
                "input_size": size,
                "in_chans": dataset.channels,
                "num_classes": dataset.num_classes,
                "task": dataset.task,
                "mean": preprocessing.mean,
                "std": preprocessing.std,
                "train_samples": len(dataset.train),
                "val_samples": len(dataset.val),
                "test_samples": len(dataset.test),
            }
        )
        tracking.log_dataset(dataset)
        notes += dataset.notes
        if notes:
            mlflow.set_tag("medzoo.notes", "; ".join(notes))

        def log_epoch(result: EpochResult) -> None:
            mlflow.log_metrics(result.metrics, step=result.epoch)
            if on_epoch_end is not None:
                on_epoch_end(result)

        fit_result = fit(
            model,
            dataset.train,
            dataset.val,
            dataset.class_names,
            epochs=config.epochs,
            batch_size=config.batch_size,
            lr=config.lr,
            optimizer=config.optimizer,
            weight_decay=config.weight_decay,
            l1=config.l1,
            scheduler=config.scheduler,
            patience=config.patience,
            select_metric=config.select_key,
            seed=config.seed,
            on_epoch_end=log_epoch,
            progress=progress,
        )
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
        model_info = tracking.log_model(
            model,
            _example_batch(dataset),
            {
                "architecture": config.model,
                "model_options": {k: str(v) for k, v in config.model_options().items()},
                "dataset": dataset.name,
                "task": dataset.task,
                "class_names": dataset.class_names,
                "preprocessing": preprocessing.to_dict(),
                "best_val_acc": val_metrics["best_val_acc"],
                "best_val_auc": val_metrics["best_val_auc"],
            },
        )
        return TrainOutcome(run.info.run_id, fit_result, val_metrics, test_metrics, model_info.model_uri)


def _example_batch(dataset: ImageDataset) -> torch.Tensor:
    return dataset.val.images[:2].float() / 255.0


def _log_reports(config, dataset: ImageDataset, fit_result: FitResult, val_probs, test_probs) -> None:
    names = dataset.class_names
    title = f"{config.model} on {dataset.name} ({dataset.size} px)"
    for split, probs in (("val", val_probs), ("test", test_probs)):
        labels = dataset.split(split).labels.numpy()
        matrix = confusion(labels, probs, len(names))
        tracking.log_figure(
            plots.confusion_matrix_figure(matrix, names, f"{title}, {split}"), f"plots/confusion_matrix_{split}.png"
        )
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


def optional_float(text: str) -> float | None:
    """MLproject passes an empty string for "use the model's default"."""
    return float(text) if text.strip() else None


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="python -m training.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--model", default=defaults.model, help=f"zoo model: {', '.join(zoo.list_models())} or timm/<name>")
    add("--dataset", default=defaults.dataset, help="MedMNIST flag (organamnist, bloodmnist, ...), mnist, fashionmnist")
    add("--size", type=int, default=defaults.size, help="input size in px (raised to the model's minimum)")
    add("--epochs", type=int, default=defaults.epochs)
    add("--batch-size", type=int, default=defaults.batch_size)
    add("--lr", type=float, default=defaults.lr)
    add("--optimizer", default=defaults.optimizer, help="sgd, adam, adamw, rmsprop")
    add("--weight-decay", type=float, default=defaults.weight_decay, help="L2 strength")
    add("--l1", type=float, default=defaults.l1, help="L1 strength on weights")
    add("--dropout", type=optional_float, default=None, help="dropout rate (default: the model's own)")
    add("--scheduler", default=defaults.scheduler, help="none, cosine, onecycle, multistep, plateau")
    add("--patience", type=int, default=defaults.patience, help="early stopping patience in epochs (0: off)")
    add("--select-metric", default=defaults.select_metric, help="validation metric that picks the best epoch: auc, acc")
    add("--seed", type=int, default=defaults.seed)
    add(
        "--data-dir",
        default=defaults.data_dir,
        help="folder with the dataset files (default: $MEDZOO_DATA_DIR, ~/.medmnist)",
    )
    add("--max-train-samples", type=int, default=defaults.max_train_samples, help="stratified subsample (0: all)")
    add("--pretrained", default=defaults.pretrained, help="false, true (timm hub) or a weights file path")
    add("--model-kwargs", default="", help='model options, e.g. "filters=32,64 kernel_size=5 pool=avg"')
    add("--no-progress", action="store_true", help="hide progress bars")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {name: getattr(args, name) for name in TrainConfig.field_names() if name != "model_kwargs"}
    return TrainConfig(**values, model_kwargs=parse_model_kwargs(args.model_kwargs))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        outcome = run_training(config_from_args(args), progress=not args.no_progress)
    except (ConfigError, DatasetError, zoo.ZooError) as err:
        print(f"error: {err}", file=sys.stderr)
        if mlflow.active_run() is None:
            tracking.record_failure_before_start(str(err), f"{args.model}-{args.dataset}")
        return 2
    except KeyboardInterrupt:
        print("interrupted: the run was marked KILLED", file=sys.stderr)
        return 130
    test = outcome.test_metrics
    print(
        f"run {outcome.run_id}: best epoch {outcome.fit.best_epoch}, "
        f"val acc {outcome.val_metrics['best_val_acc']:.4f}, test acc {test['test_acc']:.4f}, "
        f"test auc {test['test_auc']:.4f}, {outcome.fit.images_per_second:.0f} images/s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
