import collections

import pytest
import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

import zoo
from training.core.engine import snapshot
from training.core.folding import folded


def _train_a_step(model: nn.Module, images: torch.Tensor) -> None:
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.zero_grad()
    model(images).logsumexp(dim=1).mean().backward()
    optimizer.step()  # BatchNorm's running statistics move too


@pytest.mark.parametrize(
    "name, options",
    [
        ("resnet9", {"width": 16, "whiten": True, "dirac_init": True, "bn_scales": False}),
        ("cnn", {}),
        ("mlp", {"batch_norm": True}),
    ],
)
def test_the_cached_copy_answers_bit_for_bit_what_torch_fuse_answers_after_every_step(name, options):
    torch.manual_seed(0)
    model = zoo.create_model(name, in_chans=1, num_classes=5, **options)
    images = torch.rand(16, 1, 28, 28)
    copies = []
    for _ in range(3):
        _train_a_step(model, images)
        copies.append(folded(model))
        model.eval()
        with torch.inference_mode():
            assert torch.equal(copies[-1](images), fuse(model)(images))
            assert torch.allclose(copies[-1](images), model(images), atol=1e-4)
    assert copies[0] is copies[1] is copies[2]  # traced once, refreshed since
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in copies[0].modules())


def test_a_replaced_layer_or_a_first_call_under_inference_mode_builds_a_working_copy():
    torch.manual_seed(0)
    model = zoo.create_model("cnn", in_chans=1, num_classes=5)
    images = torch.rand(4, 1, 28, 28)
    with torch.inference_mode():
        first = folded(model)(images)
    _train_a_step(model, images)
    model.eval()
    changed = folded(model)(images)  # refreshed outside inference mode: its tensors are normal ones
    assert not torch.equal(first, changed)
    name, head = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    parent, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent), attribute, nn.Linear(head.in_features, 3))
    with torch.inference_mode():
        assert folded(model)(images).shape == (4, 3)


def test_a_model_torch_fx_cannot_trace_is_evaluated_as_it_is():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 2)

        def forward(self, x):
            return self.linear(x) if x.sum() > 0 else -self.linear(x)

    model = DataDependent()
    assert folded(model) is model
    assert folded(model) is model


def test_a_checkpoint_snapshot_does_not_move_with_training():
    Pair = collections.namedtuple("Pair", "epoch metrics")
    weights = torch.ones(3)
    state = {
        "model": collections.OrderedDict(w=weights),
        "history": [Pair(1, {"acc": 0.5})],
        "name": "x",
        "per_param": collections.defaultdict(dict, {0: {"step": torch.zeros(())}}),
    }
    copy = snapshot(state)
    weights.add_(1)
    state["history"].append(Pair(2, {"acc": 0.6}))
    assert torch.equal(copy["model"]["w"], torch.ones(3))
    assert isinstance(copy["model"], collections.OrderedDict)
    assert copy["history"] == [Pair(1, {"acc": 0.5})] and isinstance(copy["history"][0], Pair)
    assert copy["name"] == "x"
    state["per_param"][0]["step"].add_(1)
    assert copy["per_param"].default_factory is dict and copy["per_param"][0]["step"].item() == 0
