"""The BentoML service: in-process through its ASGI app, and end to end as a real `bentoml serve`."""

from __future__ import annotations

import asyncio
import gc
import importlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from contract import ModelCard, Preprocessing, conformal
from serving.preprocessing import MAX_BATCH_IMAGES, decode_image, to_model_input
from tests.helpers.net import bentoml_server
from tests.helpers.paths import REAL_DATA_DIR, ROOT, requires_real_data
from tests.helpers.runs import project_env
from training.core.data import load_dataset
from training.core.devices import to_input


def png(array: np.ndarray) -> bytes:
    """uint8 [C, H, W] -> PNG bytes."""
    image = Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(autouse=True)
def synthetic_files(synthetic_env):
    """The tests read the synthetic files the champions were trained on (no official MD5 to check)."""


@pytest.fixture(scope="module")
def client(deployed):
    from starlette.testclient import TestClient

    service = importlib.reload(importlib.import_module("serving.service"))  # declares the deployed models
    with TestClient(service.MedZoo.to_asgi()) as test_client:
        yield test_client


def offline_probabilities(session: ort.InferenceSession, pixels: np.ndarray) -> np.ndarray:
    logits = session.run(None, {session.get_inputs()[0].name: pixels})[0]
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def post_image(client, data: bytes, task: str = "blood", name: str = "cell.png", route="/classify", data_extra=None):
    return client.post(route, files={"image": (name, data, "image/png")}, data={"task": task, **(data_extra or {})})


# --- preprocessing -----------------------------------------------------------------------------------


@requires_real_data
@pytest.mark.parametrize("dataset", ["bloodmnist", "organamnist", "breastmnist"])
def test_service_preprocessing_equals_the_training_pipeline_on_real_test_images(dataset):
    data = load_dataset(dataset, REAL_DATA_DIR)
    spec = Preprocessing(input_size=28, in_chans=data.channels, mean=(0.5,), std=(0.5,))
    images = data.test.images[:64]
    served = np.stack([to_model_input(decode_image(png(img.numpy())), spec) for img in images])
    assert served.dtype == np.float32
    np.testing.assert_array_equal(served, to_input(images).numpy())


def test_channels_and_size_follow_the_model():
    rgb_spec = Preprocessing(28, 3, (0.5,) * 3, (0.5,) * 3)
    gray = Image.fromarray(np.full((64, 80), 200, np.uint8))
    buffer = io.BytesIO()
    gray.save(buffer, "BMP")
    pixels = to_model_input(decode_image(buffer.getvalue()), rgb_spec)
    assert pixels.shape == (3, 28, 28) and np.allclose(pixels, 200 / 255)


# --- in-process through the ASGI app -----------------------------------------------------------------


def test_classify_matches_offline_onnxruntime(client, deployed):
    images = load_dataset("bloodmnist", deployed["data"]).test.images[:5]
    expected = offline_probabilities(deployed["onnx"]["bloodmnist"], to_input(images).numpy())
    for image, probs in zip(images, expected):
        response = post_image(client, png(image.numpy()), task="blood")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["task"] == "bloodmnist" and body["class_index"] == int(probs.argmax())
        assert body["confidence"] == pytest.approx(float(probs.max()), abs=1e-5)
        assert list(body["probabilities"].values()) == sorted(body["probabilities"].values(), reverse=True)
        assert body["label"] == next(iter(body["probabilities"]))
        assert body["model"]["registered_model"] == "medzoo-bloodmnist" and body["model"]["version"] == "1"
        assert body["model"]["architecture"] == "resnet9" and 0 <= body["model"]["val_acc"] <= 1


def test_batch_endpoint_keeps_upload_order(client, deployed):
    images = load_dataset("breastmnist", deployed["data"]).test.images[:6]
    expected = offline_probabilities(deployed["onnx"]["breastmnist"], to_input(images).numpy())
    files = [("images", (f"{i}.png", png(img.numpy()), "image/png")) for i, img in enumerate(images)]
    response = client.post("/classify_batch", files=files, data={"task": "breast"})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["class_index"] for r in results] == expected.argmax(1).tolist()
    assert [r["confidence"] for r in results] == pytest.approx(expected.max(1).tolist(), abs=1e-5)


def test_models_lists_tasks_with_metadata(client):
    response = client.get("/models")
    assert response.status_code == 200
    tasks = {t["task"]: t for t in response.json()["tasks"]}
    assert set(tasks) == {"bloodmnist", "breastmnist"}
    assert "blood" in tasks["bloodmnist"]["aliases"] and tasks["bloodmnist"]["in_chans"] == 3
    assert tasks["breastmnist"]["class_names"] == ["malignant", "normal, benign"]
    assert response.json()["limits"]["max_batch_images"] == MAX_BATCH_IMAGES
    assert client.get("/livez").status_code == 200 and client.get("/readyz").status_code == 200
    spec = client.get("/docs.json").json()
    assert {"/classify", "/classify_batch", "/models"} <= set(spec["paths"])
    classify = spec["paths"]["/classify"]["post"]
    form = classify["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["image", "task"] and form["properties"]["image"]["format"] == "binary"
    assert classify["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/Prediction")
    assert {"400", "413", "415", "422"} <= set(classify["responses"])
    batch_form = spec["paths"]["/classify_batch"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert batch_form["properties"]["images"]["maxItems"] == MAX_BATCH_IMAGES


def test_answers_carry_a_conformal_set_at_the_level_asked_for(client, deployed):
    session = deployed["onnx"]["bloodmnist"]
    card = ModelCard.from_props(session.get_modelmeta().custom_metadata_map)
    assert card.temperature > 0 and set(card.conformal) == {"0.90", "0.95", "0.99"}
    tasks = {t["task"]: t for t in client.get("/models").json()["tasks"]}
    assert tasks["bloodmnist"]["coverage_levels"] == [0.9, 0.95, 0.99]
    assert tasks["bloodmnist"]["temperature"] == pytest.approx(card.temperature)
    images = load_dataset("bloodmnist", deployed["data"]).test.images[:8]
    logits = session.run(None, {session.get_inputs()[0].name: to_input(images).numpy()})[0].astype(np.float64)
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)  # in float64, as the service: sets are sums near a threshold
    names = card.class_names
    for image, probs in zip(images, expected):
        default = post_image(client, png(image.numpy())).json()
        assert default["coverage"] == 0.9
        [members] = conformal.prediction_sets(probs[None], card.conformal["0.90"])
        assert default["prediction_set"] == [names[i] for i in members]
        assert default["prediction_set"][0] == default["label"]
        sets = [
            client.post(
                "/classify",
                files={"image": ("c.png", png(image.numpy()), "image/png")},
                data={"task": "blood", "coverage": level},
            ).json()
            for level in ("0.95", "99%")
        ]
        assert [s["coverage"] for s in sets] == [0.95, 0.99]
        assert set(default["prediction_set"]) <= set(sets[0]["prediction_set"]) <= set(sets[1]["prediction_set"])
    refused = client.post(
        "/classify",
        files={"image": ("c.png", png(images[0].numpy()), "image/png")},
        data={"task": "blood", "coverage": "0.8"},
    )
    assert refused.status_code == 400
    assert (
        refused.json()["error"]
        == "coverage='0.8' is not a calibrated level of this model; choose one of: 0.90, 0.95, 0.99."
    )
    batch = client.post(
        "/classify_batch",
        files=[("images", ("a.png", png(images[0].numpy()), "image/png"))],
        data={"task": "blood", "coverage": "0.99"},
    )
    assert batch.status_code == 200 and batch.json()["results"][0]["coverage"] == 0.99


def test_each_task_serves_its_versions_model_card(client, deployed):
    tasks = {t["task"]: t for t in client.get("/models").json()["tasks"]}
    assert tasks["bloodmnist"]["card"] == "/models/bloodmnist/card"
    response = client.get("/models/blood/card")  # aliases work here too
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/markdown")
    version = tasks["bloodmnist"]["model"]["version"]
    text = response.text
    assert f"Registered model `medzoo-bloodmnist`, version {version}" in text and "Not for diagnosis" in text
    assert "| basophil |" in text and "-P dataset=bloodmnist" in text and "input `pixels`" in text
    unknown = client.get("/models/lung/card")
    assert unknown.status_code == 404 and "Unknown task 'lung'" in unknown.json()["error"]


def test_explain_answers_like_classify_with_a_map_and_an_overlay_for_any_class(client, deployed):
    import base64

    tasks = {t["task"]: t for t in client.get("/models").json()["tasks"]}
    assert tasks["bloodmnist"]["explains"] is True
    names = tasks["bloodmnist"]["class_names"]
    image = png(load_dataset("bloodmnist", deployed["data"]).test.images[0].numpy())
    classified = post_image(client, image, task="blood").json()
    response = post_image(client, image, task="blood", route="/explain")
    assert response.status_code == 200, response.text
    body = response.json()
    answer = body["prediction"]
    assert answer["label"] == classified["label"] and body["explained_class"] == classified["label"]
    for name, p in classified["probabilities"].items():
        assert answer["probabilities"][name] == pytest.approx(p, abs=1e-5)
    assert answer["prediction_set"] == classified["prediction_set"]
    cam = np.array(body["cam"])
    assert cam.shape == (28, 28) and cam.min() >= 0 and cam.max() == pytest.approx(1.0)
    overlay = Image.open(io.BytesIO(base64.b64decode(body["overlay_png"])))
    assert overlay.format == "PNG" and overlay.size == (224, 224)
    other = next(n for n in names if n != classified["label"])
    asked = post_image(client, image, task="blood", route="/explain", data_extra={"class": other}).json()
    assert asked["explained_class"] == other and asked["prediction"]["label"] == classified["label"]
    assert not np.allclose(np.array(asked["cam"]), cam)
    refused = post_image(client, image, task="blood", route="/explain", data_extra={"class": "dragon"})
    assert refused.status_code == 400 and "class='dragon' is not a class" in refused.json()["error"]
    assert "basophil" in refused.json()["error"]


def test_a_model_without_a_map_says_why():
    from serving.catalog import ServedModel

    card = ModelCard("mlp", "bloodmnist", "multi-class", ("a", "b"), Preprocessing(28, 3, (0.5,) * 3, (0.5,) * 3))
    plain = ServedModel.__new__(ServedModel)
    plain.card, plain.explain_path = card, ""
    assert "mlp has no activation map" in plain.no_explanation


def test_a_version_exported_before_cards_has_none_and_says_what_to_do():
    from serving.catalog import ServedModel

    card = ModelCard("cnn", "bloodmnist", "multi-class", ("a", "b"), Preprocessing(28, 3, (0.5,) * 3, (0.5,) * 3))
    old = ServedModel.__new__(ServedModel)  # no session needed to read its card
    old.card = card.with_registry("medzoo-bloodmnist", "2")
    assert old.card_text is None
    assert "lacks metrics.best_val_acc" in old.card_problem and "train it again" in old.card_problem
    assert "medzoo-bloodmnist v2" in old.card_problem


def test_a_version_exported_without_conformal_sets_answers_without_them_and_says_why():
    from types import SimpleNamespace

    from serving.preprocessing import RequestError
    from serving.service import coverage_level

    card = ModelCard(
        "cnn",
        "bloodmnist",
        "multi-class",
        ("a", "b"),
        Preprocessing(28, 3, (0.5,) * 3, (0.5,) * 3),
        registered_model="medzoo-bloodmnist",
        model_version="3",
    )
    old = SimpleNamespace(card=card, task="bloodmnist")
    assert coverage_level(old, None) is None
    with pytest.raises(
        RequestError, match="medzoo-bloodmnist version 3 was exported without conformal prediction sets"
    ):
        coverage_level(old, "0.9")


def _bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (6000, 6000)).save(buffer, "PNG")  # 36 Mpx in a few dozen kB
    return buffer.getvalue()


def bad_requests(image: bytes):
    """(description, request kwargs, expected status, expected words in the error)."""
    form = {"task": "blood"}
    return [
        (
            "unknown task",
            dict(files={"image": ("a.png", image, "image/png")}, data={"task": "lung"}),
            422,
            "Served tasks: bloodmnist (blood, blood-cell), breastmnist (breast)",
        ),
        (
            "missing file",
            dict(data=form, files={"other": ("a.png", image, "image/png")}),
            400,
            "unexpected form field(s) 'other'",
        ),
        ("no file at all", dict(data=form, files={"task": (None, "blood")}), 400, "missing the file field 'image'"),
        (
            "file given as a URL",
            dict(data=form, files={"image": (None, "http://127.0.0.1:9/x.png")}),
            400,
            "must be an uploaded file, not text",
        ),
        (
            "not an image",
            dict(files={"image": ("a.png", b"%PDF-1.4 not an image", "image/png")}, data=form),
            415,
            "not a decodable image",
        ),
        (
            "truncated image",
            dict(files={"image": ("a.png", image[: len(image) // 2], "image/png")}, data=form),
            422,
            "truncated or corrupt",
        ),
        ("wrong content type", dict(json={"task": "blood", "image": "aGVsbG8="}), 415, "multipart/form-data"),
        (
            "file over the byte limit",
            dict(files={"image": ("a.png", b"\x89PNG" + bytes(11 * 1024 * 1024), "image/png")}, data=form),
            413,
            "exceeds the limit",
        ),
        ("decompression bomb", dict(files={"image": ("a.png", _bomb(), "image/png")}, data=form), 413, "pixels"),
        ("empty file", dict(files={"image": ("a.png", b"", "image/png")}, data=form), 400, "empty"),
    ]


def test_bad_requests_get_clear_4xx_json_and_service_keeps_answering(client, deployed):
    image = png(load_dataset("bloodmnist", deployed["data"]).test.images[0].numpy())
    for description, kwargs, status, words in bad_requests(image):
        response = client.post("/classify", **kwargs)
        assert response.status_code == status, (description, response.status_code, response.text)
        assert words in response.json()["error"], (description, response.text)
    files = [("images", (f"{i}.png", image, "image/png")) for i in range(MAX_BATCH_IMAGES + 1)]
    response = client.post("/classify_batch", files=files, data={"task": "blood"})
    assert response.status_code == 413 and f"limit of {MAX_BATCH_IMAGES}" in response.json()["error"]
    assert post_image(client, image).status_code == 200


def form_app(spec, max_bytes=64 * 1024 * 1024):
    """A bare Starlette app that answers with what read_form makes of a request."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from serving.forms import read_form
    from serving.preprocessing import RequestError

    async def endpoint(request):
        try:
            form = await read_form(request, spec, max_bytes)
        except RequestError as err:
            return JSONResponse({"error": str(err)}, status_code=int(err.status))
        return JSONResponse({"sizes": [len(f) for f in form.files], "text": form.text})

    return Starlette(routes=[Route("/", endpoint, methods=["POST"])])


def test_upload_forms_are_read_once_and_strictly():
    from starlette.testclient import TestClient

    from serving.forms import FormSpec

    single = TestClient(form_app(FormSpec("image", many=False)))
    ok = single.post("/", files={"image": ("a.png", b"12345", "image/png")}, data={"task": "organ"})
    assert ok.status_code == 200 and ok.json() == {"sizes": [5], "text": {"task": "organ"}}
    small_limit = TestClient(form_app(FormSpec("image", many=False), max_bytes=1000))
    big = small_limit.post("/", files={"image": ("a.png", bytes(5000), "image/png")}, data={"task": "organ"})
    assert big.status_code == 413 and "exceeds the limit of 1000 bytes" in big.json()["error"]
    headers = {"Content-Type": "multipart/form-data; boundary=xyz"}
    cases = [
        (dict(content=b"--xyz\r\nno headers at all", headers=headers), 400, "malformed multipart/form-data"),
        (dict(content=b"abc", headers={"Content-Type": "multipart/form-data"}), 400, "without a boundary"),
        (dict(files={"image": ("a.png", b"1")}, data={"task": "x" * 2000}), 400, "longer than 1024 bytes"),
        (dict(files={"image": ("a.png", b"1"), "task": ("t.bin", b"\xff\xfe")}), 400, "exactly one text field"),
        (dict(files={"image": ("a.png", b"1"), "task": (None, b"\xff\xfe")}), 400, "not UTF-8 text"),
        (dict(files=[("image", ("a.png", b"1")), ("image", ("b.png", b"2"))], data={"task": "t"}), 400, "one file"),
    ]
    for kwargs, status, words in cases:
        response = single.post("/", **kwargs)
        assert response.status_code == status and words in response.json()["error"], (kwargs, response.text)
    batch = TestClient(form_app(FormSpec("images", many=True)))
    files = [("images", (f"{i}.png", bytes([i]) * (i + 1), "image/png")) for i in range(3)]
    assert batch.post("/", files=files, data={"task": "blood"}).json()["sizes"] == [1, 2, 3]


def test_requests_leave_no_armed_timers_behind(client, deployed):
    """BentoML's request timeout timer is disarmed when the request is done (serving/bentoml_fixes.py)."""

    def armed_timers() -> int:
        return sum(isinstance(o, asyncio.TimerHandle) and not o.cancelled() for o in gc.get_objects())

    image = png(load_dataset("bloodmnist", deployed["data"]).test.images[0].numpy())
    before = armed_timers()
    for _ in range(40):
        assert post_image(client, image).status_code == 200
    assert armed_timers() - before < 5


def test_the_request_timeout_still_answers_504():
    from starlette.testclient import TestClient

    from serving.bentoml_fixes import DisarmedTimeoutMiddleware

    async def slow(scope, receive, send):
        await asyncio.sleep(5)

    response = TestClient(DisarmedTimeoutMiddleware(slow, timeout=0.05)).get("/")
    assert response.status_code == 504 and "0.05 seconds" in response.json()["error"]


@pytest.mark.e2e
def test_bentoml_build_packs_the_service_and_every_champion(deployed, tmp_path):
    import tarfile

    import bentoml

    built = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "--output", "tag"],
        cwd=ROOT,
        env=project_env(MLFLOW_TRACKING_URI=deployed["uri"]),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    tag = built.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    bento = bentoml.bentos.get(tag)
    assert {m.tag.name for m in bento.info.all_models} == {"medzoo-bloodmnist", "medzoo-breastmnist"}
    source = Path(bento.path) / "src" / "serving"
    assert {"service.py", "forms.py", "bentoml_fixes.py"} <= {p.name for p in source.glob("*.py")}
    archive = bentoml.bentos.export_bento(tag, str(tmp_path / "medzoo.bento"))  # what gets shipped
    with tarfile.open(archive) as packed:
        onnx_files = [name for name in packed.getnames() if name.endswith("/model.onnx")]
    packed_models = sorted(name.split("models/", 1)[1].split("/")[0] for name in onnx_files)
    assert packed_models == ["medzoo-bloodmnist", "medzoo-breastmnist"]


# --- end to end: a real `bentoml serve` on 127.0.0.1 --------------------------------------------------


@pytest.fixture(scope="module")
def server(deployed):
    # one worker, so /models reports the batches of the worker that served the load
    env = project_env(MLFLOW_TRACKING_URI=deployed["uri"], MEDZOO_WORKERS="1")
    with bentoml_server(env) as served:
        yield served


@pytest.mark.e2e
def test_real_server_answers_like_offline_onnxruntime_and_survives_bad_requests(server, deployed):
    base, process = server
    http = httpx.Client(base_url=base, timeout=30)
    images = load_dataset("bloodmnist", deployed["data"]).test.images[:8]
    expected = offline_probabilities(deployed["onnx"]["bloodmnist"], to_input(images).numpy())
    for image, probs in zip(images, expected):
        body = http.post(
            "/classify", files={"image": ("c.png", png(image.numpy()), "image/png")}, data={"task": "bloodmnist"}
        ).json()
        assert body["class_index"] == int(probs.argmax())
        assert body["confidence"] == pytest.approx(float(probs.max()), abs=1e-5)

    files = [("images", (f"{i}.png", png(img.numpy()), "image/png")) for i, img in enumerate(images)]
    batch = http.post("/classify_batch", files=files, data={"task": "blood"}).json()["results"]
    assert [r["class_index"] for r in batch] == expected.argmax(1).tolist()
    models = http.get("/models").json()
    assert {t["task"] for t in models["tasks"]} == {"bloodmnist", "breastmnist"}

    for description, kwargs, status, words in bad_requests(png(images[0].numpy())):
        response = http.post("/classify", **kwargs)
        assert response.status_code == status, (description, response.text)
        assert words in json.dumps(response.json()), description
    assert process.poll() is None, "the server died"
    after = http.post(
        "/classify", files={"image": ("c.png", png(images[1].numpy()), "image/png")}, data={"task": "blood"}
    )
    assert after.status_code == 200 and after.json()["class_index"] == int(expected[1].argmax())


@pytest.mark.e2e
def test_concurrent_requests_are_batched(server, deployed):
    import concurrent.futures

    base, _ = server
    image = png(load_dataset("bloodmnist", deployed["data"]).test.images[0].numpy())

    def one(_):
        return httpx.post(
            f"{base}/classify", files={"image": ("c.png", image, "image/png")}, data={"task": "blood"}, timeout=30
        ).json()["class_index"]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(96)))
    assert len(set(answers)) == 1
    blood = next(t for t in httpx.get(f"{base}/models").json()["tasks"] if t["task"] == "bloodmnist")
    assert blood["largest_batch"] > 1, "concurrent requests never shared an onnxruntime call"


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOT = ROOT / "docs" / "images" / "serving-page.png"


@pytest.mark.e2e
def test_the_page_answers_like_the_api_draws_the_map_and_shows_errors(server, deployed, tmp_path):
    """Debian's chromium, driven by Playwright, at phone width: upload a real test image, submit with the
    keyboard, compare the label and the bars with POST /classify, check the heat map is drawn; then a file that
    is no image gets the service's own message on the page."""
    from playwright.sync_api import sync_playwright

    base, _ = server
    cell = tmp_path / "cell.png"
    cell.write_bytes(png(load_dataset("bloodmnist", deployed["data"]).test.images[3].numpy()))
    expected = httpx.post(
        f"{base}/classify", files={"image": ("cell.png", cell.read_bytes(), "image/png")}, data={"task": "blood"}
    ).json()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 390, "height": 844})
        page.goto(f"{base}/")
        page.wait_for_selector("#task option[value=bloodmnist]", state="attached")
        page.select_option("#task", "bloodmnist")
        page.set_input_files("#image", str(cell))
        page.focus("#submit")
        page.keyboard.press("Enter")
        page.wait_for_selector("#result:not([hidden])")
        assert page.text_content("#label") == expected["label"]
        bars = page.eval_on_selector_all(
            "#bars li", "items => items.map(i => [i.dataset.name, +i.dataset.probability])"
        )
        assert [name for name, _ in bars] == list(expected["probabilities"])[: len(bars)]
        for name, probability in bars:
            assert probability == pytest.approx(expected["probabilities"][name], abs=1e-6)
        assert ", ".join(expected["prediction_set"]) in page.text_content("#set")
        page.wait_for_function("document.getElementById('heat').dataset.drawn === 'true'")
        drawn = page.evaluate(
            "() => { const d = document.getElementById('heat').getContext('2d').getImageData(0, 0, 224, 224).data;"
            " let alpha = 0; for (let i = 3; i < d.length; i += 4) alpha += d[i]; return alpha; }"
        )
        assert drawn > 0
        assert page.get_attribute("#model a", "href") == "/models/bloodmnist/card"
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        if os.environ.get("MEDZOO_UPDATE_SCREENSHOT") == "1":  # the docs' picture (docs/serving.md)
            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)

        logged_before = len(server[1].log_path.read_text())
        note = tmp_path / "note.png"
        note.write_text("not an image")
        page.set_input_files("#image", str(note))
        page.click("#submit")
        page.wait_for_selector("#error:not([hidden])")
        assert "image: not a decodable image; send PNG, JPEG" in page.text_content("#error")
        assert page.is_hidden("#result")
        browser.close()
    # a refused upload is an answer, not a server error: nothing about it in the server's log
    logged = server[1].log_path.read_text()[logged_before:]
    assert "Traceback" not in logged and "ERROR" not in logged, logged[-2000:]
    assert server[1].poll() is None
