"""Optimisers and learning-rate schedules: timm's, with no weight decay on norms and biases and an optional
learning rate of the classifier head's own."""

from __future__ import annotations

import torch
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.scheduler import create_scheduler_v2
from torch import nn

# Optimisers come from timm (no weight decay on norms and biases, Lion/LAMB/NAdamW); these are the ones offered.
# lookahead_adamw: timm's Lookahead (Zhang et al. 2019; k=6, alpha=0.5) around AdamW, a speed-run trick.
OPTIMIZERS = ("sgd", "adam", "adamw", "nadamw", "lamb", "lion", "rmsprop", "lookahead_adamw")
LOOKAHEAD = "lookahead_"
# torch's own implementations with a fused kernel: one kernel for all parameters instead of a loop of small ones.
FUSED_OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("none", "cosine", "onecycle", "multistep", "plateau")


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
    extra = {"fused": True} if name.removeprefix(LOOKAHEAD) in FUSED_OPTIMIZERS else {}
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
