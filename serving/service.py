"""The MedZoo BentoML service: organ, blood-cell and other MedMNIST classification over HTTP.

    bentoml serve serving.service:MedZoo --port 3000

Models are the registry champions that ``serving.deploy`` imported into the BentoML model store; every
``medzoo-*`` model there is declared as a class attribute, so ``bentoml build`` packs them into the Bento.
"""

from __future__ import annotations

import asyncio
import os
from http import HTTPStatus
from pathlib import Path

import bentoml
import numpy as np
from fastapi import FastAPI
from starlette.responses import JSONResponse

from serving.catalog import MODEL_PREFIX, Catalog, ServedModel, make_session
from serving.guard import UploadGuard
from serving.preprocessing import (
    MAX_BATCH_IMAGES,
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    InputSpec,
    RequestError,
    decode_image,
    to_model_input,
)
from serving.schemas import BatchPrediction, Catalogue, Prediction, TaskInfo


def store_models() -> dict[str, bentoml.models.BentoModel]:
    """The latest version of every medzoo-* model in the BentoML store, keyed by a valid attribute name."""
    names = sorted({m.tag.name for m in bentoml.models.list() if m.tag.name.startswith(MODEL_PREFIX)})
    return {f"model_{name.replace('-', '_')}": bentoml.models.BentoModel(f"{name}:latest") for name in names}


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def prediction(model: ServedModel, logits: np.ndarray) -> Prediction:
    probs = softmax(logits.astype(np.float64))
    best = int(probs.argmax())
    names = model.spec.class_names
    ranked = sorted(zip(names, probs.tolist()), key=lambda pair: -pair[1])
    return Prediction(
        task=model.task,
        label=names[best],
        class_index=best,
        confidence=float(probs[best]),
        probabilities=dict(ranked),
        model=model.model_info(),
    )


def error(err: RequestError) -> JSONResponse:
    return JSONResponse({"error": str(err)}, status_code=int(err.status))


def read_upload(path: Path, label: str) -> bytes:
    size = path.stat().st_size
    if size > MAX_IMAGE_BYTES:
        raise RequestError(
            f"{label}: {size} bytes exceeds the limit of {MAX_IMAGE_BYTES} bytes.", HTTPStatus.REQUEST_ENTITY_TOO_LARGE
        )
    return path.read_bytes()


catalogue_app = FastAPI(title="MedZoo catalogue")


class MedZoo:
    def __init__(self) -> None:
        served = []
        for attribute in store_models():
            stored = getattr(type(self), attribute).stored
            metadata = {k: str(v) for k, v in stored.info.metadata.items()}
            session = make_session(str(Path(stored.path) / "saved_model.onnx"))
            served.append(ServedModel(metadata["dataset"], InputSpec.from_metadata(metadata), session, metadata))
        self.catalog = Catalog(served)

    @bentoml.api(route="/classify")
    async def classify(self, image: Path, task: str) -> Prediction:
        """Classify one image (PNG, JPEG, BMP or TIFF; gray or colour; any size within the limits)."""
        try:
            model = self.catalog.resolve(task)
            pixels = to_model_input(decode_image(read_upload(image, "image")), model.spec)
            return prediction(model, await model.batcher.infer(pixels))
        except RequestError as err:
            return error(err)

    @bentoml.api(route="/classify_batch")
    async def classify_batch(self, images: list[Path], task: str) -> BatchPrediction:
        """Classify several images (at most MAX_BATCH_IMAGES, 32) of one task; results come in upload order."""
        try:
            model = self.catalog.resolve(task)
            if not images:
                raise RequestError("no images: send one or more files in the field 'images'.", HTTPStatus.BAD_REQUEST)
            if len(images) > MAX_BATCH_IMAGES:
                raise RequestError(
                    f"{len(images)} images exceeds the limit of {MAX_BATCH_IMAGES} per request.",
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                )
            batch = np.stack(
                [
                    to_model_input(decode_image(read_upload(p, f"images[{i}]"), f"images[{i}]"), model.spec)
                    for i, p in enumerate(images)
                ]
            )
            logits = await asyncio.to_thread(model.logits, batch)
            return BatchPrediction(task=model.task, results=[prediction(model, row) for row in logits])
        except RequestError as err:
            return error(err)

    @catalogue_app.get("/models", response_model=Catalogue)
    def models(self) -> Catalogue:
        """The tasks served, with their model metadata and class names."""
        tasks = [
            TaskInfo(
                task=m.task,
                aliases=list(m.aliases),
                class_names=list(m.spec.class_names),
                input_size=m.spec.input_size,
                in_chans=m.spec.in_chans,
                resize=m.spec.resize,
                model=m.model_info(),
                largest_batch=max(m.batcher.batch_sizes, default=0),
            )
            for m in self.catalog.models.values()
        ]
        return Catalogue(
            tasks=tasks,
            limits={
                "max_image_bytes": MAX_IMAGE_BYTES,
                "max_image_pixels": MAX_IMAGE_PIXELS,
                "max_batch_images": MAX_BATCH_IMAGES,
            },
        )


for _attribute, _model in store_models().items():
    setattr(MedZoo, _attribute, _model)

MedZoo = bentoml.asgi_app(catalogue_app, path="/")(MedZoo)
# One worker process per core by default (each holds every model, a few MB, and its own batchers);
# MEDZOO_WORKERS overrides it.
MedZoo = bentoml.service(
    name="medzoo",
    workers=int(os.environ.get("MEDZOO_WORKERS", os.cpu_count() or 1)),
    traffic={"timeout": 60, "concurrency": 512},
)(MedZoo)
MedZoo.add_asgi_middleware(UploadGuard)
