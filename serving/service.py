"""The MedZoo BentoML service: organ, blood-cell and other MedMNIST classification over HTTP.

    bentoml serve serving.service:MedZoo --port 3000

Models are the registry champions that ``serving.deploy`` imported into the BentoML model store; every
``medzoo-*`` model there is declared as a class attribute, so ``bentoml build`` packs them into the Bento.
"""

from __future__ import annotations

import asyncio
import gc
import os
from pathlib import Path

import bentoml
import numpy as np
from fastapi import FastAPI, Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.routing import request_response

from contract import REGISTERED_MODEL_PREFIX, ModelCard
from serving import bentoml_fixes
from serving.catalog import ONNX_FILE, Catalog, ServedModel, make_session
from serving.forms import MAX_REQUEST_BYTES, FormSpec, read_form
from serving.preprocessing import (
    MAX_BATCH_IMAGES,
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    RequestError,
    decode_image,
    to_model_input,
)
from serving.schemas import BatchPrediction, Catalogue, ErrorMessage, Prediction, TaskInfo

bentoml_fixes.apply()


def store_models() -> dict[str, bentoml.models.BentoModel]:
    """The latest version of every medzoo-* model in the BentoML store, keyed by a valid attribute name."""
    names = sorted({m.tag.name for m in bentoml.models.list() if m.tag.name.startswith(REGISTERED_MODEL_PREFIX)})
    return {f"model_{name.replace('-', '_')}": bentoml.models.BentoModel(f"{name}:latest") for name in names}


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def prediction(model: ServedModel, logits: np.ndarray) -> Prediction:
    probs = softmax(logits.astype(np.float64))
    best = int(probs.argmax())
    names = model.card.class_names
    ranked = sorted(zip(names, probs.tolist()), key=lambda pair: -pair[1])
    return Prediction(
        task=model.task,
        label=names[best],
        class_index=best,
        confidence=float(probs[best]),
        probabilities=dict(ranked),
        model=model.info,
    )


def json_response(body: BaseModel, status: int = 200) -> Response:
    # Serialised by pydantic in one pass; FastAPI does not validate a Response a second time.
    return Response(body.model_dump_json(), status_code=status, media_type="application/json")


def error(err: RequestError) -> Response:
    return json_response(ErrorMessage(error=str(err)), int(err.status))


def upload_openapi(spec: FormSpec, summary: str) -> dict:
    """The multipart request body and the error answers, for the OpenAPI page."""
    image = {"type": "string", "format": "binary"}
    files = {"type": "array", "items": image, "maxItems": MAX_BATCH_IMAGES} if spec.many else image
    task = {"type": "string", "description": "dataset name or alias, e.g. organ, blood, breastmnist"}
    body = {"type": "object", "required": list(spec.fields), "properties": {spec.file_field: files, "task": task}}
    errors = {
        400: "malformed form, missing or unexpected field, empty image",
        413: "body, image bytes, pixels or image count over the limit",
        415: "not multipart/form-data, or not a decodable image",
        422: "unknown task, truncated or corrupt image",
    }
    return {
        "summary": summary,
        "openapi_extra": {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": body}}}},
        "responses": {status: {"model": ErrorMessage, "description": text} for status, text in errors.items()},
    }


DECLARED_MODELS = store_models()  # listed once: the class declares these and each worker loads them
IMAGE_FORM = FormSpec("image", many=False)
BATCH_FORM = FormSpec("images", many=True)

# The HTTP API. BentoML serves it inside the service (workers, model store, probes, /metrics, OpenAPI page);
# the routes read the upload themselves, once and in memory (README, "Why fast").
api = FastAPI(title="MedZoo", description="MedMNIST classification with the MLflow registry champions.")


class MedZoo:
    """The models and what they answer; the HTTP routes below only read requests and write answers."""

    def __init__(self) -> None:
        served = []
        for attribute in DECLARED_MODELS:
            stored = getattr(type(self), attribute).stored
            card = ModelCard.from_props({k: str(v) for k, v in stored.info.metadata.items()})
            served.append(ServedModel(card, make_session(str(Path(stored.path) / ONNX_FILE))))
        self.catalog = Catalog(served)
        # What exists now (modules, models) lives as long as the worker: frozen, full garbage collections stop
        # scanning it, which otherwise pauses the worker for ~70 ms each time under load.
        gc.collect()
        gc.freeze()

    async def classify(self, task: str, image: bytes) -> Prediction:
        model = self.catalog.resolve(task)
        pixels = to_model_input(decode_image(image), model.spec)
        return prediction(model, await model.batcher.infer(pixels))

    async def classify_batch(self, task: str, images: list[bytes]) -> BatchPrediction:
        model = self.catalog.resolve(task)
        batch = np.stack(
            [to_model_input(decode_image(data, f"images[{i}]"), model.spec) for i, data in enumerate(images)]
        )
        logits = await asyncio.to_thread(model.logits, batch)
        return BatchPrediction(task=model.task, results=[prediction(model, row) for row in logits])

    def catalogue(self) -> Catalogue:
        tasks = [
            TaskInfo(
                task=m.task,
                aliases=list(m.aliases),
                class_names=list(m.card.class_names),
                input_size=m.spec.input_size,
                in_chans=m.spec.in_chans,
                resize=m.spec.resize,
                model=m.info,
                largest_batch=max(m.batcher.batch_sizes, default=0),
            )
            for m in self.catalog.models.values()
        ]
        limits = {
            "max_image_bytes": MAX_IMAGE_BYTES,
            "max_image_pixels": MAX_IMAGE_PIXELS,
            "max_batch_images": MAX_BATCH_IMAGES,
            "max_request_bytes": MAX_REQUEST_BYTES,
        }
        return Catalogue(tasks=tasks, limits=limits)


def current() -> MedZoo:
    # A plain call, not a FastAPI dependency: BentoML's sync dependency would cost a thread hop per request.
    return bentoml.get_current_service()


@api.post("/classify", response_model=Prediction, **upload_openapi(IMAGE_FORM, "Classify one image"))
async def classify(request: Request) -> Response:
    """One image in the field `image` (PNG, JPEG, BMP or TIFF; gray or colour; any size within the limits)
    and the task in the field `task`. Concurrent requests share onnxruntime calls (adaptive batching)."""
    try:
        form = await read_form(request, IMAGE_FORM)
        return json_response(await current().classify(form.text["task"], form.files[0]))
    except RequestError as err:
        return error(err)


@api.post("/classify_batch", response_model=BatchPrediction, **upload_openapi(BATCH_FORM, "Classify several images"))
async def classify_batch(request: Request) -> Response:
    """Up to 32 images (MAX_BATCH_IMAGES) of one task in the field `images`; results come in upload order."""
    try:
        form = await read_form(request, BATCH_FORM)
        return json_response(await current().classify_batch(form.text["task"], form.files))
    except RequestError as err:
        return error(err)


# FastAPI documents the upload routes; Starlette serves them. They take the raw Request and return a Response,
# so FastAPI's dependency solving and validation would find nothing to do, yet cost about a tenth of the
# request's CPU.
for _route in api.routes:
    if isinstance(_route, APIRoute) and _route.endpoint in (classify, classify_batch):
        _route.app = request_response(_route.endpoint)


@api.get("/models", response_model=Catalogue, summary="Served tasks and limits")
async def models() -> Catalogue:
    """The tasks served, with their aliases, class names, input size and model metadata, and the limits."""
    return current().catalogue()


for _attribute, _model in DECLARED_MODELS.items():
    setattr(MedZoo, _attribute, _model)

MedZoo = bentoml.asgi_app(api, path="/")(MedZoo)
UPLOAD_ROUTES = ["/classify", "/classify_batch"]
# One worker process per core by default (each holds every model, a few MB, and its own batchers).
# BentoML's access log line and tracing span per request cost about a fifth and a third of the classify
# throughput (README, "Why fast"), and BentoML 1.4.39 keeps every span in memory: the access log is off and
# the upload routes are not traced, unless MEDZOO_ACCESS_LOG=1 or MEDZOO_TRACING=1. Prometheus /metrics stays.
MedZoo = bentoml.service(
    name="medzoo",
    workers=int(os.environ.get("MEDZOO_WORKERS", os.cpu_count() or 1)),
    traffic={"timeout": 60, "concurrency": 512},
    logging={"access": {"enabled": os.environ.get("MEDZOO_ACCESS_LOG") == "1"}},
    tracing={"excluded_urls": [] if os.environ.get("MEDZOO_TRACING") == "1" else UPLOAD_ROUTES},
)(MedZoo)
