"""The training loop: epochs over in-memory uint8 tensors, validation every epoch, best-epoch selection.

Deliberately a plain loop (nanoGPT style): read it top to bottom. MLflow lives in ``training.tracking``;
this module only reports each epoch through the ``on_epoch_end`` callback.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from training.data import Split
from training.metrics import classification_metrics

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULERS = ("none", "cosine", "onecycle", "multistep", "plateau")
EVAL_BATCH_SIZE = 512


@dataclass
class EpochResult:
    epoch: int
    metrics: dict[str, float]  # train_loss, train_acc, val_loss, val_acc, val_auc, lr, epoch_time, ...


@dataclass
class FitResult:
    history: list[EpochResult] = field(default_factory=list)
    best_epoch: int = -1
    best_score: float = -math.inf
    train_time: float = 0.0
    images_seen: int = 0
    stopped_early: bool = False

    @property
    def images_per_second(self) -> float:
        return self.images_seen / self.train_time if self.train_time else 0.0


class StopTraining(Exception):
    """Raised by an ``on_epoch_end`` callback (e.g. an Optuna pruner) to end training after this epoch."""


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float32 in [0, 1]; normalisation happens inside the model."""
    return images.float().div_(255.0)


def to_batch(images: torch.Tensor) -> torch.Tensor:
    """``to_input`` in channels-last layout: oneDNN's CPU convolutions run 1.5-2x faster on it (same values)."""
    return to_input(images).contiguous(memory_format=torch.channels_last)


@contextlib.contextmanager
def channels_last(model: nn.Module):
    """Train and evaluate in channels-last layout, hand the model back in the default layout."""
    model.to(memory_format=torch.channels_last)
    try:
        yield model
    finally:
        model.to(memory_format=torch.contiguous_format)


def make_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    # fused: one kernel for all parameters instead of a loop of small ones (supported on CPU since torch 2.4)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True, fused=True)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=weight_decay, momentum=0.9)
    raise ValueError(f"optimizer={name!r} is not one of: {', '.join(OPTIMIZERS)}")


def make_scheduler(name: str, optimizer, epochs: int, steps_per_epoch: int):
    """Returns (scheduler, steps_per_batch). Per-batch schedulers step every batch, the others every epoch."""
    if name == "none":
        return None, False
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch), True
    if name == "onecycle":
        max_lr = optimizer.param_groups[0]["lr"]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr, total_steps=epochs * steps_per_epoch), True
    if name == "multistep":  # the MedMNIST v2 recipe: x0.1 at 50% and 75% of training
        milestones = [int(epochs * 0.5), int(epochs * 0.75)]
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1), False
    if name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=2), False
    raise ValueError(f"scheduler={name!r} is not one of: {', '.join(SCHEDULERS)}")


def l1_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of |w| over weight matrices and kernels (not biases or norm scales)."""
    return sum(p.abs().sum() for n, p in model.named_parameters() if p.ndim > 1)


@torch.no_grad()
def predict(model: nn.Module, split: Split, batch_size: int = EVAL_BATCH_SIZE) -> tuple[np.ndarray, float]:
    """Softmax probabilities for every image of ``split`` and the mean cross-entropy loss."""
    model.eval()
    probs, loss_sum = [], 0.0
    for start in range(0, len(split), batch_size):
        logits = model(to_batch(split.images[start : start + batch_size]))
        labels = split.labels[start : start + batch_size]
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        probs.append(logits.softmax(dim=1))
    return torch.cat(probs).numpy(), loss_sum / max(len(split), 1)


def evaluate(
    model: nn.Module, split: Split, class_names: list[str], prefix: str
) -> tuple[dict[str, float], np.ndarray]:
    probs, loss = predict(model, split)
    metrics = classification_metrics(split.labels.numpy(), probs, class_names)
    return {f"{prefix}_loss": loss, **{f"{prefix}_{k}": v for k, v in metrics.items()}}, probs


def batch_indices(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Consecutive batches of ``order``; a lone last sample joins the previous batch (BatchNorm needs 2)."""
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


@dataclass
class StepStats:
    images: int
    loss: float
    acc: float


def train_steps(model: nn.Module, optimizer, batches: Iterable, l1: float = 0.0, batch_scheduler=None) -> StepStats:
    """One optimisation step per (uint8 images, labels) batch; the hot loop every trainer shares."""
    model.train()
    seen, loss_sum, correct = 0, 0.0, 0
    for images, labels in batches:
        logits = model(to_batch(images))
        loss = nn.functional.cross_entropy(logits, labels)
        objective = loss + l1 * l1_penalty(model) if l1 > 0 else loss
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        optimizer.step()
        if batch_scheduler is not None:
            batch_scheduler.step()
        seen += len(labels)
        loss_sum += loss.item() * len(labels)
        correct += (logits.argmax(1) == labels).sum().item()
    return StepStats(seen, loss_sum / max(seen, 1), correct / max(seen, 1))


def fit(
    model: nn.Module,
    train: Split,
    val: Split,
    class_names: list[str],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    l1: float = 0.0,
    scheduler: str = "none",
    patience: int = 0,
    select_metric: str = "val_auc",
    seed: int = 0,
    on_epoch_end: Callable[[EpochResult], None] | None = None,
    progress: bool = True,
) -> FitResult:
    """Train ``model`` in place; on return it holds the weights of the best epoch by ``select_metric``."""
    with channels_last(model):
        generator = torch.Generator().manual_seed(seed)
        steps_per_epoch = len(batch_indices(torch.arange(len(train)), batch_size))
        opt = make_optimizer(optimizer, model.parameters(), lr, weight_decay)
        sched, per_batch = make_scheduler(scheduler, opt, epochs, steps_per_epoch)
        result, best_state, epochs_without_gain = FitResult(), None, 0

        epoch_bar = tqdm(range(1, epochs + 1), desc="epochs", unit="epoch", disable=not progress)
        for epoch in epoch_bar:
            started = time.perf_counter()
            order = torch.randperm(len(train), generator=generator)
            batches = batch_indices(order, batch_size)
            bar = tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch}", leave=False, disable=not progress)
            train_stats = train_steps(
                model, opt, ((train.images[i], train.labels[i]) for i in bar), l1, sched if per_batch else None
            )
            train_seconds = time.perf_counter() - started
            result.train_time += train_seconds
            result.images_seen += train_stats.images

            val_metrics, _ = evaluate(model, val, class_names, "val")
            metrics = {
                "train_loss": train_stats.loss,
                "train_acc": train_stats.acc,
                **val_metrics,
                "lr": opt.param_groups[0]["lr"],
                "epoch_time": time.perf_counter() - started,
                "train_images_per_sec": train_stats.images / train_seconds,
            }
            score = metrics[select_metric]
            if sched is not None and not per_batch:
                sched.step(score) if scheduler == "plateau" else sched.step()

            improved = not math.isnan(score) and score > result.best_score
            if improved or best_state is None:
                result.best_epoch, result.best_score = epoch, (score if improved else result.best_score)
                best_state = copy.deepcopy(model.state_dict())
                epochs_without_gain = 0
            else:
                epochs_without_gain += 1
            epoch_result = EpochResult(epoch, metrics)
            result.history.append(epoch_result)
            epoch_bar.set_postfix(
                loss=f"{metrics['train_loss']:.3f}",
                val_acc=f"{metrics['val_acc']:.3f}",
                val_auc=f"{metrics['val_auc']:.3f}",
                best=result.best_epoch,
            )
            if on_epoch_end is not None:
                try:
                    on_epoch_end(epoch_result)
                except StopTraining:
                    result.stopped_early = True
                    break
            if patience and epochs_without_gain >= patience:
                result.stopped_early = True
                break

        model.load_state_dict(best_state)
        return result
