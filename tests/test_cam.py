"""Class activation maps: which heads have them, that they are what the head computes, and their ONNX graph."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

import zoo
from zoo.cam import Explained, cam_parts
from zoo.cam import explains as zoo_explains

VIEWS = ("identity", "hflip", "shift_up")


def net(name: str, **options) -> torch.nn.Module:
    return zoo.create_model(name, in_chans=3, num_classes=4, input_size=32, **options).eval()


@pytest.mark.parametrize(
    "name, options, pooling",
    [
        ("resnet9", {"width": 8}, "max"),
        ("cnn", {"filters": "8,16", "hidden": 0}, "avg"),
        ("resnet18", {}, "avg"),
        ("mobilenetv2", {}, "avg"),
        ("efficientnet_lite0", {}, "avg"),
    ],
)
def test_the_weighted_feature_map_is_what_the_pooled_head_scores(name, options, pooling):
    model = net(name, **options)
    parts = cam_parts(model)
    assert parts is not None and parts.pooling == pooling
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        fmap = parts(x)
        pooled = fmap.amax(dim=(-2, -1)) if pooling == "max" else fmap.mean(dim=(-2, -1))
        assert torch.allclose(parts.linear(pooled), model(x), atol=1e-4)
        if pooling == "avg":  # the map's mean is the logit less its bias
            cams = torch.einsum("kc,nchw->nkhw", parts.linear.weight, fmap)
            assert torch.allclose(cams.mean(dim=(-2, -1)) + parts.linear.bias, model(x), atol=1e-4)


@pytest.mark.parametrize(
    "name, options",
    [
        ("mlp", {}),
        ("alexnet", {}),
        ("cnn", {"filters": "8,16", "hidden": 32}),
        ("mobilenetv3_small", {}),
        ("convnext", {}),
    ],
)
def test_heads_without_a_pooled_linear_layer_have_no_map(name, options):
    model = net(name, **options)
    assert cam_parts(model) is None
    with pytest.raises(ValueError, match="no pooled linear head"):
        Explained(model, zoo.NormalizedClassifier(model, (0.5,) * 3, (0.25,) * 3))


def test_the_explanation_graph_answers_like_the_served_model_with_a_map_per_class():
    from training.export.onnx import export_explanation

    network = zoo.NormalizedClassifier(net("resnet9", width=8), (0.5,) * 3, (0.25,) * 3).eval()
    served = zoo.TemperatureScaled(zoo.TTAClassifier(network, VIEWS), 0.7).eval()
    pixels = np.random.default_rng(0).random((5, 3, 32, 32), dtype=np.float32)
    proto = export_explanation(served, network, 32, 3, pixels)
    assert [o.name for o in proto.graph.output] == ["logits", "cams"]
    logits, cams = ort.InferenceSession(proto.SerializeToString()).run(None, {"pixels": pixels})
    with torch.no_grad():
        assert np.allclose(logits, served(torch.from_numpy(pixels)).numpy(), atol=1e-4)
    assert cams.shape == (5, 4, 32, 32) and cams.min() >= 0 and cams.max() > 0


@pytest.mark.parametrize("name, options", [("resnet9", {"width": 8}), ("cnn", {"filters": "8,16", "hidden": 0})])
def test_grad_cam_on_the_last_map_agrees_with_the_served_activation_map(name, options):
    """Grad-CAM's channel weights on the last map are the head's weights over the map's area, for average and max
    pooling: the two maps must be the same up to scale."""
    from training.core import gradcam

    torch.manual_seed(0)
    network = zoo.NormalizedClassifier(net(name, **options), (0.5,) * 3, (0.25,) * 3).eval()
    layer_name, layer, size = gradcam.target_layer(network, 3, 32)
    assert min(size) >= 2 and layer_name.startswith("backbone.features")
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        logits, cams = Explained(network, network)(images.float() / 255)
    predicted = logits.argmax(1)
    maps = gradcam.grad_cam(network, layer, images, predicted.tolist())
    served = cams[torch.arange(6), predicted].numpy()
    agreement = [gradcam.pearson(a, b) for a, b in zip(served, maps)]
    assert np.nanmean(agreement) > 0.95, agreement


def test_a_one_pixel_last_map_is_no_explanation_and_grad_cam_takes_an_earlier_layer():
    from training.core import gradcam

    model = zoo.create_model("resnet18", in_chans=3, num_classes=4, input_size=28).eval()
    assert cam_parts(model) is not None and not zoo_explains(model, 3, 28) and zoo_explains(model, 3, 64)
    _, _, size = gradcam.target_layer(zoo.NormalizedClassifier(model, (0.5,) * 3, (0.25,) * 3), 3, 28)
    assert min(size) >= 2
