"""The MedZoo BentoML service: organ, blood-cell and other MedMNIST classification over HTTP.

    bentoml serve serving.service:MedZoo --port 3000

Models are the registry champions that ``serving.deploy`` imported into the BentoML model store; every
``medzoo-*`` model there is declared as a class attribute, so ``bentoml build`` packs them into the Bento.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import secrets
import signal
import threading
import time
from http import HTTPStatus
from pathlib import Path

import _bentoml_impl.server as bentoml_server
import bentoml
import numpy as np
from fastapi import FastAPI, Request, Response
from fastapi.responses import FileResponse, PlainTextResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.routing import request_response

from contract import EXPLAIN_FILE, REGISTERED_MODEL_PREFIX, ModelCard, conformal
from serving import bentoml_fixes, draining, explanations
from serving.catalog import ONNX_FILE, Catalog, ServedModel, make_session
from serving.forms import MAX_REQUEST_BYTES, FormSpec, read_form
from serving.preprocessing import (
    MAX_ASPECT_RATIO,
    MAX_BATCH_IMAGES,
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    RequestError,
    check_suitable,
    decode_image,
    minimum_side,
    to_model_input,
)
from serving.schemas import BatchPrediction, Catalogue, ErrorMessage, Explanation, Prediction, Reloaded, TaskInfo

bentoml_fixes.apply()
draining.install()
logger = logging.getLogger("medzoo")

CARD_MEDIA_TYPE = "text/markdown; charset=utf-8"
STATIC = Path(__file__).parent / "static"  # the web page: plain HTML, CSS and JavaScript, no build step
# BentoML's OpenAPI page (its scripts are in /static_content, which BentoML serves); ours takes / for the web page.
OPENAPI_PAGE = Path(bentoml_server.__file__).parent / "main-openapi.html"
API_KEY_ENV = "MEDZOO_API_KEY"  # the prediction routes need it when set
ADMIN_KEY_ENV = "MEDZOO_ADMIN_KEY"  # the admin routes exist only when set
HOST_ENV, LOCAL_HOST = "MEDZOO_HOST", "127.0.0.1"
RELOAD_INTERVAL_ENV, DEFAULT_RELOAD_INTERVAL_S = "MEDZOO_RELOAD_INTERVAL_S", 2.0
# SIGTERM: answer every request accepted (serving.draining), for at most DRAIN_TIMEOUT_S.
DRAIN_TIMEOUT_S = 20.0


def store_models() -> dict[str, bentoml.models.BentoModel]:
    """The latest version of every medzoo-* model in the BentoML store, keyed by a valid attribute name."""
    names = sorted({m.tag.name for m in bentoml.models.list() if m.tag.name.startswith(REGISTERED_MODEL_PREFIX)})
    return {f"model_{name.replace('-', '_')}": bentoml.models.BentoModel(f"{name}:latest") for name in names}


def latest_in_store() -> dict[str, bentoml.Model]:
    """name -> the newest stored version of every medzoo-* model (what `deploy` imported last)."""
    latest: dict[str, bentoml.Model] = {}
    for model in bentoml.models.list():
        name = model.tag.name
        if name.startswith(REGISTERED_MODEL_PREFIX) and (
            name not in latest or model.info.creation_time > latest[name].info.creation_time
        ):
            latest[name] = model
    return latest


def served_model(stored: bentoml.Model) -> ServedModel:
    card = ModelCard.from_props({k: str(v) for k, v in stored.info.metadata.items()})
    explanation = Path(stored.path) / EXPLAIN_FILE
    return ServedModel(
        card,
        make_session(str(Path(stored.path) / ONNX_FILE)),
        tag=str(stored.tag),
        explain_path=str(explanation) if explanation.exists() else "",
    )


def api_key_error(request: Request, env: str) -> Response | None:
    """401 unless the request carries the key in $env (``Authorization: Bearer <key>`` or ``X-API-Key``).
    No key set: open. The key is compared in constant time and never logged or echoed."""
    expected = os.environ.get(env, "")
    if not expected:
        return None
    given = request.headers.get("x-api-key", "")
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        given = token.strip()
    if given and secrets.compare_digest(given.encode(), expected.encode()):
        return None
    body = ErrorMessage(error=f"this route needs the API key (Authorization: Bearer <key> or X-API-Key), see ${env}.")
    response = json_response(body, 401)
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def coverage_level(model: ServedModel, requested: str | None) -> str | None:
    """The conformal level a request asks for (``coverage`` field; default 0.90) as the card's key, or None for a
    model exported without conformal sets. Unknown levels and sets asked of such a model are refused by name."""
    levels = model.card.conformal
    if requested is None:
        return conformal.level_key(conformal.DEFAULT_COVERAGE) if levels else None
    if not levels:
        raise RequestError(
            f"coverage={requested!r}: {model.card.registered_model or model.task} version "
            f"{model.card.model_version or '?'} was exported without conformal prediction sets; train, register "
            "and deploy a new version (python -m training.cli register), or ask without coverage.",
            HTTPStatus.BAD_REQUEST,
        )
    text = requested.strip()
    try:
        key = conformal.level_key(float(text.rstrip("%")) / 100 if text.endswith("%") else float(text))
    except ValueError:
        key = None
    if key not in levels:
        raise RequestError(
            f"coverage={requested!r} is not a calibrated level of this model; choose one of: "
            f"{', '.join(sorted(levels))}.",
            HTTPStatus.BAD_REQUEST,
        )
    return key


def prediction(model: ServedModel, logits: np.ndarray, level: str | None = None) -> Prediction:
    probs = softmax(logits.astype(np.float64))
    best = int(probs.argmax())
    names = model.card.class_names
    ranked = sorted(zip(names, probs.tolist()), key=lambda pair: -pair[1])
    plausible = None
    if level is not None:
        [members] = conformal.prediction_sets(probs[None], model.card.conformal[level], model.penalty)
        plausible = [names[i] for i in members]
    return Prediction(
        task=model.task,
        label=names[best],
        class_index=best,
        confidence=float(probs[best]),
        probabilities=dict(ranked),
        prediction_set=plausible,
        coverage=float(level) if level is not None else None,
        model=model.info,
    )


def model_input(model: ServedModel, data: bytes, filename: str) -> np.ndarray:
    """Decoded, checked to be an image this model was made for, and shaped as its input."""
    image = decode_image(data, filename)
    check_suitable(image, model.task, model.spec, filename)
    return to_model_input(image, model.spec)


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
    coverage = {
        "type": "string",
        "description": "coverage level of the prediction set: one of the model's `coverage_levels` in GET /models "
        f"(default {conformal.DEFAULT_COVERAGE})",
    }
    required = [spec.file_field, *spec.text_fields]
    properties = {spec.file_field: files, "task": task, "coverage": coverage}
    if "class" in spec.optional_fields:
        properties["class"] = {
            "type": "string",
            "description": "class to explain, by name or index (default: predicted)",
        }
    body = {"type": "object", "required": required, "properties": properties}
    errors = {
        400: "malformed form, missing or unexpected field, empty image, a coverage level the model was not "
        "calibrated for",
        413: "body, image bytes, pixels or image count over the limit",
        415: "not multipart/form-data, or not a decodable image",
        401: "an API key is set (MEDZOO_API_KEY) and the request did not send it",
        422: "unknown task, truncated or corrupt image, or an image the model was not made for (too small, too "
        "elongated, grey for a colour task; the limits are in GET /models)",
    }
    return {
        "summary": summary,
        "openapi_extra": {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": body}}}},
        "responses": {status: {"model": ErrorMessage, "description": text} for status, text in errors.items()},
    }


DECLARED_MODELS = store_models()  # listed once: the class declares these and each worker loads them
IMAGE_FORM = FormSpec("image", many=False, optional_fields=("coverage",))
EXPLAIN_FORM = FormSpec("image", many=False, optional_fields=("coverage", "class"))
BATCH_FORM = FormSpec("images", many=True, optional_fields=("coverage",))

# The HTTP API. BentoML serves it inside the service (workers, model store, probes, /metrics, OpenAPI page);
# the routes read the upload themselves, once and in memory (README, "Why fast").
# FastAPI's own /docs and /redoc load their scripts from a CDN; the OpenAPI page is BentoML's, served offline.
api = FastAPI(
    title="MedZoo",
    description="MedMNIST classification with the MLflow registry champions.",
    docs_url=None,
    redoc_url=None,
)


class MedZoo:
    """The models and what they answer; the HTTP routes below only read requests and write answers."""

    def __init__(self) -> None:
        self.catalog = Catalog([served_model(getattr(type(self), a).stored) for a in DECLARED_MODELS])
        self._reloading = threading.Lock()
        interval = float(os.environ.get(RELOAD_INTERVAL_ENV, DEFAULT_RELOAD_INTERVAL_S))
        if interval > 0:
            threading.Thread(target=self._watch_store, args=(interval,), name="medzoo-reload", daemon=True).start()
        self.draining = False
        if threading.current_thread() is threading.main_thread():
            self._shut_down = signal.signal(signal.SIGTERM, self._drain_then_shut_down)

    def __is_ready__(self) -> bool:
        """/readyz: not ready once draining, so a load balancer stops sending requests here."""
        return not self.draining

    def _drain_then_shut_down(self, signum, frame) -> None:
        """SIGTERM: stop being ready, take in what is queued, refuse the rest, answer every request accepted
        (``serving.draining``; at most DRAIN_TIMEOUT_S), then hand the signal to uvicorn's own shutdown."""
        if self.draining:  # a second SIGTERM: no more waiting
            self._shut_down(signum, frame)
            return
        self.draining = True

        def drain_then_shut_down():
            draining.drain(DRAIN_TIMEOUT_S)
            self._shut_down(signum, None)

        threading.Thread(target=drain_then_shut_down, name="medzoo-drain", daemon=True).start()
        # What exists now (modules, models) lives as long as the worker: frozen, full garbage collections stop
        # scanning it, which otherwise pauses the worker for ~70 ms each time under load.
        gc.collect()
        gc.freeze()

    async def classify(self, task: str, image: bytes, coverage: str | None = None) -> Prediction:
        model = self.catalog.resolve(task)
        level = coverage_level(model, coverage)
        pixels = model_input(model, image, "image")
        return prediction(model, await model.batcher.infer(pixels), level)

    async def classify_batch(self, task: str, images: list[bytes], coverage: str | None = None) -> BatchPrediction:
        model = self.catalog.resolve(task)
        level = coverage_level(model, coverage)
        batch = np.stack([model_input(model, data, f"images[{i}]") for i, data in enumerate(images)])
        logits = await asyncio.to_thread(model.logits, batch)
        return BatchPrediction(task=model.task, results=[prediction(model, row, level) for row in logits])

    async def explain(
        self, task: str, image: bytes, coverage: str | None = None, class_name: str | None = None
    ) -> Explanation:
        model = self.catalog.resolve(task)
        level = coverage_level(model, coverage)
        pixels = model_input(model, image, "image")
        if not model.explain_path:
            answer = prediction(model, await model.batcher.infer(pixels), level)
            target = explanations.chosen_class(class_name, model.card.class_names, answer.class_index)
            return Explanation(
                prediction=answer,
                explained_class=model.card.class_names[target],
                cam=None,
                overlay_png=None,
                note=f"no map: {model.no_explanation}.",
            )
        logits, cams = await asyncio.to_thread(model.explain, pixels)
        answer = prediction(model, logits, level)
        target = explanations.chosen_class(class_name, model.card.class_names, answer.class_index)
        cam = explanations.scaled(cams[target])
        return Explanation(
            prediction=answer,
            explained_class=model.card.class_names[target],
            cam=np.round(cam, 4).tolist(),
            overlay_png=explanations.overlay_png(pixels, cam),
            note="class activation map (Zhou et al. 2016) of the plain view: the head's weights for the class over "
            "the last feature map, upsampled to the input and divided by its maximum.",
        )

    def reload(self) -> list[str]:
        """Load every model `deploy` imported since, and swap the catalogue in one assignment: requests already
        running finish on the model they started with, new ones get the new one. Returns what changed."""
        with self._reloading:
            current = {m.tag.split(":")[0]: m for m in self.catalog.models.values()}
            served, changed = [], []
            for name, stored in sorted(latest_in_store().items()):
                old = current.get(name)
                if old is not None and old.tag == str(stored.tag):
                    served.append(old)
                    continue
                served.append(served_model(stored))
                changed.append(f"{name}: {old.tag if old else 'new'} -> {stored.tag}")
            if changed:
                self.catalog = Catalog(served)
                logger.info("models reloaded: %s", "; ".join(changed))
            return changed

    def _watch_store(self, interval: float) -> None:
        """Every worker polls the model store, so a `deploy` reaches all of them without a restart."""
        while True:
            time.sleep(interval)
            try:
                self.reload()
            except Exception:  # noqa: BLE001 - a half-written or broken import: keep serving what works
                logger.exception("model reload failed; still serving the models loaded before")

    def catalogue(self) -> Catalogue:
        tasks = [
            TaskInfo(
                task=m.task,
                aliases=list(m.aliases),
                class_names=list(m.card.class_names),
                input_size=m.spec.input_size,
                in_chans=m.spec.in_chans,
                resize=m.spec.resize,
                min_side=minimum_side(m.spec),
                max_aspect_ratio=MAX_ASPECT_RATIO,
                colour_required=m.spec.in_chans == 3,
                model=m.info,
                temperature=m.card.temperature,
                coverage_levels=sorted(float(level) for level in m.card.conformal),
                largest_batch=max(m.batcher.batch_sizes, default=0),
                card=f"/models/{m.task}/card" if m.card_text is not None else None,
                explains=bool(m.explain_path),
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
    if refused := api_key_error(request, API_KEY_ENV):
        return refused
    service = current()
    try:
        form = await read_form(request, IMAGE_FORM)
        return json_response(await service.classify(form.text["task"], form.files[0], form.text.get("coverage")))
    except RequestError as err:
        return error(err)


@api.post("/classify_batch", response_model=BatchPrediction, **upload_openapi(BATCH_FORM, "Classify several images"))
async def classify_batch(request: Request) -> Response:
    """Up to 32 images (MAX_BATCH_IMAGES) of one task in the field `images`; results come in upload order."""
    if refused := api_key_error(request, API_KEY_ENV):
        return refused
    service = current()
    try:
        form = await read_form(request, BATCH_FORM)
        return json_response(await service.classify_batch(form.text["task"], form.files, form.text.get("coverage")))
    except RequestError as err:
        return error(err)


@api.post("/explain", response_model=Explanation, **upload_openapi(EXPLAIN_FORM, "Classify one image and show why"))
async def explain(request: Request) -> Response:
    """The /classify form, optionally `class` (a class name or index; default: the predicted class): the same
    prediction, the class activation map of that class and a PNG of it over the image. A model without maps
    (GET /models: `explains`) answers the prediction with `cam: null` and a `note` saying why."""
    if refused := api_key_error(request, API_KEY_ENV):
        return refused
    service = current()
    try:
        form = await read_form(request, EXPLAIN_FORM)
        text = form.text
        return json_response(
            await service.explain(text["task"], form.files[0], text.get("coverage"), text.get("class"))
        )
    except RequestError as err:
        return error(err)


# FastAPI documents the upload routes; Starlette serves them. They take the raw Request and return a Response,
# so FastAPI's dependency solving and validation would find nothing to do, yet cost about a tenth of the
# request's CPU.
for _route in api.routes:
    if isinstance(_route, APIRoute) and _route.endpoint in (classify, classify_batch, explain):
        _route.app = request_response(_route.endpoint)


@api.get("/", include_in_schema=False)
async def page() -> Response:
    """The web page: choose a task, drop an image, see the answer, its prediction set and its heat map."""
    return FileResponse(STATIC / "index.html")


@api.get("/docs", include_in_schema=False)
async def openapi_page() -> Response:
    """The OpenAPI page (request and response schemas, try-it-out) that BentoML shows at / by default."""
    return FileResponse(OPENAPI_PAGE)


api.mount("/static", StaticFiles(directory=STATIC), name="static")


@api.get("/models", response_model=Catalogue, summary="Served tasks and limits")
async def models() -> Catalogue:
    """The tasks served, with their aliases, class names, input size and model metadata, and the limits."""
    return current().catalogue()


@api.get(
    "/models/{task}/card",
    summary="The model card of a task's model",
    response_class=PlainTextResponse,
    responses={200: {"content": {CARD_MEDIA_TYPE: {}}}, 404: {"model": ErrorMessage}},
)
async def model_card(task: str) -> Response:
    """What the served version is for and not for, its data, recipe, scores, calibration, prediction sets,
    robustness and known confusions, as Markdown (the registry version's description is the same text)."""
    try:
        model = current().catalog.resolve(task)
    except RequestError as err:
        return json_response(ErrorMessage(error=str(err)), HTTPStatus.NOT_FOUND)
    if model.card_text is None:
        return json_response(ErrorMessage(error=model.card_problem), HTTPStatus.NOT_FOUND)
    return Response(model.card_text, media_type=CARD_MEDIA_TYPE)


@api.post(
    "/admin/reload",
    response_model=Reloaded,
    summary="Load newly deployed champions now",
    responses={401: {"model": ErrorMessage}, 403: {"model": ErrorMessage}},
)
async def reload_models(request: Request) -> Response:
    """Swap in what `deploy` imported since the start, without a restart and without failing a request. Needs
    the admin key ($MEDZOO_ADMIN_KEY); every worker also finds new models by itself within
    $MEDZOO_RELOAD_INTERVAL_S seconds."""
    if not os.environ.get(ADMIN_KEY_ENV):
        return json_response(ErrorMessage(error=f"admin routes are off; set ${ADMIN_KEY_ENV} to use them."), 403)
    if refused := api_key_error(request, ADMIN_KEY_ENV):
        return refused
    service = current()
    changed = await asyncio.to_thread(service.reload)
    versions = {m.task: m.info.version for m in service.catalog.models.values()}
    return json_response(Reloaded(changed=changed, versions=versions))


for _attribute, _model in DECLARED_MODELS.items():
    setattr(MedZoo, _attribute, _model)

MedZoo = bentoml.asgi_app(api, path="/")(MedZoo)
UPLOAD_ROUTES = ["/classify", "/classify_batch", "/explain"]
# One worker process per core by default (each holds every model, a few MB, and its own batchers).
# BentoML's access log line and tracing span per request cost about a fifth and a third of the classify
# throughput (README, "Why fast"), and BentoML 1.4.39 keeps every span in memory: the access log is off and
# the upload routes are not traced, unless MEDZOO_ACCESS_LOG=1 or MEDZOO_TRACING=1. Prometheus /metrics stays.
if os.environ.get(HOST_ENV, LOCAL_HOST) != LOCAL_HOST and not os.environ.get(API_KEY_ENV):
    logger.warning(
        "serving on %s without an API key: anyone who reaches it can use it (set $%s)",
        os.environ[HOST_ENV],
        API_KEY_ENV,
    )
MedZoo = bentoml.service(
    name="medzoo",
    # Reachable from this machine only, unless $MEDZOO_HOST (or `bentoml serve --host`) says otherwise.
    http={"host": os.environ.get(HOST_ENV, LOCAL_HOST)},
    workers=int(os.environ.get("MEDZOO_WORKERS", os.cpu_count() or 1)),
    traffic={"timeout": 60, "concurrency": 512},
    logging={"access": {"enabled": os.environ.get("MEDZOO_ACCESS_LOG") == "1"}},
    tracing={"excluded_urls": [] if os.environ.get("MEDZOO_TRACING") == "1" else UPLOAD_ROUTES},
)(MedZoo)
