"""The training loop: epochs over in-memory uint8 tensors, validation every epoch, best-epoch selection.

Deliberately a plain loop (nanoGPT style): read :func:`fit` top to bottom. The pieces around it come from
libraries: optimisers and schedulers from timm, the weight EMA (``ModelEmaV3``) and MixUp/CutMix from timm.
MLflow lives in ``training.tracking``; this module only reports each epoch through ``on_epoch_end``.
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
from timm.data import Mixup
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn
from tqdm.auto import tqdm

from training import distributed, termination
from training.augment import Augmenter
from training.data import Split
from training.distributed import World
from training.metrics import classification_metrics

# Optimisers come from timm (no weight decay on norms and biases, Lion/LAMB/NAdamW); these are the ones offered.
OPTIMIZERS = ("sgd", "adam", "adamw", "nadamw", "lamb", "lion", "rmsprop")
# torch's own implementations with a fused kernel: one kernel for all parameters instead of a loop of small ones.
FUSED_OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("none", "cosine", "onecycle", "multistep", "plateau")
CLASS_BALANCES = ("none", "weighted_loss", "oversample")
DEVICES = ("auto", "cpu", "cuda")
SELECT_LAST = "val_last"  # no selection: the final epoch's raw weights (what the MedMNIST v2 code ends with)
PLATEAU_METRIC = "val_auc"  # what the plateau scheduler follows when there is no selection metric
# Images per evaluation forward pass. On CPUs a small batch stays in cache: ResNet-9 (width 16) with 5-view TTA
# ran 0.25 ms per image-view at 160 images per pass against 0.70 at 2560 (contiguous layout). GPUs want big ones.
EVAL_IMAGES_PER_FORWARD = {"cpu": 160, "cuda": 4096}


class DeviceError(ValueError):
    """A device that this machine does not have."""


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
    ema: float = 0.0  # decay of the weight EMA; 0 = no EMA
    clip_grad: float = 0.0  # max gradient norm; 0 = no clipping
    class_balance: str = "none"
    augment: tuple[str, ...] = ()
    head_lr: float | None = None  # learning rate of the classifier head (None: lr)
    head_parameters: frozenset[str] = frozenset()  # names of the head's parameters, for head_lr
    device: str = "cpu"
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


def resolve_device(name: str) -> str:
    if name not in DEVICES:
        raise DeviceError(f"device={name!r} is not one of: {', '.join(DEVICES)}.")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device='cuda' but this machine has no CUDA GPU (torch.cuda.is_available() is False).")
    return "cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name)


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float32 in [0, 1]; normalisation happens inside the model."""
    return images.float().div_(255.0)


def to_batch(images: torch.Tensor) -> torch.Tensor:
    """``to_input`` in channels-last layout: oneDNN's CPU convolutions run 1.5-2x faster on it (same values)."""
    return to_input(images).contiguous(memory_format=torch.channels_last)


def _is_channels_last(model: nn.Module) -> bool:
    kernels = (p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1)
    kernel = next(kernels, None)
    return kernel is not None and kernel.is_contiguous(memory_format=torch.channels_last) and not kernel.is_contiguous()


@contextlib.contextmanager
def channels_last(model: nn.Module):
    """Train and evaluate in channels-last layout; hand the model back in the layout it came in."""
    was_channels_last = _is_channels_last(model)
    model.to(memory_format=torch.channels_last)
    try:
        yield model
    finally:
        if not was_channels_last:
            model.to(memory_format=torch.contiguous_format)


def autocast(device: str):
    """bfloat16 autocast on GPUs; plain float32 on CPUs (where bf16 is slower for these small nets)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()


def make_optimizer(
    name: str, model: nn.Module, lr: float, weight_decay: float, head_lr: float | None = None, head=frozenset()
) -> torch.optim.Optimizer:
    """timm's optimiser ``name``; weight decay skips biases and norm parameters (1-D tensors), as in nanoGPT.

    Frozen parameters (``requires_grad=False``) are left out; the head's parameters may get their own lr.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer={name!r} is not one of: {', '.join(OPTIMIZERS)}")
    groups = []
    names = {id(p): n for n, p in model.named_parameters()}
    for group in param_groups_weight_decay(model, weight_decay):
        for is_head in (False, True):
            params = [p for p in group["params"] if (names[id(p)] in head) == is_head]
            if params:
                lr_of_group = head_lr if is_head and head_lr is not None else lr
                groups.append({"params": params, "weight_decay": group["weight_decay"], "lr": lr_of_group})
    extra = {"fused": True} if name in FUSED_OPTIMIZERS else {}
    return create_optimizer_v2(groups, opt=name, lr=lr, weight_decay=weight_decay, momentum=0.9, **extra)


class Schedule:
    """The learning-rate schedule stepped per batch and per epoch: timm's schedulers, or torch's OneCycleLR."""

    def __init__(self, name: str, optimizer, epochs: int, steps_per_epoch: int, warmup_epochs: int = 0):
        if name not in SCHEDULERS:
            raise ValueError(f"scheduler={name!r} is not one of: {', '.join(SCHEDULERS)}")
        self.name, self.onecycle, self.timm = name, None, None
        if name == "onecycle":  # has its own warm-up
            max_lr = [g["lr"] for g in optimizer.param_groups]
            self.onecycle = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr, total_steps=epochs * steps_per_epoch)
            return
        per_step = name in ("cosine", "none")
        kwargs = dict(
            num_epochs=epochs,
            warmup_epochs=warmup_epochs,
            warmup_lr=0.0,
            step_on_epochs=not per_step,
            updates_per_epoch=steps_per_epoch,
        )
        if name == "cosine":
            self.timm, _ = create_scheduler_v2(optimizer, "cosine", min_lr=0.0, **kwargs)
        elif name == "multistep":  # the MedMNIST v2 recipe: x0.1 at 50% and 75% of training
            milestones = [int(epochs * 0.5), int(epochs * 0.75)]
            self.timm, _ = create_scheduler_v2(optimizer, "multistep", decay_milestones=milestones, **kwargs)
        elif name == "plateau":
            self.timm, _ = create_scheduler_v2(optimizer, "plateau", decay_rate=0.5, patience_epochs=2, **kwargs)
        elif warmup_epochs:  # "none": a constant rate, after the warm-up (multistep without milestones)
            self.timm, _ = create_scheduler_v2(optimizer, "multistep", decay_milestones=[], **kwargs)

    def after_step(self, updates: int) -> None:
        if self.onecycle is not None:
            self.onecycle.step()
        elif self.timm is not None:
            self.timm.step_update(updates)

    def after_epoch(self, epoch: int, score: float) -> None:
        if self.timm is not None:
            self.timm.step(epoch, score)

    def state_dict(self) -> dict:
        # timm's plateau scheduler saves only part of torch's ReduceLROnPlateau it wraps: keep all of that one.
        plateau = getattr(self.timm, "lr_scheduler", None)
        return {
            "onecycle": self.onecycle.state_dict() if self.onecycle is not None else None,
            "timm": self.timm.state_dict() if self.timm is not None else None,
            "plateau": plateau.state_dict() if plateau is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        if self.onecycle is not None:
            self.onecycle.load_state_dict(state["onecycle"])
        if self.timm is not None:
            self.timm.load_state_dict(state["timm"])
        if state["plateau"] is not None:
            self.timm.lr_scheduler.load_state_dict(state["plateau"])


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


def predict(model: nn.Module, split: Split, batch_size: int | None = None) -> tuple[np.ndarray, float]:
    """Softmax probabilities for every image of ``split`` and the mean cross-entropy loss."""
    model.eval()
    device = next(model.parameters()).device
    views = len(getattr(model, "views", ())) or 1  # a TTAClassifier forwards each image once per view
    batch_size = batch_size or max(1, EVAL_IMAGES_PER_FORWARD.get(device.type, 512) // views)
    probs, loss_sum = [], torch.zeros((), device=device)
    # The layout changes outside inference mode: weights converted inside it could not be trained or loaded again.
    with channels_last(model), torch.inference_mode():
        for start in range(0, len(split), batch_size):
            images = split.images[start : start + batch_size].to(device, non_blocking=True)
            labels = split.labels[start : start + batch_size].to(device, non_blocking=True)
            with autocast(device.type):
                logits = model(to_batch(images)).float()
            loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum")
            probs.append(logits.softmax(dim=1))
    return torch.cat(probs).cpu().numpy(), loss_sum.item() / max(len(split), 1)


def evaluate(
    model: nn.Module, split: Split, class_names: list[str], prefix: str
) -> tuple[dict[str, float], np.ndarray]:
    probs, loss = predict(model, split)
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


@dataclass
class StepStats:
    images: int
    loss: float
    acc: float


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


def train_steps(model: nn.Module, optimizer, batches: Iterable, l1: float = 0.0, batch_scheduler=None) -> StepStats:
    """Plain optimisation steps on (uint8 images, labels) batches: the hot loop, for benchmarks and probes."""
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


def checkpoint_state(epoch, updates, model, ema, opt, schedule, selection, result, generators) -> dict:
    """Everything :func:`fit` needs to go on after ``epoch`` as if it had never stopped."""
    return {
        "epoch": epoch,
        "updates": updates,
        "model": model.state_dict(),
        "ema": ema.module.state_dict() if ema is not None else None,
        "optimizer": opt.state_dict(),
        "schedule": schedule.state_dict(),
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
            **{name: g.get_state() for name, g in generators.items()},
        },
    }


SELECTION_FIELDS = ("best_score", "best_epoch", "best_source", "state", "epochs_without_gain")


def restore(state: dict, model, ema, opt, schedule, selection, generators) -> tuple[int, FitResult]:
    """Put a :func:`checkpoint_state` back; returns the optimiser updates done and the result so far."""
    model.load_state_dict(state["model"])
    if ema is not None:
        ema.module.load_state_dict(state["ema"])
    opt.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    for key in SELECTION_FIELDS:
        setattr(selection, key, state["selection"][key])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    np.random.set_state(rng["numpy"])
    for name, generator in generators.items():
        generator.set_state(rng[name])
    saved = state["result"]
    result = FitResult(
        history=[EpochResult(epoch, metrics) for epoch, metrics in saved["history"]],
        best_epoch=selection.best_epoch,
        best_score=selection.best_score,
        best_weights=selection.best_source,
        train_time=saved["train_time"],
        images_seen=saved["images_seen"],
    )
    return state["updates"], result


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

    ``on_checkpoint`` receives, after every epoch, everything needed to continue (weights, EMA, optimiser,
    schedule, random number generators, selection, history); ``resume`` is such a state: training goes on from
    the next epoch and, on the same device, ends exactly where an uninterrupted run would.
    """
    o, device, num_classes, world = options, options.device, len(class_names), options.world
    if resume is not None and world.distributed:
        raise distributed.DistributedError("a run goes on from its checkpoint in one process (nproc=1).")
    torch.manual_seed(o.seed)  # the same initial weights on every rank
    np.random.seed(o.seed + world.rank)  # timm's MixUp draws from numpy
    model.to(device)
    train = Split(train.images.to(device), train.labels.to(device))
    val = Split(val.images.to(device), val.labels.to(device))
    # SIGTERM waits for a check between steps (training.termination says why).
    with channels_last(model), termination.deferred():
        # One global batch order on every rank; each rank's own augmentation draws.
        order_generator = torch.Generator().manual_seed(o.seed)
        augment_generator = torch.Generator(device=device).manual_seed(o.seed + world.rank)
        augmenter = Augmenter(o.augment, augment_generator) if o.augment else None
        trained = nn.parallel.DistributedDataParallel(model) if world.distributed else model
        mixing = (
            Mixup(
                mixup_alpha=o.mixup,
                cutmix_alpha=o.cutmix,
                label_smoothing=o.label_smoothing,
                num_classes=num_classes,
            )
            if o.mixup or o.cutmix
            else None
        )
        weight = class_weights(train.labels, num_classes).to(device) if o.class_balance == "weighted_loss" else None
        steps_per_epoch = len(distributed.rank_batches(batch_indices(torch.arange(len(train)), o.batch_size), world))
        opt = make_optimizer(o.optimizer, model, o.lr, o.weight_decay, o.head_lr, o.head_parameters)
        schedule = Schedule(o.scheduler, opt, o.epochs, steps_per_epoch, o.warmup_epochs)
        ema = ModelEmaV3(model, decay=o.ema, use_warmup=True) if o.ema and world.is_main else None
        selection, result, updates = Selection(o.patience), FitResult(), 0
        generators = {"order": order_generator, **({"augment": augmenter.generator} if augmenter else {})}
        first_epoch = 1
        if resume is not None:
            updates, result = restore(resume, model, ema, opt, schedule, selection, generators)
            first_epoch = resume["epoch"] + 1

        epoch_bar = tqdm(
            range(first_epoch, o.epochs + 1),
            desc="epochs",
            unit="epoch",
            disable=not progress or not world.is_main,
            initial=first_epoch - 1,
            total=o.epochs,
        )
        for epoch in epoch_bar:
            started = time.perf_counter()
            model.train()
            order = epoch_order(train.labels.cpu(), o.class_balance, order_generator)
            batches = distributed.rank_batches(batch_indices(order, o.batch_size), world)
            # Sums stay on the device: a .item() per step would make every step wait for the GPU.
            seen, loss_sum, correct = 0, torch.zeros((), device=device), torch.zeros((), device=device)
            for index in tqdm(batches, desc=f"epoch {epoch}", leave=False, disable=not progress or not world.is_main):
                termination.check()
                index = index.to(device)
                images, labels = train.images[index], train.labels[index]
                x = augmenter(images) if augmenter else to_input(images)
                x = x.contiguous(memory_format=torch.channels_last)
                if mixing is not None and len(x) % 2 == 0:  # timm's MixUp pairs the batch with its reverse
                    x, targets = mixing(x, labels)
                else:
                    targets = nn.functional.one_hot(labels, num_classes).float()
                    targets = targets * (1 - o.label_smoothing) + o.label_smoothing / num_classes
                with autocast(device):
                    logits = trained(x)
                loss = soft_cross_entropy(logits, targets, weight)
                objective = loss + o.l1 * l1_penalty(model) if o.l1 > 0 else loss
                opt.zero_grad(set_to_none=True)
                objective.backward()
                if o.clip_grad:
                    nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad)
                opt.step()
                updates += 1
                schedule.after_step(updates)
                if ema is not None:
                    ema.update(model, step=updates)
                seen += len(labels)
                loss_sum += loss.detach() * len(labels)
                correct += (logits.argmax(1) == labels).sum()
            if world.distributed and result.data_parallel is None:
                result.data_parallel = distributed.coverage(torch.cat(batches), len(train), world)
            seen, loss_sum, correct = distributed.all_sum(torch.tensor(seen), loss_sum, correct)
            seen = int(seen)
            train_seconds = time.perf_counter() - started
            result.train_time += train_seconds
            result.images_seen += seen

            # Rank 0 evaluates, selects, checkpoints and decides; the other ranks follow its score and decision.
            raw_score, stop = math.nan, False
            if world.is_main:
                termination.check()
                val_metrics, _ = evaluate(model, val, class_names, "val")
                metrics = {
                    "train_loss": loss_sum / max(seen, 1),
                    "train_acc": correct / max(seen, 1),
                    **val_metrics,
                    "lr": opt.param_groups[-1]["lr"],
                    "train_images_per_sec": seen / train_seconds,
                }
                plateau_score = metrics[PLATEAU_METRIC if o.select_metric == SELECT_LAST else o.select_metric]
                # `last`: every epoch beats the one before, so the final raw weights are kept.
                scores = {"raw": float(epoch) if o.select_metric == SELECT_LAST else plateau_score}
                if ema is not None:
                    ema_metrics, _ = evaluate(ema.module, val, class_names, "val")
                    metrics.update(
                        {f"ema_{k}": v for k, v in ema_metrics.items() if k in ("val_acc", "val_auc", "val_loss")}
                    )
                    if o.select_metric != SELECT_LAST:
                        scores["ema"] = ema_metrics[o.select_metric]
                metrics["epoch_time"] = time.perf_counter() - started
                schedule.after_epoch(epoch, plateau_score)
                selection.update(epoch, scores, lambda source: (ema.module if source == "ema" else model).state_dict())
                result.best_epoch, result.best_score, result.best_weights = (
                    selection.best_epoch,
                    selection.best_score,
                    selection.best_source,
                )
                epoch_result = EpochResult(epoch, metrics)
                result.history.append(epoch_result)
                termination.check()  # before the checkpoint: an epoch is either saved whole or not at all
                if on_checkpoint is not None:
                    on_checkpoint(
                        checkpoint_state(epoch, updates, model, ema, opt, schedule, selection, result, generators)
                    )
                epoch_bar.set_postfix(
                    loss=f"{metrics['train_loss']:.3f}",
                    val_acc=f"{metrics['val_acc']:.3f}",
                    val_auc=f"{metrics['val_auc']:.3f}",
                    best=f"{selection.best_epoch}{'e' if selection.best_source == 'ema' else ''}",
                )
                if on_epoch_end is not None:
                    try:
                        on_epoch_end(epoch_result)
                    except StopTraining:
                        stop = True
                stop = stop or selection.exhausted
                raw_score = plateau_score
            raw_score, stop = distributed.from_main(raw_score, float(stop))
            if not world.is_main:
                schedule.after_epoch(epoch, raw_score)
            if stop:
                result.stopped_early = True
                break

        if world.is_main:
            model.load_state_dict(selection.state)
        return result
