"""Penultimate-layer features of a trained run (or the raw pixels), for the classical estimators.

The network is rebuilt from the run's model card and given the logged weights, so it is a plain module again
(the logged torch.export graph cannot be cut); its last ``nn.Linear`` (the classifier) becomes an identity.
Features come from the plain view, without test-time views: the estimator on top has its own decision rule.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

import zoo
from contract import ModelCard
from training.core.devices import EVAL_IMAGES_PER_FORWARD, to_input

RAW = "raw"


class FeaturesError(ValueError):
    """A features source that cannot be used (unknown run, another dataset); the message says what exists."""


class RawPixels(nn.Module):
    """[N, C, H, W] -> [N, C*H*W]: the pixels themselves as features."""

    def forward(self, x):
        return x.flatten(1)


def rebuild_network(model: nn.Module, card: ModelCard) -> nn.Module:
    """The run's network (normalisation included, test-time views left out) as a plain module."""
    return rebuild(model, card)[1]


def rebuild(model: nn.Module, card: ModelCard) -> tuple[nn.Module, zoo.NormalizedClassifier]:
    """A logged model (a traced graph) as modules again, from its card and weights: the served model (views
    and temperature included) and the normalised network inside it."""
    pre = card.preprocessing
    backbone = zoo.create_model(
        card.architecture,
        in_chans=pre.in_chans,
        num_classes=len(card.class_names),
        input_size=pre.input_size,
        **card.model_options,
    )
    network = zoo.NormalizedClassifier(backbone, pre.mean, pre.std)
    wrapped = zoo.TTAClassifier(network, card.tta) if card.tta else network
    wrapped = zoo.TemperatureScaled(wrapped, card.temperature) if card.temperature != 1.0 else wrapped
    wrapped.load_state_dict(model.state_dict())
    return wrapped.eval(), network.eval()


def without_classifier(network: nn.Module) -> nn.Module:
    """A copy whose last ``nn.Linear`` is an identity: it returns what the classifier would have read."""
    extractor = copy.deepcopy(network)
    linears = [name for name, module in extractor.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise FeaturesError(f"{type(network.backbone).__name__} has no linear classifier to remove.")
    parent_name, _, attribute = linears[-1].rpartition(".")
    setattr(extractor.get_submodule(parent_name) if parent_name else extractor, attribute, nn.Identity())
    return extractor.eval()


@torch.inference_mode()
def extract(extractor: nn.Module, images: torch.Tensor) -> np.ndarray:
    """float32 [N, D] features of uint8 [N, C, H, W] images."""
    extractor.eval()
    batch = EVAL_IMAGES_PER_FORWARD["cpu"]
    chunks = [extractor(to_input(images[i : i + batch])) for i in range(0, len(images), batch)]
    return torch.cat(chunks).numpy().astype(np.float32)
