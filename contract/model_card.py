"""The model card: architecture, data, preprocessing and scores of one trained model, and its encodings.

One dataclass, three encodings of the same fields: a JSON-able dict (MLflow model metadata), string
``metadata_props`` (ONNX file, BentoML model store) and registry tags. Add a field here and every stage
carries it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

REGISTERED_MODEL_PREFIX = "medzoo-"
CHAMPION_ALIAS = "champion"
# The key of the card in the MLflow model's metadata.
METADATA_KEY = "medzoo"
# Run metrics copied onto registry versions and into the served model's description.
REGISTRY_METRICS = ("best_val_acc", "best_val_auc", "test_acc", "test_auc", "n_params")
# The run metrics a card keeps (scores per split and class, calibration, conformal coverage): their prefixes.
CARD_METRIC_PREFIXES = ("best_val_", "test_", "val_")
INPUT_CONTRACT = "float32 pixels in [0, 1], NCHW; mean/std normalisation is inside the graph"
# The robustness summary (the card's ``robustness``, JSON) as a tag of a training run and of a registered version.
ROBUSTNESS_TAG = "medzoo.robustness"
# The exported graph's input and output names.
INPUT_NAME = "pixels"
OUTPUT_NAME = "logits"
# The explanation graph beside it (same input; logits and every class's activation map [N, K, H, W]), by file name
# in the MLflow ONNX model's folder and the BentoML model's.
EXPLAIN_FILE = "explain.onnx"
CAMS_NAME = "cams"
CAM = "cam"  # ModelCard.explanation of a version that carries the explanation graph


def metric_safe(name: str) -> str:
    """MLflow metric names allow letters, digits and _-./ and spaces; class names like 'normal, benign' don't."""
    return "".join(c if c.isalnum() or c in "_-." else "_" for c in name)


def registered_model_name(dataset: str) -> str:
    return f"{REGISTERED_MODEL_PREFIX}{dataset}"


def dataset_of_registered_model(name: str) -> str | None:
    return name[len(REGISTERED_MODEL_PREFIX) :] if name.startswith(REGISTERED_MODEL_PREFIX) else None


@dataclass(frozen=True)
class Preprocessing:
    """How raw images become the network's input: decode, convert channels, resize, divide by 255."""

    input_size: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str = "bilinear"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocessing":
        return cls(
            input_size=int(data["input_size"]),
            in_chans=int(data["in_chans"]),
            mean=tuple(float(m) for m in data["mean"]),
            std=tuple(float(s) for s in data["std"]),
            resize=data.get("resize", "bilinear"),
        )


@dataclass(frozen=True)
class ModelCard:
    architecture: str
    dataset: str
    task: str
    class_names: tuple[str, ...]
    preprocessing: Preprocessing
    model_options: dict[str, str] = field(default_factory=dict)
    # Test-time augmentation views averaged inside the exported graph ("none" when a single view).
    tta: tuple[str, ...] = ()
    source_run: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    # Folded into the graph already (its outputs are divided by it); 1.0: not calibrated.
    temperature: float = 1.0
    # Conformal thresholds (contract.conformal): coverage level ("0.90") -> APS threshold on the graph's
    # probabilities; empty for a model exported without them. ``conformal_images``: how many calibrated them.
    conformal: dict[str, float] = field(default_factory=dict)
    conformal_images: int = 0
    # The RAPS penalty of those thresholds (contract.conformal.Penalty as a dict; empty: APS).
    conformal_penalty: dict = field(default_factory=dict)
    # How it was made: the recipe and the one command that trains it again.
    recipe: str = ""
    command: str = ""
    # The data: description, license, split sizes ("splits") and training images per class ("class_counts").
    data: dict = field(default_factory=dict)
    # The test split's most frequent mistakes: {"true", "predicted", "count", "share" (of the true class)}.
    confusions: tuple[dict, ...] = ()
    # MedMNIST-C summary (training.workflows.robustness): clean/corrupted balanced ACC, BE, rBE, worst corruption.
    robustness: dict = field(default_factory=dict)
    # "cam" when the model carries the explanation graph (EXPLAIN_FILE); "" when its head has no activation map.
    explanation: str = ""
    # Set by deploy from the registry; never guessed at export time.
    registered_model: str = ""
    model_version: str = ""

    def with_run(self, run_id: str, metrics: dict[str, float]) -> "ModelCard":
        kept = {k: float(v) for k, v in metrics.items() if k in REGISTRY_METRICS or k.startswith(CARD_METRIC_PREFIXES)}
        return replace(self, source_run=run_id, metrics=dict(sorted(kept.items())))

    def with_robustness(self, summary: dict) -> "ModelCard":
        return replace(self, robustness=dict(summary))

    def with_registry(self, name: str, version: str) -> "ModelCard":
        return replace(self, registered_model=name, model_version=str(version))

    # -- MLflow model metadata (JSON) --------------------------------------------------------------
    def to_dict(self) -> dict:
        data = asdict(self)
        data["class_names"] = list(self.class_names)
        data["tta"] = list(self.tta)
        data["confusions"] = list(self.confusions)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "ModelCard":
        return cls(
            architecture=data["architecture"],
            dataset=data["dataset"],
            task=data["task"],
            class_names=tuple(data["class_names"]),
            preprocessing=Preprocessing.from_dict(data["preprocessing"]),
            model_options={str(k): str(v) for k, v in (data.get("model_options") or {}).items()},
            tta=tuple(data.get("tta") or ()),
            source_run=data.get("source_run", ""),
            metrics={k: float(v) for k, v in (data.get("metrics") or {}).items()},
            temperature=float(data.get("temperature", 1.0)),
            conformal={str(k): float(v) for k, v in (data.get("conformal") or {}).items()},
            conformal_images=int(data.get("conformal_images", 0)),
            conformal_penalty=dict(data.get("conformal_penalty") or {}),
            recipe=data.get("recipe", ""),
            command=data.get("command", ""),
            data=dict(data.get("data") or {}),
            confusions=tuple(data.get("confusions") or ()),
            robustness=dict(data.get("robustness") or {}),
            explanation=data.get("explanation", ""),
            registered_model=data.get("registered_model", ""),
            model_version=str(data.get("model_version", "")),
        )

    # -- ONNX metadata_props / BentoML metadata (flat strings) -------------------------------------
    def to_props(self) -> dict[str, str]:
        pre = self.preprocessing
        props = {
            "architecture": self.architecture,
            "dataset": self.dataset,
            "task": self.task,
            "class_names": json.dumps(list(self.class_names)),
            "input_size": str(pre.input_size),
            "in_chans": str(pre.in_chans),
            "resize": pre.resize,
            "mean": json.dumps(list(pre.mean)),
            "std": json.dumps(list(pre.std)),
            "input_range": INPUT_CONTRACT,
            "model_options": json.dumps(self.model_options, sort_keys=True),
            "tta": json.dumps(list(self.tta)),
            "source_run": self.source_run,
            # The registry's few flat (what older readers look for), every card metric as JSON.
            **{k: f"{v:.6g}" for k, v in self.metrics.items() if k in REGISTRY_METRICS},
            "metrics": json.dumps(self.metrics, sort_keys=True),
            "temperature": repr(self.temperature),
            "conformal": json.dumps(self.conformal, sort_keys=True),
            "conformal_images": str(self.conformal_images),
            "conformal_penalty": json.dumps(self.conformal_penalty, sort_keys=True),
            "recipe": self.recipe,
            "command": self.command,
            "data": json.dumps(self.data, sort_keys=True),
            "confusions": json.dumps(list(self.confusions)),
            "robustness": json.dumps(self.robustness, sort_keys=True),
            "explanation": self.explanation,
        }
        if self.registered_model:
            props.update(registered_model=self.registered_model, model_version=self.model_version)
        return props

    @classmethod
    def from_props(cls, props: dict[str, str]) -> "ModelCard":
        return cls(
            architecture=props["architecture"],
            dataset=props["dataset"],
            task=props["task"],
            class_names=tuple(json.loads(props["class_names"])),
            preprocessing=Preprocessing(
                input_size=int(props["input_size"]),
                in_chans=int(props["in_chans"]),
                mean=tuple(json.loads(props["mean"])),
                std=tuple(json.loads(props["std"])),
                resize=props.get("resize", "bilinear"),
            ),
            model_options=json.loads(props.get("model_options") or "{}"),
            tta=tuple(json.loads(props.get("tta") or "[]")),
            source_run=props.get("source_run", ""),
            metrics=(
                {k: float(v) for k, v in json.loads(props["metrics"]).items()}
                if props.get("metrics")
                else {k: float(props[k]) for k in REGISTRY_METRICS if props.get(k)}
            ),
            temperature=float(props.get("temperature") or 1.0),
            conformal={str(k): float(v) for k, v in json.loads(props.get("conformal") or "{}").items()},
            conformal_images=int(props.get("conformal_images") or 0),
            conformal_penalty=json.loads(props.get("conformal_penalty") or "{}"),
            recipe=props.get("recipe", ""),
            command=props.get("command", ""),
            data=json.loads(props.get("data") or "{}"),
            confusions=tuple(json.loads(props.get("confusions") or "[]")),
            robustness=json.loads(props.get("robustness") or "{}"),
            explanation=props.get("explanation", ""),
            registered_model=props.get("registered_model", ""),
            model_version=props.get("model_version", ""),
        )

    # -- registry version tags ------------------------------------------------------------------------
    def registry_tags(self, parity: str) -> dict[str, str]:
        return {
            "source_run": self.source_run,
            "architecture": self.architecture,
            "dataset": self.dataset,
            "class_names": json.dumps(list(self.class_names)),
            "preprocessing": json.dumps(self.preprocessing.to_dict()),
            "parity": parity,
            **{k: f"{v:.6g}" for k, v in self.metrics.items() if k in REGISTRY_METRICS},
        }
