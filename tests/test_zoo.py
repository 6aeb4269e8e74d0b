import pytest
import timm
import torch
from torch import nn

import zoo
from tests.helpers.paths import WEIGHTS_DIR


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("name", zoo.list_models())
def test_every_model_trains_at_its_minimum_size(name, in_chans):
    torch.manual_seed(0)
    size = zoo.get_model_config(name).min_input_size
    model = zoo.create_model(name, in_chans=in_chans, num_classes=5, input_size=size)
    model.train()
    images, labels = torch.rand(8, in_chans, size, size), torch.arange(8) % 5
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    # Two steps: timm ResNets zero-init each block's last BN scale, which blocks gradients until one step.
    for _ in range(2):
        optimizer.zero_grad()
        logits = model(images)
        assert logits.shape == (8, 5)
        loss = nn.functional.cross_entropy(logits, labels)
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
    starved = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not starved, f"no gradient reaches {starved}"


def test_registry_lists_the_issue_models():
    assert set(zoo.list_models()) >= {
        "mlp",
        "cnn",
        "alexnet",
        "resnet18",
        "resnet50",
        "mobilenetv2",
        "mobilenetv3_small",
        "efficientnet_b0",
        "efficientnet_lite0",
        "convnext",
    }


def test_unknown_model_names_close_matches():
    with pytest.raises(zoo.ZooError, match="Did you mean mobilenetv2"):
        zoo.create_model("mobilenet_v2")


def test_unknown_option_lists_allowed_options():
    with pytest.raises(zoo.ZooError, match="has no option.*kernel.*Its options: filters, kernel_size"):
        zoo.create_model("cnn", kernel=5)


def test_minimum_input_size_is_enforced():
    with pytest.raises(zoo.ZooError, match="at least 32 px"):
        zoo.create_model("convnext", input_size=28)


def test_bad_option_values_name_what_is_allowed():
    with pytest.raises(zoo.ZooError, match="pool='median' is not one of: max, avg"):
        zoo.create_model("cnn", pool="median")
    with pytest.raises(zoo.ZooError, match="kernel_size=4"):
        zoo.create_model("cnn", kernel_size=4)
    with pytest.raises(zoo.ZooError, match="init='orthogonal'"):
        zoo.create_model("mlp", init="orthogonal")
    with pytest.raises(zoo.ZooError, match="needs input_size >= 32"):
        zoo.create_model("cnn", filters="8,8,8,8,8", input_size=28)


def test_cnn_options_shape_the_network():
    model = zoo.create_model("cnn", in_chans=1, num_classes=3, filters=[8, 16, 32], kernel_size=5, pool="avg")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 32]
    assert all(c.kernel_size == (5, 5) for c in convs)
    assert any(isinstance(m, nn.AvgPool2d) for m in model.modules())


@pytest.mark.parametrize("name", ["mlp", "cnn", "alexnet"])
def test_batch_norm_flag_reads_text_as_a_card_holds_it(name):
    # bool("false") is True: the flag is read as text, so a card's "false" builds a net without BatchNorm
    def norms(value):
        model = zoo.create_model(name, in_chans=1, num_classes=3, input_size=28, batch_norm=value)
        return sum(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in model.modules())

    assert norms("false") == norms(False) == norms(0) == 0
    assert norms("true") == norms(True) > 0
    with pytest.raises(zoo.ZooError, match="batch_norm='sometimes' must be true or false"):
        norms("sometimes")


def test_kaiming_uniform_init_changes_the_weights_and_zeroes_biases():
    torch.manual_seed(0)
    model = zoo.create_model("mlp", in_chans=1, num_classes=3, init="kaiming_uniform", hidden="32")
    first = model.body[1]
    bound = (6 / first.in_features) ** 0.5
    assert first.weight.abs().max() <= bound and first.weight.abs().max() > 0.9 * bound
    assert torch.all(first.bias == 0)


def test_resnet_cifar_stem_keeps_28px_resolution():
    model = zoo.create_model("resnet18", in_chans=1, num_classes=2, cifar_stem=True)
    assert model.conv1.stride == (1, 1) and isinstance(model.maxpool, nn.Identity)
    assert model.forward_features(torch.rand(1, 1, 28, 28)).shape[-1] == 4  # 28 / 8, not 28 / 32
    # initialised as the MedMNIST v2 code: no zero-initialised last BatchNorm in the blocks
    assert all(torch.all(block.bn2.weight == 1) for block in model.layer1)
    assert torch.all(timm.create_model("resnet18").layer1[0].bn2.weight == 0)


def test_any_timm_architecture_by_prefix():
    model = zoo.create_model("timm/resnet10t", in_chans=3, num_classes=4, input_size=32)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 4)
    with pytest.raises(zoo.ZooError, match="timm has no architecture 'resnet10x'"):
        zoo.create_model("timm/resnet10x")


def test_pretrained_without_internet_or_file_is_a_clear_error(tmp_path):
    with pytest.raises(zoo.ZooError, match="no weights file there"):
        zoo.create_model("efficientnet_lite0", pretrained=str(tmp_path / "missing.safetensors"))


@pytest.mark.skipif(not (WEIGHTS_DIR / "efficientnet_lite0_in1k_timm.safetensors").exists(), reason="no shared weights")
def test_pretrained_weights_from_a_local_file_are_loaded():
    from safetensors.torch import load_file

    path = WEIGHTS_DIR / "efficientnet_lite0_in1k_timm.safetensors"
    model = zoo.create_model("efficientnet_lite0", in_chans=3, num_classes=11, pretrained=str(path))
    reference = load_file(path)
    assert torch.equal(model.conv_stem.weight, reference["conv_stem.weight"])
    assert model.classifier.out_features == 11
    gray = zoo.create_model("efficientnet_lite0", in_chans=1, num_classes=11, pretrained=str(path))
    assert torch.allclose(gray.conv_stem.weight, reference["conv_stem.weight"].sum(dim=1, keepdim=True))


def test_normalized_classifier_applies_mean_and_std():
    backbone = nn.Identity()
    model = zoo.NormalizedClassifier(backbone, mean=(0.5,), std=(0.25,))
    x = torch.full((1, 1, 2, 2), 0.75)
    assert torch.allclose(model(x), torch.ones(1, 1, 2, 2))


def _smooth_images(n=64, chans=1, size=28):
    """Neighbouring pixels correlate, as in real images: what patch whitening undoes."""
    noise = torch.rand(n, chans, size + 3, size + 3)
    return nn.functional.avg_pool2d(noise, 4, stride=1)


def test_resnet9_whitening_filters_whiten_the_training_patches_and_stay_frozen():
    images = _smooth_images(chans=3)
    model = zoo.create_model("resnet9", in_chans=3, num_classes=5, input_size=28, width=8, whiten=True)
    whitening = model.features[0][0]
    assert tuple(whitening.weight.shape) == (24, 3, 2, 2) and not whitening.weight.requires_grad
    normalized = (images - images.mean()) / images.std()
    model.init_from_data(normalized)
    with torch.no_grad():
        out = nn.functional.conv2d(normalized, whitening.weight[:12])  # the eigenvector half; the rest is its negative
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12)
    covariance = flat.T @ flat / len(flat)
    assert torch.allclose(covariance, torch.eye(12), atol=0.05)
    assert torch.equal(whitening.weight[12:], -whitening.weight[:12])
    assert model(images).shape == (64, 5)


def test_resnet9_takes_training_images_through_its_normalisation():
    backbone = zoo.create_model("resnet9", in_chans=1, num_classes=3, input_size=28, width=8, whiten=True)
    model = zoo.NormalizedClassifier(backbone, mean=(0.5,), std=(0.25,))
    images = _smooth_images()
    model.init_from_data(images)
    reference = zoo.create_model("resnet9", in_chans=1, num_classes=3, input_size=28, width=8, whiten=True)
    reference.init_from_data((images - 0.5) / 0.25)
    assert torch.allclose(backbone.features[0][0].weight, reference.features[0][0].weight, atol=1e-5)


def test_resnet9_dirac_init_and_frozen_batchnorm_scales():
    model = zoo.create_model("resnet9", in_chans=3, num_classes=5, input_size=28, width=8, dirac_init=True)
    conv = model.features[1][0]  # 8 -> 16 channels: its first 8 filters pass their input through
    x = torch.rand(2, 8, 6, 6)
    assert torch.allclose(nn.functional.conv2d(x, conv.weight[:8], padding=1), x)
    frozen = zoo.create_model("resnet9", in_chans=3, num_classes=5, input_size=28, width=8, bn_scales=False)
    norms = [m for m in frozen.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(not m.weight.requires_grad and m.bias.requires_grad for m in norms)


def test_resnet9_airbench_options_name_bad_values():
    with pytest.raises(zoo.ZooError, match="whiten=true needs inputs of at least 16 px, got 8"):
        zoo.create_model("resnet9", in_chans=1, num_classes=2, input_size=8, whiten=True)
    with pytest.raises(zoo.ZooError, match="bn_scales='maybe' must be true or false"):
        zoo.create_model("resnet9", in_chans=1, num_classes=2, input_size=28, bn_scales="maybe")
