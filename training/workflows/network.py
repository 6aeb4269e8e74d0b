"""Train one zoo network on one dataset as one MLflow run.

The validation split selects the best epoch; the test split is evaluated once, at the end, with those
weights. Everything later steps need is logged with the model. ``training.workflows.train`` is the entry point
(it also trains ``members > 1`` through ``training.workflows.members``); this module trains exactly one network.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import mlflow
import numpy as np
import torch
from sklearn.metrics import classification_report

import zoo
from contract import ModelCard, Preprocessing
from training.core import corruptions, distributed, gradcam, plots
from training.core.calibration import calibrate, check_validation, nll, tempered
from training.core.config import ConfigError, ResolvedConfig, TrainConfig
from training.core.data import ImageDataset, card_data, load_dataset
from training.core.devices import to_input
from training.core.distributed import World
from training.core.engine import EpochResult, FitOptions, FitResult, fit, predict
from training.core.metrics import top_confusions
from training.core.options import NONE, to_text
from training.core.recipes import train_command
from training.tracking import lifecycle, records
from training.tracking.checkpoint import RollingCheckpoint
from training.tracking.resume import Resumption
from zoo.cam import Explained, explains


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
    model = zoo.NormalizedClassifier(backbone, mean, std)
    model.init_from_data(to_input(dataset.train.images[: zoo.DATA_INIT_IMAGES]))  # same images on every rank
    return model, preprocessing


def fit_options(run: ResolvedConfig, model: torch.nn.Module, world: World = World()) -> FitOptions:
    """The engine's settings for this run, read from the resolved configuration."""
    config = run.config
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
        corruption_augment=config.corruption_augment,
        ema=config.ema,
        clip_grad=config.clip_grad,
        class_balance=config.class_balance,
        augment=run.augment,
        head_lr=config.head_lr,
        head_parameters=zoo.head_parameter_names(model.backbone, prefix="backbone."),
        device=run.device,
        precision=run.precision,
        checkpoint_every=config.checkpoint_every,
        world=world,
    )


def load(run: ResolvedConfig) -> ImageDataset:
    config = run.config
    dataset = load_dataset(
        config.dataset,
        config.data_path,
        size=run.input_size,
        max_train_samples=config.max_train_samples or None,
        seed=config.seed,
    )
    if config.corruption_augment > 0:
        # Made once, before training: corrupting at 224 px costs milliseconds an image, too slow for every batch.
        train = dataset.train
        train.corrupted = torch.from_numpy(corruptions.corrupted_copy(train.images.numpy(), dataset.name, config.seed))
    return dataset


def _train_share(run: ResolvedConfig, world: World) -> None:
    """A rank other than 0: the same data and model, its share of every batch, nothing logged."""
    dataset = load(run)
    model, _ = build_model(run.config, dataset)
    fit(model, dataset.train, dataset.val, dataset.class_names, fit_options(run, model, world), progress=False)


def train_network(
    run: ResolvedConfig,
    *,
    nested: bool = False,
    on_epoch_end: Callable[[EpochResult], None] | None = None,
    extra_tags: dict | None = None,
    progress: bool = True,
    resume: Resumption | None = None,
) -> TrainOutcome | None:
    """Train and track one network. A checkpoint is written after every epoch; ``resume`` continues a stopped run
    in that same MLflow run from its last checkpoint. Under torchrun every rank calls this: rank 0 trains and logs
    the run, the others train their share and return None.
    """
    config, device, world = run.config, run.device, distributed.current()
    distributed.check(world.size, config.batch_size, device)
    if resume is not None and world.distributed:
        raise distributed.DistributedError("a run goes on from its checkpoint in one process (nproc=1).")
    distributed.setup(world, device)
    if not world.is_main:
        _train_share(run, world)
        distributed.teardown()
        return None
    torch.manual_seed(config.seed)
    tags = {
        "model": config.model,
        "dataset": config.dataset,
        "size": str(run.input_size),
        "recipe": config.recipe,
        "device": device,
        **(extra_tags or {}),
    }
    run_name = f"{config.model}-{config.dataset}"
    run_id = resume.run_id if resume else None
    with lifecycle.tracked_run(run_name, tags, nested=nested, experiment=config.dataset, run_id=run_id) as mlflow_run:
        started = time.perf_counter()
        dataset = load(run)
        check_validation(config.calibration, len(dataset.val))  # before any training, not after it
        model, preprocessing = build_model(config, dataset)
        n_params = sum(p.numel() for p in model.parameters())
        records.log_new_params(_params(run, dataset, preprocessing, world))
        if resume is None:
            records.log_dataset(dataset)
        records.log_notes(list(run.notes) + dataset.notes)

        logged_before = 0  # epochs a killed run logged past its last checkpoint are trained again, not logged again

        def log_epoch(result: EpochResult) -> None:
            if result.epoch > logged_before:
                mlflow.log_metrics(result.metrics, step=result.epoch)
            if on_epoch_end is not None:
                on_epoch_end(result)

        if resume is not None:
            logged_before = _relog_missing_epochs(mlflow_run.info.run_id, resume.state)
            mlflow.set_tag("medzoo.resumed_from_epoch", str(resume.state["epoch"]))
        fit_result = fit(
            model,
            dataset.train,
            dataset.val,
            dataset.class_names,
            fit_options(run, model, world),
            log_epoch,
            progress,
            on_checkpoint=RollingCheckpoint(mlflow_run.info.run_id),
            resume=resume.state if resume else None,
        )
        distributed.teardown()
        if fit_result.data_parallel is not None:
            records.log_json(fit_result.data_parallel, "distributed.json")
        mlflow.set_tag("selected_weights", fit_result.best_weights)
        # The final model averages the test-time views inside itself, so export and serving answer the same.
        network = model  # the normalised net without test-time views: what Grad-CAM explains
        model = zoo.TTAClassifier(model, run.tta) if run.tta else model
        # Selection is done; the test split is touched exactly once, with the selected weights.
        (val_probs, _), (test_probs, _) = predict(model, dataset.val), predict(model, dataset.test)
        labels = {split: dataset.split(split).labels.numpy() for split in ("val", "test")}
        title = f"{config.model} on {dataset.name} ({dataset.size} px)"
        # Calibrated on validation halves; from here on the run reports what the served graph answers.
        calibration = calibrate(config.calibration, val_probs, labels["val"], test_probs, labels["test"])
        records.log_calibration(calibration, {"val": val_probs, "test": test_probs}, labels, title)
        model = zoo.TemperatureScaled(model, calibration.temperature) if calibration.temperature != 1.0 else model
        val_probs, test_probs = (tempered(p, calibration.temperature) for p in (val_probs, test_probs))
        val_loss, test_loss = nll(val_probs, labels["val"]), nll(test_probs, labels["test"])
        val_metrics, test_metrics = records.log_final_scores(
            labels,
            {"val": val_probs, "test": test_probs},
            dataset.class_names,
            title,
            {
                "best_val_loss": val_loss,
                "test_loss": test_loss,
                "best_epoch": fit_result.best_epoch,
                "train_time": fit_result.train_time,
                "train_images_per_sec": fit_result.images_per_second,
                "n_params": n_params,
                "wall_time": time.perf_counter() - started,
            },
        )
        val_metrics, test_metrics = {"best_val_loss": val_loss, **val_metrics}, {"test_loss": test_loss, **test_metrics}
        mlflow.set_tag("stopped_early", str(fit_result.stopped_early))
        _log_reports(config, title, dataset, fit_result, test_probs)
        _log_gradcam(network, dataset, test_probs, title)
        card = ModelCard(
            architecture=config.model,
            dataset=dataset.name,
            task=dataset.task,
            class_names=tuple(dataset.class_names),
            preprocessing=preprocessing,
            model_options={k: to_text(v) for k, v in config.model_options().items()},
            tta=run.tta,
            **calibration.card_fields(),
            recipe=config.recipe,
            command=train_command(config),
            data=card_data(dataset),
            confusions=tuple(top_confusions(labels["test"], test_probs, dataset.class_names)),
        ).with_run(mlflow_run.info.run_id, {**calibration.metrics, **val_metrics, **test_metrics, "n_params": n_params})
        records.log_card(card)
        model_info = records.log_model(model.cpu(), dataset.val.images[: records.PARITY_IMAGES], card)
        return TrainOutcome(mlflow_run.info.run_id, fit_result, val_metrics, test_metrics, model_info.model_uri)


def _params(run: ResolvedConfig, dataset: ImageDataset, preprocessing: Preprocessing, world: World) -> dict:
    """Every parameter as the run logs it: the configuration, what was resolved from it, and the data."""
    config = run.config
    return {
        **config.to_params(),
        "resume": NONE,  # what `mlflow run -P resume=...` logs for a new run, so both ways log alike
        "nproc": world.size,
        **{f"model.{k}": to_text(v) for k, v in config.model_kwargs.items()},
        "input_size": run.input_size,
        "in_chans": dataset.channels,
        "num_classes": dataset.num_classes,
        "task": dataset.task,
        "mean": to_text(preprocessing.mean),
        "std": to_text(preprocessing.std),
        "train_samples": len(dataset.train),
        "val_samples": len(dataset.val),
        "test_samples": len(dataset.test),
        "augment_ops": to_text(run.augment) or "none",
        "tta_views": to_text(run.tta) or "none",
        "step_precision": run.precision,
    }


def _relog_missing_epochs(run_id: str, state: dict) -> int:
    """Epochs the checkpoint holds but the run lost (killed between checkpoint and logging): log them. Returns
    the last epoch the run has logged, which can be past the checkpoint (checkpoints are written on a time
    interval; a resumed run trains those epochs again to the same values)."""
    logged = {m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "train_loss")}
    for epoch, metrics in state["result"]["history"]:
        if epoch not in logged:
            mlflow.log_metrics(metrics, step=epoch)
    return max(logged, default=0)


def _log_gradcam(network: torch.nn.Module, dataset: ImageDataset, test_probs, title: str) -> None:
    """``plots/test_gradcam.png``: Grad-CAM of the most confident test mistakes and of a confident correct image
    per class, for the predicted class, on the deepest layer whose map is at least 2x2 (tag ``gradcam_layer``). A
    network the service explains with activation maps (``zoo.cam``) logs how well the two agree on these images
    (``gradcam_cam_correlation``, mean Pearson correlation of the maps)."""
    network = network.cpu().eval()
    pre_size, channels = dataset.size, dataset.channels
    try:
        name, layer, size = gradcam.target_layer(network, channels, pre_size)
    except ValueError as err:
        records.log_notes([f"no Grad-CAM figure: {err}"])
        return
    test = dataset.test
    chosen = gradcam.examples(test.labels.numpy(), test_probs)
    images, predicted = test.images[chosen], test_probs[chosen].argmax(1)
    maps = gradcam.grad_cam(network, layer, images, predicted.tolist())
    mlflow.set_tag("gradcam_layer", f"{name} ({size[0]}x{size[1]})")
    records.log_figure(
        plots.gradcam_figure(
            images.numpy(),
            maps,
            test.labels.numpy()[chosen],
            test_probs[chosen],
            dataset.class_names,
            f"{title}: Grad-CAM at {name} ({size[0]}x{size[1]}), mistakes first",
        ),
        "plots/test_gradcam.png",
    )
    if explains(network.backbone, channels, pre_size):
        with torch.no_grad():
            _, cams = Explained(network, network)(to_input(images))
        served = cams[torch.arange(len(chosen)), torch.as_tensor(predicted)].numpy()
        agreement = [gradcam.pearson(a, b) for a, b in zip(served, maps)]
        mlflow.log_metric("gradcam_cam_correlation", float(np.nanmean(agreement)))


def _log_reports(config, title: str, dataset: ImageDataset, fit_result: FitResult, test_probs) -> None:
    names = dataset.class_names
    records.log_figure(
        plots.learning_curves_figure(fit_result.history, fit_result.best_epoch, title), "plots/learning_curves.png"
    )
    test = dataset.test
    records.log_figure(
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
    records.log_json(
        {
            "config": config.to_dict(),
            "input_size": dataset.size,
            "notes": dataset.notes,
            "best_epoch": fit_result.best_epoch,
        },
        "config.json",
    )
