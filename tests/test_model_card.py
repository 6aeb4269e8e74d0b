"""The model card: its fields travel through every encoding, and its Markdown says what a clinician asks."""

import json

import numpy as np
import pytest

from contract import ModelCard, Preprocessing, card_markdown
from training.core.metrics import top_confusions
from training.core.options import mlflow_command, reproduce_command
from training.core.recipes import config_from_recipe, train_command
from training.workflows.ensemble import EnsembleConfig

NAMES = ("benign", "malignant, invasive")


def full_card(**overrides) -> ModelCard:
    metrics = {
        "best_val_acc": 0.91,
        "best_val_auc": 0.95,
        "test_acc": 0.875,
        "test_auc": 0.93,
        "test_balanced_acc": 0.8125,
        "test_recall_benign": 0.95,
        "test_recall_malignant__invasive": 0.675,
        "test_ece": 0.012,
        "test_ece_uncalibrated": 0.061,
        "test_nll": 0.31,
        "test_nll_uncalibrated": 0.45,
        "test_coverage_90": 0.912,
        "test_set_size_90": 1.21,
        "n_params": 1234,
    }
    card = ModelCard(
        architecture="resnet9",
        dataset="breastmnist",
        task="binary-class",
        class_names=NAMES,
        preprocessing=Preprocessing(28, 1, (0.3,), (0.2,)),
        tta=("identity", "hflip"),
        temperature=1.5,
        conformal={"0.90": 0.8},
        conformal_images=39,
        recipe="quick",
        command="mlflow run . -e train --env-manager local -P recipe=quick -P dataset=breastmnist -P seed=0",
        data={
            "description": "Breast ultrasound images from one hospital.",
            "license": "CC BY 4.0",
            "splits": {"train": 546, "val": 78, "test": 156},
            "class_counts": {"benign": 399, "malignant, invasive": 147},
        },
        confusions=({"true": "malignant, invasive", "predicted": "benign", "count": 13, "share": 0.3095},),
        source_run="abc123",
    ).with_run("abc123", metrics)
    return ModelCard(**{**card.__dict__, **overrides})


def test_every_card_field_survives_the_three_encodings_and_older_cards_read_with_defaults():
    card = full_card(robustness={"be": 0.2})
    assert ModelCard.from_props(card.to_props()) == card
    assert ModelCard.from_dict(json.loads(json.dumps(card.to_dict()))) == card
    assert card.metrics["test_recall_benign"] == 0.95 and "n_params" in card.metrics
    # Registry tags keep the few registry metrics, not every per-class score.
    tags = card.registry_tags("ok")
    assert "test_acc" in tags and "test_recall_benign" not in tags
    # An ONNX file written before the card grew: flat metrics, no recipe, data or confusions.
    old = {k: v for k, v in card.to_props().items() if k not in ("metrics", "recipe", "command", "data", "confusions")}
    old_card = ModelCard.from_props(old)
    assert old_card.metrics == {
        "best_val_acc": 0.91,
        "best_val_auc": 0.95,
        "test_acc": 0.875,
        "test_auc": 0.93,
        "n_params": 1234.0,
    }
    assert old_card.command == "" and old_card.data == {} and old_card.confusions == ()


def test_the_markdown_card_says_use_data_recipe_scores_calibration_sets_confusions_and_io():
    text = card_markdown.render(full_card().with_registry("medzoo-breastmnist", "3"))
    assert "Registered model `medzoo-breastmnist`, version 3" in text
    assert "Not for diagnosis" in text and "research and education" in text
    assert "Breast ultrasound images from one hospital." in text and "CC BY 4.0" in text
    assert "| train | 546 |" in text and "benign 399, malignant, invasive 147" in text
    assert "-P recipe=quick -P dataset=breastmnist -P seed=0" in text and "identity, hflip" in text
    assert "| 0.8750 | 0.9300 | 0.8125 | 0.9100 |" in text
    assert "| malignant, invasive | 0.6750 |" in text
    assert "temperature of 1.500" in text and "| test | 0.0610 | 0.0120 | 0.4500 | 0.3100 |" in text
    assert "adaptive prediction sets (APS), calibrated on\n39 validation images" in text
    assert "| 0.90 | 0.9120 | 1.21 |" in text
    raps = card_markdown.render(full_card(conformal_penalty={"weight": 0.02, "free_ranks": 2}))
    assert "(RAPS, penalty 0.02 past rank 2)" in raps
    assert "| malignant, invasive | benign | 13 | 30.9% |" in text
    assert "2.7x the training images of the rarest" in text and "recall\n  is lowest on malignant, invasive" in text
    assert "robustness --model medzoo-breastmnist@champion" in text  # not measured yet: how to measure it
    assert "input `pixels`: float32 [N, 1, 28, 28]" in text and "output `logits`: float32 [N, 2]" in text
    robust = {
        "clean_balanced_acc": 0.81,
        "corrupted_balanced_acc": 0.7,
        "be": 0.3,
        "rbe": 0.9,
        "worst_corruption": "speckle_noise",
        "worst_balanced_acc": 0.55,
        "run_id": "r0b",
    }
    text = card_markdown.render(full_card(robustness=robust))
    assert "| 0.8100 | 0.7000 | 0.3000 | 0.9000 | speckle_noise (0.5500) |" in text and "`r0b`" in text


def test_an_uncalibrated_card_says_so_and_a_card_without_scores_names_what_it_lacks():
    text = card_markdown.render(full_card(temperature=1.0, conformal={}, confusions=()))
    assert "Not calibrated" in text and "exported without conformal thresholds" in text
    assert "Known confusions\n\nNone recorded." in text
    lacks = r"lacks metrics\.test_balanced_acc, data\.splits\.train.*command"
    with pytest.raises(card_markdown.CardError, match=lacks):
        card_markdown.render(
            full_card(
                metrics={"best_val_acc": 0.9, "test_acc": 0.8, "test_auc": 0.9},
                data={"splits": {"val": 1, "test": 2}},
                command="",
            )
        )


def test_top_confusions_are_the_largest_off_diagonal_counts_with_their_share():
    y_true = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2])
    predicted = np.array([1, 1, 0, 2, 1, 1, 0, 2, 2])
    probs = np.eye(3)[predicted]
    found = top_confusions(y_true, probs, ["a", "b", "c"], k=5)
    assert found[0] == {"true": "a", "predicted": "b", "count": 2, "share": 0.5}
    assert {(c["true"], c["predicted"], c["count"]) for c in found[1:]} == {("a", "c", 1), ("c", "a", 1)}


def test_the_reproducing_commands_name_only_what_differs_and_leave_the_machine_out():
    config = config_from_recipe("quick", dataset="bloodmnist", seed=2, mixup=0.0, device="cpu", data_dir="/x")
    assert train_command(config) == (
        "mlflow run . -e train --env-manager local -P recipe=quick -P model=resnet9 -P dataset=bloodmnist "
        "-P seed=2 -P mixup=0.0"
    )
    command = reproduce_command("ensemble", EnsembleConfig(runs=["r1", "r2"], weights="0.5,0.5"))
    assert command == "mlflow run . -e ensemble --env-manager local -P runs=r1,r2 -P weights=0.5,0.5"
    assert mlflow_command("train", {"note": "two words", "seed": "0"}, {"seed": "0"}) == (
        "mlflow run . -e train --env-manager local -P 'note=two words'"
    )
