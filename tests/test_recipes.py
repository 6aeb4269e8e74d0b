"""Issue 10's training features: augmentation, policies, EMA, freezing, class balance, TTA, recipes, device."""

import json

import mlflow
import numpy as np
import pytest
import torch

import zoo
from tests.helpers.paths import WEIGHTS_DIR
from training.cli import main as cli_main
from training.core import policy
from training.core.augment import OPS, Augmenter, AugmentError
from training.core.config import ConfigError, TrainConfig
from training.core.data import Split
from training.core.engine import FitOptions, class_weights, epoch_order, fit
from training.core.recipes import config_from_recipe, load_recipes
from training.workflows.train import run_training

LITE0_WEIGHTS = WEIGHTS_DIR / "efficientnet_lite0_in1k_timm.safetensors"


def random_images(n=16, channels=3, size=28, seed=0):
    return torch.randint(
        0, 256, (n, channels, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def all_runs():
    return mlflow.search_runs(search_all_experiments=True, output_format="list")


# -- augmentation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", list(OPS))
def test_each_augmentation_keeps_shape_and_range_and_is_reproducible(op):
    images = random_images()
    out = Augmenter([op], torch.Generator().manual_seed(7))(images)
    again = Augmenter([op], torch.Generator().manual_seed(7))(images)
    other = Augmenter([op], torch.Generator().manual_seed(8))(images)
    assert out.shape == images.shape and out.dtype == torch.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    assert torch.equal(out, again)
    assert not torch.equal(out, other)  # a different seed draws differently
    assert not torch.equal(out, images.float() / 255)  # it did something


def test_translation_moves_each_image_by_at_most_two_pixels_and_independently():
    images = torch.zeros(64, 1, 28, 28, dtype=torch.uint8)
    images[:, 0, 14, 14] = 255
    out = Augmenter(["translate"], torch.Generator().manual_seed(0))(images)
    positions = [divmod(int(o.argmax()), 28) for o in out[:, 0]]
    assert all(abs(r - 14) <= 2 and abs(c - 14) <= 2 for r, c in positions)
    assert len(set(positions)) > 5  # per-sample draws, not one shift for the batch


def test_policy_refuses_flips_where_orientation_is_anatomy():
    assert not {"hflip", "vflip", "rot90"} & set(policy.resolve_augment("auto", "organamnist", 1))
    assert {"hflip", "vflip", "rot90"} <= set(policy.resolve_augment("auto", "bloodmnist", 3))
    with pytest.raises(AugmentError, match="hflip would change the label on organamnist"):
        policy.resolve_augment("translate,hflip", "organamnist", 1)
    with pytest.raises(AugmentError, match="unknown; allowed: none, auto, translate"):
        policy.resolve_augment("translate,cutout", "bloodmnist", 3)
    with pytest.raises(AugmentError, match="hflip would change the label"):
        policy.resolve_tta("identity,hflip", "organcmnist")
    assert policy.resolve_tta("auto", "organamnist")[0] == "identity"


# -- engine pieces --------------------------------------------------------------------------------------------


def tiny_split(n=64, classes=3, seed=0):
    labels = torch.arange(n) % classes
    images = random_images(n, 3, 28, seed)
    images[:, 0] = (labels * 80)[:, None, None].to(torch.uint8)  # learnable: channel 0 encodes the class
    return Split(images, labels)


def test_class_weights_and_oversampling_balance_a_skewed_set():
    labels = torch.tensor([0] * 90 + [1] * 10)
    weights = class_weights(labels, 2)
    assert weights.tolist() == pytest.approx([100 / 180, 100 / 20])
    assert float(weights[labels].mean()) == pytest.approx(1.0)
    order = epoch_order(labels, "oversample", torch.Generator().manual_seed(0))
    assert len(order) == 100 and 0.35 < float((labels[order] == 1).float().mean()) < 0.65
    assert sorted(epoch_order(labels, "none", torch.Generator().manual_seed(0)).tolist()) == list(range(100))


def test_ema_weights_differ_from_the_raw_weights_after_training():
    torch.manual_seed(0)
    model = zoo.create_model("cnn", in_chans=3, num_classes=3, input_size=28, filters="8", hidden=16)
    options = FitOptions(epochs=1, batch_size=16, lr=0.01, optimizer="sgd", ema=0.9)
    result = fit(model, tiny_split(), tiny_split(seed=1), ["a", "b", "c"], options, progress=False)
    metrics = result.history[0].metrics
    assert "ema_val_loss" in metrics and metrics["ema_val_loss"] != metrics["val_loss"]


def fit_checkpoints(every_s: float, crash_at: int = 0, epochs: int = 4) -> list[int]:
    """The epochs whose state reached the checkpoint writer in a tiny fit."""
    torch.manual_seed(0)
    model = zoo.create_model("cnn", in_chans=3, num_classes=3, input_size=28, filters="8", hidden=16)
    options = FitOptions(epochs=epochs, batch_size=16, lr=0.01, optimizer="sgd", checkpoint_every=every_s)
    written = []

    def crash(result):
        if result.epoch == crash_at:
            raise RuntimeError("power cut")

    try:
        fit(
            model,
            tiny_split(),
            tiny_split(seed=1),
            ["a", "b", "c"],
            options,
            crash,
            False,
            lambda state: written.append(state["epoch"]),
        )
    except RuntimeError:
        pass
    return written


def test_checkpoints_follow_the_interval_and_a_stopped_fit_saves_its_last_epoch():
    assert fit_checkpoints(every_s=0) == [1, 2, 3, 4]
    assert fit_checkpoints(every_s=3600) == [1, 4]  # the first epoch, then the final one on the way out
    assert fit_checkpoints(every_s=3600, crash_at=3) == [1, 3]  # the crashed epoch was finished and is kept


def test_folded_evaluation_gives_the_model_outputs_and_leaves_the_model_alone():
    from training.core.engine import folded, predict

    torch.manual_seed(0)
    model = zoo.TTAClassifier(
        zoo.create_model("resnet9", in_chans=3, num_classes=3, input_size=28, width=8), ("identity", "shift_left")
    )
    fit(
        model,
        tiny_split(),
        tiny_split(seed=1),
        ["a", "b", "c"],
        FitOptions(epochs=1, batch_size=16, lr=0.01),
        progress=False,
    )  # BatchNorm statistics that are not 0 and 1
    model.eval()
    fused = folded(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # a copy was folded
    x = random_images(8).float() / 255
    with torch.no_grad():
        assert torch.allclose(fused(x), model(x), atol=1e-5)
    probs, _ = predict(model, tiny_split(seed=2))
    with torch.no_grad():
        expected = model(tiny_split(seed=2).images.float() / 255).softmax(1).numpy()
    assert np.allclose(probs, expected, atol=1e-5)
    # Selection evaluates at the step's precision: bf16 probabilities near the float32 ones, and not the same numbers.
    bf16_probs, _ = predict(model, tiny_split(seed=2), precision="bf16")
    assert np.abs(bf16_probs - probs).max() < 0.05 and not np.array_equal(bf16_probs, probs)


def test_precision_auto_follows_the_hardware_and_bad_values_are_named():
    from training.core.config import ConfigError, resolve
    from training.core.devices import native_bf16

    run = resolve(TrainConfig(dataset="bloodmnist", model="resnet9"))
    assert run.precision == ("bf16" if native_bf16() else "fp32")
    assert resolve(TrainConfig(dataset="bloodmnist", model="mobilenetv2")).precision == "fp32"  # 0.44x in bf16
    assert resolve(TrainConfig(dataset="bloodmnist", precision="fp32")).precision == "fp32"
    with pytest.raises(ConfigError, match="precision='fp16' is not one of: auto, fp32, bf16"):
        resolve(TrainConfig(dataset="bloodmnist", precision="fp16"))


@pytest.mark.parametrize("spec, moving", [("backbone", {"backbone.classifier"}), ("2", {"backbone.blocks.2"})])
def test_frozen_parameters_do_not_move_while_the_head_does(spec, moving):
    torch.manual_seed(0)
    backbone = zoo.create_model("efficientnet_lite0", in_chans=3, num_classes=3, input_size=28)
    frozen = set(zoo.freeze(backbone, spec))
    model = zoo.NormalizedClassifier(backbone, (0.5,) * 3, (0.25,) * 3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    head = zoo.head_parameter_names(backbone, prefix="backbone.")
    options = FitOptions(epochs=1, batch_size=16, lr=0.01, optimizer="adamw", head_lr=0.05, head_parameters=head)
    fit(model, tiny_split(), tiny_split(seed=1), ["a", "b", "c"], options, progress=False)
    after = dict(model.named_parameters())
    for name in before:
        changed = not torch.equal(before[name], after[name].detach())
        if name.removeprefix("backbone.") in frozen:
            assert not changed, name
    assert any(not torch.equal(before[n], after[n].detach()) for n in before if n.startswith(tuple(moving)))


def test_freeze_beyond_the_stages_is_a_clear_error():
    backbone = zoo.create_model("resnet18", in_chans=1, num_classes=3, input_size=28)
    with pytest.raises(zoo.ZooError, match="has 4 stages"):
        zoo.freeze(backbone, "9")


def test_tta_in_the_onnx_graph_matches_pytorch():
    from training.export.onnx import check_parity, export_onnx

    torch.manual_seed(0)
    for channels, dataset in ((3, "bloodmnist"), (1, "organamnist")):
        base = zoo.create_model("resnet9", in_chans=channels, num_classes=4, input_size=28, width=4).eval()
        model = zoo.TTAClassifier(base, policy.resolve_tta("auto", dataset)).eval()
        proto = export_onnx(model, 28, channels, {"dataset": dataset})
        images = np.random.default_rng(0).random((12, channels, 28, 28), dtype=np.float32)
        report = check_parity(proto, model, images)
        assert report.ok and report.max_abs_diff <= 1e-4, report.describe()
        with torch.no_grad():  # the graph averages probabilities of the views, not one view's answer
            single = base(torch.from_numpy(images)).softmax(-1)
            averaged = model(torch.from_numpy(images)).exp()
        assert torch.allclose(averaged.sum(-1), torch.ones(12), atol=1e-5)
        assert not torch.allclose(single, averaged, atol=1e-4)


# -- recipes and runs -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_recipe_loads_and_runs_one_tiny_epoch(synthetic_env, mlflow_store):
    recipes = load_recipes()
    assert {"quick", "best", "medmnist-v2"} <= set(recipes)
    for name in recipes:
        config = config_from_recipe(name, dataset="bloodmnist", epochs=1, batch_size=32)
        assert config.recipe == name and config.epochs == 1
        outcome = run_training(config, progress=False)
        run = mlflow.get_run(outcome.run_id)
        assert run.info.status == "FINISHED" and run.data.params["recipe"] == name
        assert run.data.params["model"] == recipes[name].values["model"]
    v2 = config_from_recipe("medmnist-v2", dataset="organamnist")
    assert (v2.model, v2.model_kwargs, v2.optimizer, v2.lr, v2.batch_size, v2.epochs, v2.scheduler, v2.augment) == (
        "resnet18",
        {"cifar_stem": True},
        "adam",
        0.001,
        128,
        100,
        "multistep",
        "none",
    )
    assert v2.select_metric == "last"  # what the paper's code keeps (configs/recipes.yaml says why)
    assert v2.ranking_metric == "auc" and config_from_recipe("quick").ranking_metric == "acc"
    assert config_from_recipe("best", dataset="breastmnist").members == 5
    assert config_from_recipe("best", dataset="organamnist").members == 1  # 34,561 images fill the budget alone
    assert config_from_recipe("quick", model="cnn").model_kwargs == {}  # the recipe's options were its model's
    assert config_from_recipe("quick", model_kwargs={"dropout": 0.1}).model_kwargs == {
        "width": 16,
        "whiten": True,
        "dirac_init": True,
        "bn_scales": False,
        "dropout": 0.1,
    }


@pytest.mark.slow
def test_a_tta_run_exports_with_its_views_and_parity(synthetic_env, mlflow_store):
    from onnx import numpy_helper

    from training.export.onnx import export_run

    config = config_from_recipe("quick", dataset="bloodmnist", epochs=1, batch_size=32, model_kwargs={"width": 4})
    outcome = run_training(config, progress=False)
    result = export_run(outcome.run_id)
    props = {p.key: p.value for p in result.proto.metadata_props}
    assert json.loads(props["tta"]) == list(policy.auto_tta("bloodmnist"))
    assert result.parity.ok and result.parity.images == 48  # the synthetic val split, logged with the model
    run = mlflow.get_run(outcome.run_id)
    assert run.data.params["tta_views"] == "identity,hflip,vflip,rot180" and "augment_ops" in run.data.params
    assert run.data.tags["selected_weights"] in ("raw", "ema")
    # quick's whitening layer: eigenvectors of the training patches and their negatives, set before training and
    # frozen through it (random filters are neither).
    [whitening] = [numpy_helper.to_array(t) for t in result.proto.graph.initializer if tuple(t.dims) == (24, 3, 2, 2)]
    assert np.allclose(whitening[12:], -whitening[:12], atol=1e-6) and np.abs(whitening).max() > 0.5


@pytest.mark.slow
@pytest.mark.skipif(not LITE0_WEIGHTS.exists(), reason="no local efficientnet_lite0 weights")
def test_partial_fine_tuning_from_the_local_imagenet_weights(synthetic_env, mlflow_store):
    config = TrainConfig(
        model="efficientnet_lite0",
        dataset="bloodmnist",
        pretrained=str(LITE0_WEIGHTS),
        freeze="3",
        head_lr=0.01,
        epochs=1,
        batch_size=32,
    )
    outcome = run_training(config, progress=False)
    params = mlflow.get_run(outcome.run_id).data.params
    assert params["freeze"] == "3" and params["mean"] == "0.485,0.456,0.406"  # timm pretrained_cfg


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--recipe", "fastest"], "recipe='fastest' is not one of: none, quick, best, medmnist-v2"),
        (["--optimizer", "adagrad"], "optimizer='adagrad' is not one of: sgd, adam, adamw, nadamw, lamb, lion"),
        (["--augment", "translate,cutout"], "cutout unknown; allowed: none, auto, translate"),
        (["--class-balance", "smote"], "class_balance='smote' is not one of: none, weighted_loss, oversample"),
        (["--freeze", "backbone"], "freeze='backbone' needs pretrained weights"),
        (["--epochs", "ten"], "epochs='ten'"),
    ],
)
def test_bad_training_input_names_the_value_and_creates_no_run(argv, message, synthetic_env, mlflow_store, capsys):
    assert cli_main(["train", "--dataset", "bloodmnist", "--no-progress", *argv]) == 2
    assert message in capsys.readouterr().err
    assert all_runs() == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_a_clear_error(synthetic_env, mlflow_store, capsys):
    assert cli_main(["train", "--dataset", "bloodmnist", "--device", "cuda", "--epochs", "1"]) == 2
    assert "device='cuda' but this machine has no CUDA GPU" in capsys.readouterr().err
    assert all_runs() == []


def test_the_scale_rule_sizes_a_recipe_by_the_training_set_and_names_no_dataset(tmp_path):
    from training.core.recipes import Scale

    rule = Scale(images_seen=210_000, max_epochs=120, max_width=32, min_steps_per_epoch=8, max_members=3)
    values = {"model_kwargs": {"width": 16}, "batch_size": 128}
    large = rule.apply(values, 34_561)
    assert (large["epochs"], large["model_kwargs"]["width"], large["batch_size"], large["members"]) == (6, 16, 128, 1)
    small = rule.apply(values, 546)  # 120 epochs use 65,520 of 210,000: x3.2 left, width 16 x 1.79 -> 32
    assert (small["epochs"], small["model_kwargs"]["width"], small["batch_size"], small["members"]) == (120, 32, 64, 1)
    tiny = rule.apply(values, 100)  # 17.5x left: width 32 takes 4x, 3 members (at most) take the rest
    assert (tiny["model_kwargs"]["width"], tiny["batch_size"], tiny["members"]) == (32, 16, 3)
    assert values == {"model_kwargs": {"width": 16}, "batch_size": 128}  # the recipe itself is not changed
    # what a run gets: the rule for its dataset's training split, or for max_train_samples of it
    assert config_from_recipe("quick", dataset="breastmnist").batch_size == 64
    # quick's 140,000 images: 120 epochs of 546 use 65,520, x2.14 left: width 16 x 1.46 -> 24
    assert config_from_recipe("quick", dataset="organamnist", max_train_samples=546).model_kwargs["width"] == 24
    assert config_from_recipe("quick", dataset="breastmnist", epochs=3).epochs == 3  # given values win

    bad = tmp_path / "recipes.yaml"
    bad.write_text("r:\n  model: cnn\n  by_dataset: {bloodmnist: {epochs: 3}}\n")
    with pytest.raises(ConfigError, match="recipe r sets by_dataset; recipes may set: .* and scale"):
        load_recipes(bad)
    bad.write_text("r:\n  scale: {images: 1000}\n")
    with pytest.raises(ConfigError, match="scale sets images; it may set: images_seen, max_epochs"):
        load_recipes(bad)
