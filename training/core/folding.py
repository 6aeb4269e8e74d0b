"""Inference copies of a model with each BatchNorm folded into the convolution or linear layer before it.

Folding makes evaluation faster on the CPU (1.18x in benchmarks/step_speed.py's 5-view pass), but torch.fx's
``fuse`` deep-copies and traces the model on every call: on BreastMNIST's 78 validation images that was 40% of an
evaluation (py-spy of a `quick` run, 2026-12-03), paid twice an epoch (raw and EMA weights). Here the copy is
traced and folded once per model and only its weights are refreshed before each use, with torch's own folding
arithmetic (``fuse_conv_bn_weights``), so the outputs are bit for bit those of ``fuse``. Models torch.fx cannot
trace symbolically are evaluated as they are.
"""

from __future__ import annotations

import copy
import weakref

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_conv_bn_weights, fuse_linear_bn_eval, fuse_linear_bn_weights

# The layer pairs torch.fx.experimental.optimization.fuse folds.
FOLDABLE = (
    (nn.Conv1d, nn.BatchNorm1d),
    (nn.Conv2d, nn.BatchNorm2d),
    (nn.Conv3d, nn.BatchNorm3d),
    (nn.Linear, nn.BatchNorm1d),
)


class FoldedCopy:
    """A traced copy of ``model`` with its BatchNorms folded away, refreshed from ``model``'s current weights."""

    def __init__(self, model: nn.Module):
        self.structure = _structure(model)
        self.graph_module = fx.symbolic_trace(copy.deepcopy(model))
        modules = dict(self.graph_module.named_modules())
        self.pairs: list[tuple[str, str]] = []  # (layer, BatchNorm) names, as in ``model``
        graph = self.graph_module.graph
        for node in list(graph.nodes):
            layer_node = node.args[0] if node.op == "call_module" and node.args else None
            if not isinstance(layer_node, fx.Node) or layer_node.op != "call_module" or len(layer_node.users) > 1:
                continue
            layer, norm = modules.get(layer_node.target), modules[node.target]
            if (type(layer), type(norm)) not in FOLDABLE or not norm.track_running_stats:
                continue
            fold = fuse_linear_bn_eval if isinstance(layer, nn.Linear) else fuse_conv_bn_eval
            parent, _, name = layer_node.target.rpartition(".")
            setattr(self.graph_module.get_submodule(parent), name, fold(layer.eval(), norm.eval()))
            node.replace_all_uses_with(layer_node)
            graph.erase_node(node)
            self.pairs.append((layer_node.target, node.target))
        graph.lint()
        self.graph_module = fx.GraphModule(self.graph_module, graph)  # drops the folded BatchNorms
        folded_layers = {layer for layer, _ in self.pairs}
        self.copied = [key for key in self.graph_module.state_dict() if key.rpartition(".")[0] not in folded_layers]

    def refresh(self, model: nn.Module) -> nn.Module:
        """The folded copy with ``model``'s weights and running statistics as they are now."""
        source = model.state_dict()
        target = self.graph_module.state_dict()
        for key in self.copied:
            target[key].copy_(source[key])
        for layer_name, norm_name in self.pairs:
            layer, norm = model.get_submodule(layer_name), model.get_submodule(norm_name)
            folded = self.graph_module.get_submodule(layer_name)
            weights = (fuse_linear_bn_weights if isinstance(layer, nn.Linear) else fuse_conv_bn_weights)(
                layer.weight, layer.bias, norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias
            )
            folded.weight.copy_(weights[0])
            folded.bias.copy_(weights[1])
        return self.graph_module.eval()


_copies: weakref.WeakKeyDictionary[nn.Module, FoldedCopy | None] = weakref.WeakKeyDictionary()


def folded(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with its BatchNorms folded (a cached copy); ``model`` itself if it cannot be traced."""
    model.eval()
    # Built and refreshed with normal tensors even when called under inference mode: inference tensors could not be
    # refreshed in place outside it.
    with torch.inference_mode(False), torch.no_grad():
        return _folded(model)


def _folded(model: nn.Module) -> nn.Module:
    entry = _copies.get(model, False)
    if entry is False or (entry is not None and entry.structure != _structure(model)):
        try:
            entry = FoldedCopy(model)
        except Exception:  # noqa: BLE001 - fx raises many kinds of errors on untraceable Python control flow
            entry = None
        _copies[model] = entry
    return model if entry is None else entry.refresh(model)


def _structure(model: nn.Module) -> tuple:
    """What a cached copy was built from: every submodule's name, type and identity. A replaced layer or a new head
    changes it, and the copy is built again; weights that change in place are what ``refresh`` is for."""
    return tuple((name, type(module), id(module)) for name, module in model.named_modules())
