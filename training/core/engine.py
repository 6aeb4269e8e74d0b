"""The training loop: epochs over in-memory uint8 tensors, validation every epoch, best-epoch selection.

Deliberately a plain loop, read top to bottom as torchvision's reference scripts are: :func:`fit` builds the
pieces once (:func:`prepare`), then per epoch calls :func:`train_one_epoch` (the optimisation steps) and
:func:`end_of_epoch` (evaluate, select, checkpoint, decide). The pieces come from libraries: optimisers and
schedules from timm (``training.core.optim``), the weight EMA (``ModelEmaV3``) and MixUp/CutMix from timm.
MLflow lives in ``training.tracking``; this module only reports each epoch through ``on_epoch_end``.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from timm.data import Mixup
from timm.utils import ModelEmaV3
from torch import nn
from tqdm.auto import tqdm

from training.core import distributed, termination
from training.core.augment import Augmenter
from training.core.data import Split
from training.core.devices import EVAL_IMAGES_PER_FORWARD, autocast, channels_last, to_batch, to_input
from training.core.distributed import World
from training.core.folding import folded
from training.core.metrics import classification_metrics
from training.core.optim import Schedule, make_optimizer

CLASS_BALANCES = ("none", "weighted_loss", "oversample")
SELECT_LAST = "val_last"  # no selection: the final epoch's raw weights (what the MedMNIST v2 code ends with)
PLATEAU_METRIC = "val_auc"  # what the plateau scheduler follows when there is no selection metric


@dataclass
class FitOptions:
    epochs: int
    batch_size: int
    lr: float
    optimizer: str = "adam"
    weight_decay: float = 0.0
    l1: float = 0.0
    scheduler: str = "none"
    warmup_epochs: int = 0
    patience: int = 0
    select_metric: str = "val_auc"
    seed: int = 0
    label_smoothing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    corruption_augment: float = 0.0  # share of images taken from the training split's corrupted copy
    ema: float = 0.0  # decay of the weight EMA; 0 = no EMA
    clip_grad: float = 0.0  # max gradient norm; 0 = no clipping
    class_balance: str = "none"
    augment: tuple[str, ...] = ()
    head_lr: float | None = None  # learning rate of the classifier head (None: lr)
    head_parameters: frozenset[str] = frozenset()  # names of the head's parameters, for head_lr
    device: str = "cpu"
    precision: str = "fp32"  # of the training step: fp32 or bf16 (autocast), as devices.resolve_precision chose
    checkpoint_every: float = 0.0  # seconds between checkpoints (0: every epoch); see Checkpointing
    world: World = World()  # data-parallel: this process's rank among world.size (torch.distributed)


@dataclass
class EpochResult:
    epoch: int
    metrics: dict[str, float]  # train_loss, train_acc, val_loss, val_acc, val_auc, lr, epoch_time, ...


@dataclass
class FitResult:
    history: list[EpochResult] = field(default_factory=list)
    best_epoch: int = -1
    best_score: float = -math.inf
    best_weights: str = "raw"  # "raw" or "ema": which weights won the validation selection
    train_time: float = 0.0
    images_seen: int = 0
    stopped_early: bool = False
    data_parallel: dict | None = None  # how the ranks split the first epoch (distributed.coverage)

    @property
    def images_per_second(self) -> float:
        return self.images_seen / self.train_time if self.train_time else 0.0


class StopTraining(Exception):
    """Raised by an ``on_epoch_end`` callback (e.g. an Optuna pruner) to end training after this epoch."""


def l1_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of |w| over weight matrices and kernels (not biases or norm scales)."""
    return sum(p.abs().sum() for n, p in model.named_parameters() if p.ndim > 1 and p.requires_grad)


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse class frequency, scaled so that the weights average to 1 over the samples."""
    counts = torch.bincount(labels.cpu(), minlength=num_classes).double().clamp_min(1)
    weights = len(labels) / (num_classes * counts)
    return weights.float()


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None):
    """Cross-entropy against class-probability targets (MixUp/CutMix, label smoothing), optionally weighted."""
    log_probs = logits.float().log_softmax(dim=-1)
    per_class = -targets * log_probs
    if weight is not None:
        per_class = per_class * weight
    return per_class.sum(dim=-1).mean()


def predict(
    model: nn.Module, split: Split, batch_size: int | None = None, precision: str = "auto"
) -> tuple[np.ndarray, float]:
    """Softmax probabilities for every image of ``split`` and the mean cross-entropy loss. ``precision`` as in
    ``devices.autocast``: the default is float32 on CPUs, what the exported graph computes."""
    model.eval()
    device = next(model.parameters()).device
    views = len(getattr(model, "views", ())) or 1  # a TTAClassifier forwards each image once per view
    if device.type == "cpu":
        model = folded(model)
    batch_size = batch_size or max(1, EVAL_IMAGES_PER_FORWARD.get(device.type, 512) // views)
    probs, loss_sum = [], torch.zeros((), device=device)
    # The layout changes outside inference mode: weights converted inside it could not be trained or loaded again.
    with channels_last(model), torch.inference_mode():
        for start in range(0, len(split), batch_size):
            images = split.images[start : start + batch_size].to(device, non_blocking=True)
            labels = split.labels[start : start + batch_size].to(device, non_blocking=True)
            with autocast(device.type, precision):
                logits = model(to_batch(images)).float()
            loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum")
            probs.append(logits.softmax(dim=1))
    return torch.cat(probs).cpu().numpy(), loss_sum.item() / max(len(split), 1)


def evaluate(
    model: nn.Module, split: Split, class_names: list[str], prefix: str, precision: str = "auto"
) -> tuple[dict[str, float], np.ndarray]:
    probs, loss = predict(model, split, precision=precision)
    metrics = classification_metrics(split.labels.cpu().numpy(), probs, class_names)
    return {f"{prefix}_loss": loss, **{f"{prefix}_{k}": v for k, v in metrics.items()}}, probs


def batch_indices(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Consecutive batches of ``order``; a lone last sample joins the previous batch (BatchNorm needs 2)."""
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


def epoch_order(labels: torch.Tensor, class_balance: str, generator: torch.Generator) -> torch.Tensor:
    """This epoch's sample order: a permutation, or with ``oversample`` a class-balanced draw of as many samples."""
    if class_balance != "oversample":
        return torch.randperm(len(labels), generator=generator)
    counts = torch.bincount(labels).double()
    per_sample = 1.0 / counts[labels]
    return torch.multinomial(per_sample, len(labels), replacement=True, generator=generator)


class Selection:
    """The best weights seen on validation (raw or EMA), and whether patience has run out."""

    def __init__(self, patience: int):
        self.patience = patience
        self.best_score, self.best_epoch, self.best_source, self.state = -math.inf, -1, "raw", None
        self.epochs_without_gain = 0

    def update(self, epoch: int, scores: dict[str, float], state_of: Callable[[str], dict]) -> bool:
        """Offer this epoch's candidates (source -> score); True if one beat every earlier epoch."""
        improved = False
        for source, score in scores.items():
            if not math.isnan(score) and score > self.best_score:
                self.best_score, self.best_epoch, self.best_source = score, epoch, source
                self.state, improved = copy.deepcopy(state_of(source)), True
        if self.state is None:  # every score NaN so far: keep the first epoch's raw weights
            self.best_epoch, self.state = epoch, copy.deepcopy(state_of("raw"))
        self.epochs_without_gain = 0 if improved else self.epochs_without_gain + 1
        return improved

    @property
    def exhausted(self) -> bool:
        return bool(self.patience) and self.epochs_without_gain >= self.patience


def checkpoint_state(epoch: int, training: Training, selection: Selection, result: FitResult) -> dict:
    """Everything :func:`fit` needs to go on after ``epoch`` as if it had never stopped."""
    t = training
    return {
        "epoch": epoch,
        "updates": t.updates,
        "model": t.model.state_dict(),
        "ema": t.ema.module.state_dict() if t.ema is not None else None,
        "optimizer": t.optimizer.state_dict(),
        "schedule": t.schedule.state_dict(),
        "selection": {k: getattr(selection, k) for k in SELECTION_FIELDS},
        "result": {
            "history": [(h.epoch, h.metrics) for h in result.history],
            "train_time": result.train_time,
            "images_seen": result.images_seen,
        },
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy": np.random.get_state(),
            **{name: g.get_state() for name, g in t.generators.items()},
        },
    }


SELECTION_FIELDS = ("best_score", "best_epoch", "best_source", "state", "epochs_without_gain")


def restore(state: dict, training: Training, selection: Selection) -> FitResult:
    """Put a :func:`checkpoint_state` back into ``training`` and ``selection``; returns the result so far."""
    t = training
    t.model.load_state_dict(state["model"])
    if t.ema is not None:
        t.ema.module.load_state_dict(state["ema"])
    t.optimizer.load_state_dict(state["optimizer"])
    t.schedule.load_state_dict(state["schedule"])
    t.updates = state["updates"]
    for key in SELECTION_FIELDS:
        setattr(selection, key, state["selection"][key])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    np.random.set_state(rng["numpy"])
    for name, generator in t.generators.items():
        generator.set_state(rng[name])
    saved = state["result"]
    return FitResult(
        history=[EpochResult(epoch, metrics) for epoch, metrics in saved["history"]],
        best_epoch=selection.best_epoch,
        best_score=selection.best_score,
        best_weights=selection.best_source,
        train_time=saved["train_time"],
        images_seen=saved["images_seen"],
    )


class Checkpointing:
    """When to hand a checkpoint to the writer: after the first epoch, then once ``every_s`` seconds have passed
    since the last write. The state of a finished epoch that was not written yet is kept in memory (a copy, the
    weights go on changing) and written when training ends for any reason, SIGTERM and exceptions included: a
    stopped run loses no finished epoch, and small datasets do not pay a write per epoch (120 epochs of
    BreastMNIST wrote 120 checkpoints, 0.05 s each). Only a hard kill (SIGKILL, power) loses up to ``every_s``.
    """

    def __init__(self, write: Callable[[dict], None] | None, every_s: float):
        self.write, self.every_s = write, every_s
        self.written_at, self.pending = -math.inf, None

    def after_epoch(self, state: Callable[[], dict]) -> None:
        if self.write is None:
            return
        if time.monotonic() - self.written_at >= self.every_s:
            self.pending = None
            self._write(state())
        else:
            self.pending = snapshot(state())

    def flush(self) -> None:
        if self.pending is not None:
            state, self.pending = self.pending, None
            self._write(state)

    def _write(self, state: dict) -> None:
        self.write(state)
        self.written_at = time.monotonic()


def snapshot(value):
    """A copy of a checkpoint state that training cannot change: tensors cloned, containers copied, other values
    (numbers, strings, NumPy RNG states) shared, as nothing changes them in place. Taken after every epoch whose
    checkpoint waits: 1.6x faster than ``copy.deepcopy`` on a `quick` BreastMNIST state (12 against 19 ms)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):  # a shallow copy keeps the dict's kind (OrderedDict, defaultdict's factory)
        copied = copy.copy(value)
        for key, item in value.items():
            copied[key] = snapshot(item)
        return copied
    if isinstance(value, (list, tuple)):
        items = [snapshot(item) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


@dataclass
class Training:
    """What every training step touches, built once by :func:`prepare` and carried from epoch to epoch."""

    model: nn.Module  # the weights that are trained, selected and checkpointed
    trained: nn.Module  # ``model``, wrapped in DistributedDataParallel when data-parallel
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    options: FitOptions
    num_classes: int
    order_generator: torch.Generator
    ema: ModelEmaV3 | None = None
    augmenter: Augmenter | None = None
    mixing: Mixup | None = None
    loss_weight: torch.Tensor | None = None
    updates: int = 0  # optimiser steps so far (the per-step schedule's clock)

    @property
    def generators(self) -> dict[str, torch.Generator]:
        """The random streams a checkpoint saves, so that a resumed run draws what the uninterrupted one would."""
        return {"order": self.order_generator, **({"augment": self.augmenter.generator} if self.augmenter else {})}


@dataclass
class EpochStats:
    images: int
    loss: float
    acc: float
    seconds: float
    order: torch.Tensor  # the sample indices this rank trained on, in order


def prepare(model: nn.Module, train: Split, num_classes: int, options: FitOptions) -> Training:
    """Seed, then build the optimiser, schedule, EMA, augmentation and loss weighting for ``model`` on ``train``
    (already on ``options.device``)."""
    o, world, device = options, options.world, options.device
    torch.manual_seed(o.seed)  # the same initial weights on every rank
    np.random.seed(o.seed + world.rank)  # timm's MixUp draws from numpy
    # One global batch order on every rank; each rank's own augmentation draws.
    order_generator = torch.Generator().manual_seed(o.seed)
    augment_generator = torch.Generator(device=device).manual_seed(o.seed + world.rank)
    steps_per_epoch = len(distributed.rank_batches(batch_indices(torch.arange(len(train)), o.batch_size), world))
    optimizer = make_optimizer(o.optimizer, model, o.lr, o.weight_decay, o.head_lr, o.head_parameters)
    mixing = None
    if o.mixup or o.cutmix:
        mixing = Mixup(
            mixup_alpha=o.mixup, cutmix_alpha=o.cutmix, label_smoothing=o.label_smoothing, num_classes=num_classes
        )
    return Training(
        model=model,
        trained=nn.parallel.DistributedDataParallel(model) if world.distributed else model,
        optimizer=optimizer,
        schedule=Schedule(o.scheduler, optimizer, o.epochs, steps_per_epoch, o.warmup_epochs),
        options=o,
        num_classes=num_classes,
        order_generator=order_generator,
        ema=ModelEmaV3(model, decay=o.ema, use_warmup=True) if o.ema and world.is_main else None,
        augmenter=Augmenter(o.augment, augment_generator) if o.augment else None,
        mixing=mixing,
        loss_weight=class_weights(train.labels, num_classes).to(device) if o.class_balance == "weighted_loss" else None,
    )


def train_one_epoch(training: Training, train: Split, epoch: int, progress: bool = True) -> EpochStats:
    """One pass over this rank's share of ``train`` in a fresh order: augment, mix, step, schedule, EMA.

    The model must be in channels-last layout (:func:`fit` does that); SIGTERM is checked before every step.
    """
    t, o, world = training, training.options, training.options.world
    device = o.device
    started = time.perf_counter()
    t.model.train()
    order = epoch_order(train.labels.cpu(), o.class_balance, t.order_generator)
    batches = distributed.rank_batches(batch_indices(order, o.batch_size), world)
    # Sums stay on the device: a .item() per step would make every step wait for the GPU.
    seen, loss_sum, correct = 0, torch.zeros((), device=device), torch.zeros((), device=device)
    for index in tqdm(batches, desc=f"epoch {epoch}", leave=False, disable=not progress or not world.is_main):
        termination.check()
        index = index.to(device)
        images, labels = train.images[index], train.labels[index]
        if o.corruption_augment and train.corrupted is not None:
            corrupt = torch.rand(len(index), generator=t.order_generator) < o.corruption_augment
            images = torch.where(corrupt.to(device)[:, None, None, None], train.corrupted[index], images)
        x = t.augmenter(images) if t.augmenter else to_input(images)
        x = x.contiguous(memory_format=torch.channels_last)
        if t.mixing is not None and len(x) % 2 == 0:  # timm's MixUp pairs the batch with its reverse
            x, targets = t.mixing(x, labels)
        else:
            targets = nn.functional.one_hot(labels, t.num_classes).float()
            targets = targets * (1 - o.label_smoothing) + o.label_smoothing / t.num_classes
        with autocast(device, o.precision):
            logits = t.trained(x)
        loss = soft_cross_entropy(logits, targets, t.loss_weight)
        objective = loss + o.l1 * l1_penalty(t.model) if o.l1 > 0 else loss
        t.optimizer.zero_grad(set_to_none=True)
        objective.backward()
        if o.clip_grad:
            nn.utils.clip_grad_norm_(t.model.parameters(), o.clip_grad)
        t.optimizer.step()
        t.updates += 1
        t.schedule.after_step(t.updates)
        if t.ema is not None:
            t.ema.update(t.model, step=t.updates)
        seen += len(labels)
        loss_sum += loss.detach() * len(labels)
        correct += (logits.argmax(1) == labels).sum()
    seen, loss_sum, correct = distributed.all_sum(torch.tensor(seen), loss_sum, correct)
    seen = int(seen)
    return EpochStats(
        seen, loss_sum / max(seen, 1), correct / max(seen, 1), time.perf_counter() - started, torch.cat(batches)
    )


def end_of_epoch(
    training: Training,
    epoch: int,
    stats: EpochStats,
    val: Split,
    class_names: list[str],
    selection: Selection,
    result: FitResult,
    checkpointing: Checkpointing | None = None,
    on_epoch_end: Callable[[EpochResult], None] | None = None,
) -> tuple[dict, bool]:
    """Rank 0: evaluate (raw and EMA weights), select, checkpoint, report; returns the metrics and whether to stop.

    The checkpoint comes after the selection and before the report, so an epoch is either saved whole or not at all.
    """
    t, o = training, training.options
    termination.check()
    started = time.perf_counter()
    # At the step's precision: selection only ranks epochs (bf16 halves its cost on the CPU, 1.78x the images/s in
    # benchmarks/step_speed.py); the run's reported scores come from the float32 evaluation after selection.
    val_metrics, _ = evaluate(t.model, val, class_names, "val", o.precision)
    metrics = {
        "train_loss": stats.loss,
        "train_acc": stats.acc,
        **val_metrics,
        "lr": t.optimizer.param_groups[-1]["lr"],
        "train_images_per_sec": stats.images / stats.seconds,
    }
    plateau_score = metrics[PLATEAU_METRIC if o.select_metric == SELECT_LAST else o.select_metric]
    # `last`: every epoch beats the one before, so the final raw weights are kept.
    scores = {"raw": float(epoch) if o.select_metric == SELECT_LAST else plateau_score}
    if t.ema is not None:
        ema_metrics, _ = evaluate(t.ema.module, val, class_names, "val", o.precision)
        metrics.update({f"ema_{k}": v for k, v in ema_metrics.items() if k in ("val_acc", "val_auc", "val_loss")})
        if o.select_metric != SELECT_LAST:
            scores["ema"] = ema_metrics[o.select_metric]
    metrics["epoch_time"] = stats.seconds + time.perf_counter() - started
    t.schedule.after_epoch(epoch, plateau_score)
    selection.update(epoch, scores, lambda source: (t.ema.module if source == "ema" else t.model).state_dict())
    result.best_epoch, result.best_score, result.best_weights = (
        selection.best_epoch,
        selection.best_score,
        selection.best_source,
    )
    epoch_result = EpochResult(epoch, metrics)
    result.history.append(epoch_result)
    termination.check()
    if checkpointing is not None:
        checkpointing.after_epoch(lambda: checkpoint_state(epoch, t, selection, result))
    stop = False
    if on_epoch_end is not None:
        try:
            on_epoch_end(epoch_result)
        except StopTraining:
            stop = True
    return metrics, stop or selection.exhausted


def fit(
    model: nn.Module,
    train: Split,
    val: Split,
    class_names: list[str],
    options: FitOptions,
    on_epoch_end: Callable[[EpochResult], None] | None = None,
    progress: bool = True,
    on_checkpoint: Callable[[dict], None] | None = None,
    resume: dict | None = None,
) -> FitResult:
    """Train ``model`` in place; on return it holds the best weights by ``options.select_metric`` on validation.

    ``on_checkpoint`` receives everything needed to continue (weights, EMA, optimiser, schedule, random number
    generators, selection, history) after the first epoch, then every ``options.checkpoint_every`` seconds and
    when training ends (:class:`Checkpointing`); ``resume`` is such a state: training goes on from
    the next epoch and, on the same device, ends exactly where an uninterrupted run would.
    """
    o, device, world = options, options.device, options.world
    if resume is not None and world.distributed:
        raise distributed.DistributedError("a run goes on from its checkpoint in one process (nproc=1).")
    model.to(device)
    corrupted = train.corrupted.to(device) if train.corrupted is not None else None
    train = Split(train.images.to(device), train.labels.to(device), corrupted)
    val = Split(val.images.to(device), val.labels.to(device))
    # SIGTERM waits for a check between steps (training.core.termination says why).
    with channels_last(model), termination.deferred():
        training = prepare(model, train, len(class_names), o)
        selection, result, first_epoch = Selection(o.patience), FitResult(), 1
        if resume is not None:
            result = restore(resume, training, selection)
            first_epoch = resume["epoch"] + 1
        epoch_bar = tqdm(
            range(first_epoch, o.epochs + 1),
            desc="epochs",
            unit="epoch",
            disable=not progress or not world.is_main,
            initial=first_epoch - 1,
            total=o.epochs,
        )
        checkpointing = Checkpointing(on_checkpoint, o.checkpoint_every)
        try:
            _epochs(
                training, train, val, class_names, selection, result, checkpointing, epoch_bar, on_epoch_end, progress
            )
        finally:
            checkpointing.flush()  # the last finished epoch, whatever ended training
        if world.is_main:
            model.load_state_dict(selection.state)
        return result


def _epochs(
    training: Training,
    train: Split,
    val: Split,
    class_names: list[str],
    selection: Selection,
    result: FitResult,
    checkpointing: Checkpointing,
    epoch_bar,
    on_epoch_end: Callable[[EpochResult], None] | None,
    progress: bool,
) -> None:
    """:func:`fit`'s loop over the epochs still to train."""
    o, world = training.options, training.options.world
    for epoch in epoch_bar:
        stats = train_one_epoch(training, train, epoch, progress)
        if world.distributed and result.data_parallel is None:
            result.data_parallel = distributed.coverage(stats.order, len(train), world)
        result.train_time += stats.seconds
        result.images_seen += stats.images
        # Rank 0 evaluates, selects, checkpoints and decides; the other ranks follow its score and decision.
        plateau_score, stop = math.nan, False
        if world.is_main:
            metrics, stop = end_of_epoch(
                training, epoch, stats, val, class_names, selection, result, checkpointing, on_epoch_end
            )
            plateau_score = metrics[PLATEAU_METRIC if o.select_metric == SELECT_LAST else o.select_metric]
            epoch_bar.set_postfix(
                loss=f"{metrics['train_loss']:.3f}",
                val_acc=f"{metrics['val_acc']:.3f}",
                val_auc=f"{metrics['val_auc']:.3f}",
                best=f"{selection.best_epoch}{'e' if selection.best_source == 'ema' else ''}",
            )
        plateau_score, stop = distributed.from_main(plateau_score, float(stop))
        if not world.is_main:
            training.schedule.after_epoch(epoch, plateau_score)
        if stop:
            result.stopped_early = True
            break
