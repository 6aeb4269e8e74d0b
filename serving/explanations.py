"""What ``POST /explain`` adds to an answer: one class's activation map, scaled to [0, 1], and a PNG of it over
the image the model saw. numpy and Pillow only (the service imports no deep-learning framework).

The map comes from the model's explanation graph (``contract.EXPLAIN_FILE``, made by ``zoo.cam`` at export):
every class's map at the model's input size. The overlay is drawn at OVERLAY_SIZE so people can see it; the
colours run from transparent dark blue (no evidence) to opaque yellow (the most), a perceptual ramp close to
matplotlib's viridis.
"""

from __future__ import annotations

import base64
import io
from http import HTTPStatus

import numpy as np
from PIL import Image

from serving.preprocessing import RequestError

OVERLAY_SIZE = 224
# viridis at 0, 0.25, 0.5, 0.75 and 1 (RGB), interpolated linearly between.
RAMP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)
OPACITY = 0.55  # of the map at its strongest


def chosen_class(requested: str | None, class_names: tuple[str, ...], predicted: int) -> int:
    """The class to explain: the predicted one, or the one asked for by name or index."""
    if requested is None or not requested.strip():
        return predicted
    text = requested.strip()
    if text in class_names:
        return class_names.index(text)
    if text.isdigit() and int(text) < len(class_names):
        return int(text)
    raise RequestError(
        f"class={requested!r} is not a class of this model; use a name or an index 0-{len(class_names) - 1}: "
        f"{', '.join(class_names)}.",
        HTTPStatus.BAD_REQUEST,
    )


def scaled(cam: np.ndarray) -> np.ndarray:
    """A map in [0, 1] (divided by its maximum; all zeros stays zeros)."""
    peak = float(cam.max())
    return (cam / peak if peak > 0 else np.zeros_like(cam)).astype(np.float32)


def overlay_png(pixels: np.ndarray, cam: np.ndarray) -> str:
    """Base64 PNG: the model's input (float32 [C, H, W] in [0, 1]) in grey or colour, with ``cam`` ([H, W] in
    [0, 1]) over it, both enlarged to OVERLAY_SIZE."""
    image = (np.clip(pixels, 0, 1) * 255).astype(np.uint8)
    base = Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).convert("RGB")
    base = base.resize((OVERLAY_SIZE, OVERLAY_SIZE), Image.NEAREST)
    heat = Image.fromarray((cam * 255).astype(np.uint8)).resize((OVERLAY_SIZE, OVERLAY_SIZE), Image.BILINEAR)
    level = np.asarray(heat, dtype=np.float64) / 255.0
    position = level * (len(RAMP) - 1)
    low = np.floor(position).astype(int).clip(0, len(RAMP) - 2)
    colour = RAMP[low] + (RAMP[low + 1] - RAMP[low]) * (position - low)[..., None]
    alpha = (OPACITY * level)[..., None]
    blended = np.asarray(base, dtype=np.float64) * (1 - alpha) + colour * alpha
    buffer = io.BytesIO()
    Image.fromarray(blended.round().astype(np.uint8)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
