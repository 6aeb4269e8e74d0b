"""ONNX export of a logged MedZoo model, self-describing and parity-checked.

The exported graph takes float32 pixels in [0, 1], shape [N, C, H, W] with a dynamic batch; normalisation
is inside it. ``metadata_props`` carry the run's :class:`contract.ModelCard` (class names, size, channels,
resize, scores). Parity is checked on the validation images the training run logged beside its model, so
exporting needs no dataset file. A run holds at most one ONNX model: exporting it again reuses that one.

A run whose model has no PyTorch form (a classical estimator on features, an ensemble) logs it as one ONNX graph
from the start, with the Python path's probabilities on the parity images; exporting it checks against those.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass, replace
from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np
import onnx
import onnxruntime as ort
import torch

from contract import CAM, CAMS_NAME, EXPLAIN_FILE, INPUT_NAME, METADATA_KEY, OUTPUT_NAME, ModelCard
from training.core.features import rebuild
from training.core.options import AUTO, option
from training.tracking.records import MODEL_ARTIFACT, PARITY_ARTIFACT
from zoo.cam import Explained, explains

ONNX_ARTIFACT = "onnx"
# On the network's logits, before the graph divides them by the run's temperature: a temperature below 1 scales
# the kernels' differences up with the logits (an underconfident 1-epoch net was fitted T = 0.011, x89).
PARITY_ATOL = 1e-4
# Plus this share of the largest output: float32 kernels of onnxruntime and oneDNN differ relatively (np.allclose's
# default rtol).
PARITY_RTOL = 1e-5
# The Python path's class probabilities on the parity images, logged by runs whose model is an ONNX graph.
REFERENCE_ARTIFACT = "parity/reference_probabilities.npy"
EXPLAIN_ARTIFACT_DIR = "explain"  # the run's explanation graph (zoo.cam), carried by its ONNX model


@dataclass
class ExportOptions:
    run_id: str = option(help="the training run to export")
    output: str = option(AUTO, f"also write the .onnx file here ({AUTO}: only log it to the run)")


class ExportError(ValueError):
    """A run that cannot be exported (unknown, no model); the message says what exists."""


class ParityError(ExportError):
    """The ONNX graph does not reproduce the PyTorch model's outputs."""


@dataclass
class ParityReport:
    images: int
    max_abs_diff: float
    argmax_mismatches: int
    quantity: str = "logit"  # what was compared: network logits, or the probabilities of a composed graph
    max_abs_value: float = 0.0  # the largest |output| of the reference
    temperature: float = 1.0  # the served logits are the network's divided by it

    @property
    def allowed(self) -> float:
        return parity_tolerance(self.max_abs_value, self.temperature)

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.allowed and self.argmax_mismatches == 0

    def describe(self) -> str:
        atol = f"{PARITY_ATOL:.0e}" + (f" / temperature {self.temperature:.3g}" if self.temperature < 1 else "")
        return (
            f"max |{self.quantity} difference| {self.max_abs_diff:.2e} (allowed {self.allowed:.1e}: "
            f"{atol} + {PARITY_RTOL:.0e} x the largest |{self.quantity}|, {self.max_abs_value:.3g}), "
            f"{self.argmax_mismatches} of {self.images} images with a different predicted class"
        )


def parity_tolerance(max_abs_value: float, temperature: float = 1.0) -> float:
    """The largest |difference| allowed between two graphs' outputs whose largest |output| is ``max_abs_value``."""
    return PARITY_ATOL / min(1.0, temperature) + PARITY_RTOL * max_abs_value


def logged_model_info(run_id: str):
    """The MLflow model info of the run's ``model`` and its model card."""
    client = mlflow.MlflowClient()
    try:
        client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise ExportError(f"run_id={run_id!r} does not exist in {mlflow.get_tracking_uri()}.") from None
    uri = f"runs:/{run_id}/{MODEL_ARTIFACT}"
    try:
        info = mlflow.models.get_model_info(uri)
    except mlflow.exceptions.MlflowException:
        raise ExportError(
            f"run {run_id} logged no model named {MODEL_ARTIFACT!r} (did the training finish?)."
        ) from None
    metadata = (info.metadata or {}).get(METADATA_KEY)
    if not metadata:
        raise ExportError(f"run {run_id}'s model has no MedZoo model card; it was not logged by MedZoo's training.")
    return info, ModelCard.from_dict(metadata)


def is_graph_model(info) -> bool:
    """Logged as an ONNX graph already (classical estimators, ensembles) rather than as a PyTorch network."""
    return "onnx" in info.flavors


def load_logged_model(run_id: str) -> tuple[torch.nn.Module, ModelCard]:
    """The PyTorch model a training run logged (a torch.export graph, traced in eval mode), and its model card."""
    info, card = logged_model_info(run_id)
    if is_graph_model(info):
        raise ExportError(f"run {run_id}'s model ({card.architecture}) is an ONNX graph, not a PyTorch network.")
    return mlflow.pytorch.load_model(info.model_uri), card


def parity_images(run_id: str) -> np.ndarray:
    """The validation images the run logged with its model, as the model consumes them (float32 in [0, 1])."""
    try:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=PARITY_ARTIFACT)
    except (mlflow.exceptions.MlflowException, OSError):
        raise ExportError(
            f"run {run_id} has no {PARITY_ARTIFACT}: an older MedZoo logged it; train it again."
        ) from None
    return np.load(path).astype(np.float32) / 255.0


def export_onnx(
    model: torch.nn.Module,
    input_size: int,
    in_chans: int,
    metadata: dict[str, str],
    output_name: str | tuple[str, ...] = OUTPUT_NAME,
) -> onnx.ModelProto:
    """One self-contained ONNX graph (no external data) with a dynamic batch dimension."""
    example = torch.rand(2, in_chans, input_size, input_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # A logged model is a torch.export graph traced in eval mode, whose eval() raises; its training flag
        # reads True regardless, and the exporter warns about that flag.
        warnings.filterwarnings("ignore", message="Exporting a model while it is in training mode")
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=True,
            external_data=False,
            verbose=False,
            input_names=[INPUT_NAME],
            output_names=[output_name] if isinstance(output_name, str) else list(output_name),
            dynamic_shapes=({0: batch},),
        )
        proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, metadata)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def check_parity(
    proto: onnx.ModelProto, reference: torch.nn.Module, images: np.ndarray, temperature: float = 1.0
) -> ParityReport:
    """onnxruntime logits against PyTorch on ``images`` (float32 in [0, 1]); ``temperature``: the one the graph
    divides the network's logits by."""
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    onnx_logits = session.run(None, {session.get_inputs()[0].name: images})[0]
    with torch.no_grad():
        torch_logits = reference(torch.from_numpy(images)).numpy()
    return ParityReport(
        images=len(images),
        max_abs_diff=float(np.abs(onnx_logits - torch_logits).max()),
        argmax_mismatches=int((onnx_logits.argmax(1) != torch_logits.argmax(1)).sum()),
        max_abs_value=float(np.abs(torch_logits).max()),
        temperature=temperature,
    )


def require_parity(
    proto: onnx.ModelProto, reference: torch.nn.Module, images: np.ndarray, temperature: float = 1.0
) -> ParityReport:
    return _require(check_parity(proto, reference, images, temperature))


def logged_onnx_model(run_id: str):
    """The ONNX model already logged to ``run_id``, if any."""
    found = mlflow.search_logged_models(
        experiment_ids=[mlflow.get_run(run_id).info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{ONNX_ARTIFACT}'",
        output_format="list",
    )
    return found[0] if found else None


def export_explanation(
    served: torch.nn.Module,
    normalized: torch.nn.Module,
    input_size: int,
    in_chans: int,
    pixels: np.ndarray,
    temperature: float = 1.0,
) -> onnx.ModelProto:
    """The explanation graph (``zoo.cam.Explained``): ``pixels`` -> ``logits`` (the served graph's) and ``cams``,
    checked against PyTorch on ``pixels`` (float32 in [0, 1]) like the served graph."""
    explained = Explained(served, normalized).eval()
    proto = export_onnx(explained, input_size, in_chans, {}, output_name=(OUTPUT_NAME, CAMS_NAME))
    with torch.no_grad():
        expected = [t.numpy() for t in explained(torch.from_numpy(pixels))]
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {INPUT_NAME: pixels})
    scale = max(1.0, float(np.abs(expected[1]).max()))
    tolerances = (parity_tolerance(float(np.abs(expected[0]).max()), temperature), PARITY_ATOL * scale)
    for name, a, b, tolerance in zip((OUTPUT_NAME, CAMS_NAME), got, expected, tolerances):
        if np.abs(a - b).max() > tolerance:
            raise ParityError(f"the explanation graph's {name} differ from PyTorch by {np.abs(a - b).max():.2e}.")
    return proto


def with_explanation(run_id: str, model: torch.nn.Module, card: ModelCard, pixels: np.ndarray) -> ModelCard:
    """Export and log the run's explanation graph when its network has a pooled linear head (``zoo.cam``); the
    card then says so. Done at export, not in training: the logged model is a traced graph, rebuilt here from the
    card, and the export costs seconds that only registered models need."""
    served, network = rebuild(model, card)
    pre = card.preprocessing
    if not explains(network.backbone, pre.in_chans, pre.input_size):
        return card
    proto = export_explanation(served, network, pre.input_size, pre.in_chans, pixels, card.temperature)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / EXPLAIN_FILE
        onnx.save(proto, str(path))
        mlflow.MlflowClient().log_artifact(run_id, str(path), EXPLAIN_ARTIFACT_DIR)
    return replace(card, explanation=CAM)


def logged_explanation(run_id: str, folder: str) -> str | None:
    """The run's explanation graph downloaded into ``folder``, or None when it has none."""
    try:
        return mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=f"{EXPLAIN_ARTIFACT_DIR}/{EXPLAIN_FILE}", dst_path=folder
        )
    except (mlflow.exceptions.MlflowException, OSError):
        return None


def log_onnx_model(run_id: str, proto: onnx.ModelProto, card: ModelCard, example: np.ndarray):
    """Log the ONNX model to the training run itself, beside the PyTorch model (the run is not reopened), with
    the run's explanation graph as an extra file when it has one."""
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = session.run(None, {INPUT_NAME: example})[0]
    with tempfile.TemporaryDirectory() as tmp:
        explanation = logged_explanation(run_id, tmp)
        return mlflow.onnx.log_model(
            proto,
            name=ONNX_ARTIFACT,
            run_id=run_id,
            input_example=example,
            signature=mlflow.models.infer_signature(example, logits),
            save_as_external_data=False,
            onnx_execution_providers=["CPUExecutionProvider"],
            metadata={METADATA_KEY: card.to_dict()},
            pip_requirements=[f"{pkg}=={version(pkg)}" for pkg in ("onnx", "onnxruntime", "mlflow", "numpy")],
            extra_files=[explanation] if explanation else None,
        )


@dataclass
class ExportResult:
    proto: onnx.ModelProto
    parity: ParityReport
    model_uri: str
    card: ModelCard


def export_run(run_id: str, log: bool = True) -> ExportResult:
    """Export a run's model to ONNX, check parity on its logged validation images, log it to the run."""
    info, card = logged_model_info(run_id)
    images = parity_images(run_id)
    if is_graph_model(info):
        proto = mlflow.onnx.load_model(info.model_uri)
        parity = _require(check_recorded_parity(proto, images, _reference_probabilities(run_id)))
        return ExportResult(proto, parity, info.model_uri, card)
    model = mlflow.pytorch.load_model(info.model_uri)
    pre = card.preprocessing
    existing = logged_onnx_model(run_id)
    # An earlier export of this run is taken again (the export is most of the time an ensemble or a registration
    # spends on a member), its parity against the PyTorch model checked again like a new one's.
    if existing is not None:
        proto = mlflow.onnx.load_model(existing.model_uri)
        card = ModelCard.from_props({p.key: p.value for p in proto.metadata_props})
    else:
        card = with_explanation(run_id, model, card, images) if log else card
        proto = export_onnx(model, pre.input_size, pre.in_chans, card.to_props())
    parity = require_parity(proto, model, images, card.temperature)
    model_uri = ""
    if existing is not None:
        model_uri = existing.model_uri
    elif log:
        model_uri = log_onnx_model(run_id, proto, card, images[:2]).model_uri
    return ExportResult(proto, parity, model_uri, card)


# Images per onnxruntime call: a whole split at once (OrganAMNIST's 17,778 test images, 5 test-time views, three
# ensemble members) held every activation at once and was killed for memory at 24 GB.
ONNX_IMAGES_PER_CALL = 256


def onnx_probabilities(proto: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    logits = [
        session.run(None, {name: images[start : start + ONNX_IMAGES_PER_CALL]})[0]
        for start in range(0, len(images), ONNX_IMAGES_PER_CALL)
    ]
    return torch.from_numpy(np.concatenate(logits)).softmax(dim=1).numpy()


def check_recorded_parity(proto: onnx.ModelProto, images: np.ndarray, reference: np.ndarray) -> ParityReport:
    """onnxruntime probabilities against the Python path's on ``images`` (float32 in [0, 1])."""
    probabilities = onnx_probabilities(proto, images)
    return ParityReport(
        images=len(images),
        max_abs_diff=float(np.abs(probabilities - reference).max()),
        argmax_mismatches=int((probabilities.argmax(1) != reference.argmax(1)).sum()),
        quantity="probability",
    )


def _require(report: ParityReport) -> ParityReport:
    if not report.ok:
        raise ParityError(f"ONNX parity check failed on {report.images} validation images: {report.describe()}.")
    return report


def _reference_probabilities(run_id: str) -> np.ndarray:
    try:
        return np.load(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=REFERENCE_ARTIFACT))
    except (mlflow.exceptions.MlflowException, OSError):
        raise ExportError(f"run {run_id} has no {REFERENCE_ARTIFACT} to check its ONNX graph against.") from None


def log_graph_model(
    proto: onnx.ModelProto, card: ModelCard, images: torch.Tensor, reference: np.ndarray
) -> ParityReport:
    """Log an ONNX graph as the active run's model, after checking it against the Python path's probabilities.

    ``images`` are the uint8 parity images; nothing is logged when parity fails.
    """
    pixels = images.numpy().astype(np.float32) / 255.0
    parity = _require(check_recorded_parity(proto, pixels, reference))
    with tempfile.TemporaryDirectory() as tmp:
        for artifact, array in ((PARITY_ARTIFACT, images.numpy()), (REFERENCE_ARTIFACT, reference)):
            path = Path(tmp) / Path(artifact).name
            np.save(path, array)
            mlflow.log_artifact(str(path), str(Path(artifact).parent))
    example = pixels[:2]
    mlflow.onnx.log_model(
        proto,
        name=MODEL_ARTIFACT,
        input_example=example,
        signature=mlflow.models.infer_signature(example, np.log(onnx_probabilities(proto, example))),
        save_as_external_data=False,
        onnx_execution_providers=["CPUExecutionProvider"],
        metadata={METADATA_KEY: card.to_dict()},
        pip_requirements=[f"{pkg}=={version(pkg)}" for pkg in ("onnx", "onnxruntime", "mlflow", "numpy")],
    )
    return parity


def write_onnx(proto: onnx.ModelProto, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, path)
