"""ONNX export of a logged MedZoo model, self-describing and parity-checked.

The exported graph takes float32 pixels in [0, 1], shape [N, C, H, W] with a dynamic batch; normalisation
is inside it. ``metadata_props`` carry everything a consumer needs (class names, size, channels, resize).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np
import onnx
import onnxruntime as ort
import torch

from training.tracking import METADATA_KEY, MODEL_ARTIFACT

ONNX_ARTIFACT = "onnx"
PARITY_ATOL = 1e-4
INPUT_NAME = "pixels"
OUTPUT_NAME = "logits"


class ParityError(RuntimeError):
    """The ONNX graph does not reproduce the PyTorch model's outputs."""


class ExportError(ValueError):
    """A run that cannot be exported (unknown, no model); the message says what exists."""


@dataclass
class ParityReport:
    images: int
    max_abs_diff: float
    argmax_mismatches: int

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= PARITY_ATOL and self.argmax_mismatches == 0

    def describe(self) -> str:
        return (
            f"max |logit difference| {self.max_abs_diff:.2e} (allowed {PARITY_ATOL:.0e}), "
            f"{self.argmax_mismatches} of {self.images} images with a different predicted class"
        )


def load_logged_model(run_id: str) -> tuple[torch.nn.Module, dict]:
    """The PyTorch model a training run logged, and its MedZoo metadata."""
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
        raise ExportError(f"run {run_id}'s model has no MedZoo metadata; it was not logged by training.train.")
    return mlflow.pytorch.load_model(uri), metadata


def onnx_metadata(meta: dict, source_run: str, registered_model: str = "", model_version: str = "") -> dict:
    pre = meta["preprocessing"]
    return {
        "dataset": meta["dataset"],
        "task": meta["task"],
        "architecture": meta["architecture"],
        "class_names": json.dumps(meta["class_names"]),
        "input_size": str(pre["input_size"]),
        "in_chans": str(pre["in_chans"]),
        "resize": pre.get("resize", "bilinear"),
        "input_range": "float32 pixels in [0, 1], NCHW; mean/std normalisation is inside the graph",
        "mean": json.dumps(pre["mean"]),
        "std": json.dumps(pre["std"]),
        "source_run": source_run,
        "registered_model": registered_model,
        "model_version": model_version,
    }


def export_onnx(model: torch.nn.Module, input_size: int, in_chans: int, metadata: dict[str, str]) -> onnx.ModelProto:
    """One self-contained ONNX graph (no external data) with a dynamic batch dimension."""
    example = torch.rand(2, in_chans, input_size, input_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=True,
            external_data=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
        )
        proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, metadata)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def check_parity(proto: onnx.ModelProto, reference: torch.nn.Module, images: np.ndarray) -> ParityReport:
    """onnxruntime logits against PyTorch on ``images`` (float32 in [0, 1])."""
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    onnx_logits = session.run(None, {session.get_inputs()[0].name: images})[0]
    with torch.no_grad():
        torch_logits = reference(torch.from_numpy(images)).numpy()
    return ParityReport(
        images=len(images),
        max_abs_diff=float(np.abs(onnx_logits - torch_logits).max()),
        argmax_mismatches=int((onnx_logits.argmax(1) != torch_logits.argmax(1)).sum()),
    )


def require_parity(proto: onnx.ModelProto, reference: torch.nn.Module, images: np.ndarray) -> ParityReport:
    report = check_parity(proto, reference, images)
    if not report.ok:
        raise ParityError(f"ONNX parity check failed on {report.images} validation images: {report.describe()}.")
    return report


def validation_images(meta: dict, data_dir: str | None, limit: int = 256) -> np.ndarray:
    """Real validation images of the model's dataset at its input size, as the model consumes them."""
    from training.data import load_dataset
    from training.engine import to_input

    pre = meta["preprocessing"]
    val = load_dataset(meta["dataset"], data_dir or None, size=int(pre["input_size"])).val
    return to_input(val.images[:limit]).numpy()


def log_onnx_model(run_id: str, proto: onnx.ModelProto, meta: dict, example: np.ndarray):
    """Log the ONNX model to the training run itself, beside the PyTorch model (the run is not reopened)."""
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = session.run(None, {INPUT_NAME: example})[0]
    return mlflow.onnx.log_model(
        proto,
        name=ONNX_ARTIFACT,
        run_id=run_id,
        input_example=example,
        signature=mlflow.models.infer_signature(example, logits),
        save_as_external_data=False,
        onnx_execution_providers=["CPUExecutionProvider"],
        metadata={METADATA_KEY: meta},
        pip_requirements=[f"{pkg}=={version(pkg)}" for pkg in ("onnx", "onnxruntime", "mlflow", "numpy")],
    )


@dataclass
class ExportResult:
    proto: onnx.ModelProto
    parity: ParityReport
    model_uri: str
    meta: dict


def export_run(
    run_id: str, data_dir: str | None = None, registered_model: str = "", model_version: str = "", log: bool = True
) -> ExportResult:
    """Export a training run's model to ONNX, check parity on validation images, log it to the run."""
    model, meta = load_logged_model(run_id)
    pre = meta["preprocessing"]
    proto = export_onnx(
        model,
        int(pre["input_size"]),
        int(pre["in_chans"]),
        onnx_metadata(meta, run_id, registered_model, model_version),
    )
    images = validation_images(meta, data_dir)
    parity = require_parity(proto, model, images)
    model_uri = log_onnx_model(run_id, proto, meta, images[:2]).model_uri if log else ""
    return ExportResult(proto, parity, model_uri, meta)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from training.data import DatasetError

    parser = argparse.ArgumentParser(
        prog="python -m training.export", description="Export a training run's model to a parity-checked ONNX file."
    )
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--output", default="", help="also write the .onnx file here (default: only log it)")
    parser.add_argument("--data-dir", default="", help="dataset folder for the parity images")
    args = parser.parse_args(argv)
    try:
        result = export_run(args.run_id, args.data_dir or None)
    except (ExportError, ParityError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        onnx.save(result.proto, args.output)
    print(
        f"exported run {args.run_id}: {result.model_uri}"
        + (f", file {args.output}" if args.output else "")
        + f"; parity: {result.parity.describe()}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
