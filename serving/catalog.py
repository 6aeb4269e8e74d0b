"""The models a service answers for: one onnxruntime session per task, with its metadata and aliases.

Everything comes from the BentoML model store entries that ``serving.deploy`` wrote from the MLflow
registry champions; this module never imports torch or the training code.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import onnxruntime as ort

from contract import ModelCard, card_markdown, conformal
from serving.batching import MicroBatcher
from serving.preprocessing import RequestError
from serving.schemas import ModelInfo

# The ONNX file's name inside a BentoML model folder (written by deploy, read here).
ONNX_FILE = "model.onnx"
# Short names people use; every task also answers to its dataset name without the "mnist" suffix.
EXTRA_ALIASES = {"organamnist": ("organ",), "bloodmnist": ("blood", "blood-cell")}


def task_aliases(dataset: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys((dataset, dataset.removesuffix("mnist"), *EXTRA_ALIASES.get(dataset, ()))))


@dataclass
class ServedModel:
    card: ModelCard
    session: ort.InferenceSession
    tag: str = ""  # the BentoML store tag it was loaded from: a reload swaps it only when this changes
    explain_path: str = ""  # its explanation graph (contract.EXPLAIN_FILE); "" when it has none
    batcher: MicroBatcher = field(init=False)

    def __post_init__(self):
        self.task = self.card.dataset
        self.spec = self.card.preprocessing
        self.input_name = self.session.get_inputs()[0].name
        self.batcher = MicroBatcher(self.logits)
        self.penalty = conformal.Penalty.from_dict(self.card.conformal_penalty)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0]

    @cached_property
    def explainer(self) -> ort.InferenceSession | None:
        """The explanation graph's session, opened on the first /explain (most workers never need it)."""
        return make_session(self.explain_path) if self.explain_path else None

    def explain(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits [K], every class's activation map [K, H, W]) of one image."""
        logits, cams = self.explainer.run(None, {self.input_name: pixels[None]})
        return logits[0], cams[0]

    @property
    def no_explanation(self) -> str:
        """Why this version answers without a map ("" when it has one)."""
        if self.explain_path:
            return ""
        if self.card.explanation:
            return f"the explanation graph of {self.card.registered_model} v{self.card.model_version} is missing"
        return (
            f"{self.card.architecture} has no activation map (its head is not global pooling then one linear layer, "
            "its last feature map is 1x1 at this input size, or the version was exported before maps existed)"
        )

    @cached_property
    def _card(self) -> tuple[str | None, str]:
        try:
            return card_markdown.render(self.card), ""
        except card_markdown.CardError as err:
            return None, f"{err} (registered model {self.card.registered_model} v{self.card.model_version})"

    @property
    def card_text(self) -> str | None:
        """The model card as Markdown, rendered once; None for a version exported before cards."""
        return self._card[0]

    @property
    def card_problem(self) -> str:
        return self._card[1]

    @property
    def aliases(self) -> tuple[str, ...]:
        return task_aliases(self.task)

    @cached_property
    def info(self) -> ModelInfo:
        """Built once: every answer carries it."""
        card = self.card
        return ModelInfo(
            registered_model=card.registered_model,
            version=card.model_version,
            architecture=card.architecture,
            dataset=self.task,
            val_acc=card.metrics.get("best_val_acc"),
            test_acc=card.metrics.get("test_acc"),
        )


def make_session(model_path: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    # Small models on few cores: one thread per call avoids oversubscription between concurrent batches.
    options.intra_op_num_threads = int(os.environ.get("MEDZOO_ORT_THREADS", "1"))
    return ort.InferenceSession(model_path, sess_options=options, providers=["CPUExecutionProvider"])


class Catalog:
    def __init__(self, models: list[ServedModel]):
        self.models = {m.task: m for m in models}
        self._by_alias = {alias: m for m in models for alias in m.aliases}

    def resolve(self, task: str) -> ServedModel:
        key = (task or "").strip().lower()
        if key in self._by_alias:
            return self._by_alias[key]
        served = ", ".join(f"{m.task} ({', '.join(m.aliases[1:])})" for m in self.models.values()) or "none"
        close = difflib.get_close_matches(key, list(self._by_alias), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise RequestError(f"Unknown task {task!r}.{hint} Served tasks: {served}.")
