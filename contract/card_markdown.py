"""The model card as people read it: Markdown rendered from a :class:`ModelCard` by a Jinja2 template.

``templates/model_card.md.j2`` holds the words; this module only gathers the card's values into the template's
context and refuses a card that lacks what every card must say (scores, data, the command that reproduces it).
Register logs it, sets it as the registry version's description, and the service serves it.
"""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path

import jinja2

from contract.conformal import COVERAGE_LEVELS, level_key
from contract.model_card import INPUT_NAME, OUTPUT_NAME, ModelCard, metric_safe

TEMPLATE = "model_card.md.j2"
# Without these a card cannot say what the model is and how good it is.
REQUIRED_METRICS = ("best_val_acc", "test_acc", "test_auc", "test_balanced_acc")
REQUIRED_SPLITS = ("train", "val", "test")


class CardError(ValueError):
    """A card that cannot be built; the message names what is missing and what to do."""


@cache
def _template() -> jinja2.Template:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
        undefined=jinja2.StrictUndefined,  # a misspelt field fails the card instead of printing nothing
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,  # Markdown, not HTML
    )
    return env.get_template(TEMPLATE)


def missing(card: ModelCard) -> list[str]:
    """What the card lacks to be rendered, as field names."""
    gaps = [f"metrics.{k}" for k in REQUIRED_METRICS if k not in card.metrics]
    splits = card.data.get("splits") or {}
    gaps += [f"data.splits.{k}" for k in REQUIRED_SPLITS if k not in splits]
    gaps += [name for name in ("source_run", "command") if not getattr(card, name)]
    return gaps


def render(card: ModelCard) -> str:
    gaps = missing(card)
    if gaps:
        raise CardError(
            f"the model card of {card.architecture} on {card.dataset} (run {card.source_run or 'unknown'}) cannot "
            f"be built: it lacks {', '.join(gaps)}. The model was trained before MedZoo recorded them: train it "
            "again and register the new run."
        )
    return _template().render(**_context(card))


def _fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _context(card: ModelCard) -> dict:
    m = card.metrics
    recalls = [(name, m.get(f"test_recall_{metric_safe(name)}")) for name in card.class_names]
    counts = card.data.get("class_counts") or {}
    class_counts = [(name, counts[name]) for name in card.class_names if name in counts]
    known = [(name, r) for name, r in recalls if r is not None]
    weakest = min(known, key=lambda item: item[1])[0] if known else "n/a"
    nonzero = [c for _, c in class_counts if c]
    calibration_rows = [
        (label, {k: m.get(f"{split}_{k}") for k in ("ece", "ece_uncalibrated", "nll", "nll_uncalibrated")})
        for split, label in (("val", "validation (held-out half)"), ("test", "test"))
        if f"{split}_ece" in m
    ]
    conformal_rows = [
        (level_key(level), m.get(f"test_coverage_{round(level * 100)}"), m.get(f"test_set_size_{round(level * 100)}"))
        for level in COVERAGE_LEVELS
        if level_key(level) in card.conformal
    ]
    data = {"description": "", "license": "", **card.data}
    return {
        "card": card,
        "pre": card.preprocessing,
        "m": _Lenient(m),
        "data": data,
        "class_counts": class_counts,
        "recalls": recalls,
        "weakest": weakest,
        "imbalance": max(nonzero) / min(nonzero) if len(nonzero) > 1 else None,
        "calibration_rows": calibration_rows,
        "conformal_rows": conformal_rows,
        "rob": card.robustness or None,
        "fmt": _fmt,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
    }


class _Lenient(dict):
    """Metrics by attribute; one a card may lack (an older run's) reads as None and prints as n/a."""

    def __getattr__(self, name):
        return self.get(name)
