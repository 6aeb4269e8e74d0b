"""Bytes to model input, driven only by the model card's preprocessing (no torch, no training code).

For an image at the model's native size this gives exactly the tensor the training pipeline feeds:
uint8 pixels / 255, channels first. Other sizes are resized with PIL's bilinear filter, the filter the
training data layer reproduces when it resizes.
"""

from __future__ import annotations

import io
import warnings
from http import HTTPStatus

import numpy as np
from PIL import Image, UnidentifiedImageError

from contract import Preprocessing

MAX_IMAGE_BYTES = 10 * 1024 * 1024
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_BATCH_IMAGES = 32
ACCEPTED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")
# Images a model was not made for are refused rather than diagnosed. The MedMNIST models saw square crops at
# their input size: a side under half of it is upsampled past what the pixels hold, and a long thin image is
# not a crop of the organ or cell at all.
MAX_ASPECT_RATIO = 2.0
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F", "P")  # "P": palettes are checked after conversion
# An RGB image whose channels differ by at most this much everywhere is a grey image saved as colour.
GREY_TOLERANCE = 2


class RequestError(Exception):
    """A bad request: maps to a 4xx JSON answer and never disturbs the server."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.UNPROCESSABLE_ENTITY):
        super().__init__(message)
        self.status = status


def decode_image(data: bytes, filename: str = "image") -> Image.Image:
    """Decode and fully load an image within the byte and pixel limits (decompression bombs refused)."""
    if not data:
        raise RequestError(f"{filename}: the file is empty.", HTTPStatus.BAD_REQUEST)
    if len(data) > MAX_IMAGE_BYTES:
        raise RequestError(
            f"{filename}: {len(data)} bytes exceeds the limit of {MAX_IMAGE_BYTES} bytes.",
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in ACCEPTED_FORMATS:
                raise RequestError(
                    f"{filename}: {image.format} images are not accepted; send {', '.join(ACCEPTED_FORMATS)}.",
                    HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                )
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise RequestError(
                    f"{filename}: {width}x{height} pixels exceeds the limit of {MAX_IMAGE_PIXELS} pixels.",
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                )
            image.load()
    except RequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise RequestError(
            f"{filename}: refused as a decompression bomb ({err}).", HTTPStatus.REQUEST_ENTITY_TOO_LARGE
        ) from None
    except UnidentifiedImageError:
        raise RequestError(
            f"{filename}: not a decodable image; send {', '.join(ACCEPTED_FORMATS)}.", HTTPStatus.UNSUPPORTED_MEDIA_TYPE
        ) from None
    except (OSError, ValueError, SyntaxError) as err:  # truncated or corrupt streams
        raise RequestError(f"{filename}: the image data is truncated or corrupt ({err}).") from None
    return image


def minimum_side(spec: Preprocessing) -> int:
    return max(8, spec.input_size // 2)


def expectation(task: str, spec: Preprocessing) -> str:
    """What the model takes, in the words a 422 answer uses."""
    colour = "colour (RGB)" if spec.in_chans == 3 else "grey or colour"
    return (
        f"the {task} model expects {colour} images of at least {minimum_side(spec)}x{minimum_side(spec)} px with "
        f"an aspect ratio of at most {MAX_ASPECT_RATIO:g}:1 (it was trained on {spec.input_size}x{spec.input_size})"
    )


def check_suitable(image: Image.Image, task: str, spec: Preprocessing, filename: str = "image") -> None:
    """422 for an image the model was not made for: too small, too elongated, or grey for a colour task."""
    width, height = image.size
    problem = None
    if min(width, height) < minimum_side(spec):
        problem = f"it is {width}x{height} px"
    elif max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        problem = f"its aspect ratio is {max(width, height) / min(width, height):.1f}:1 ({width}x{height} px)"
    elif spec.in_chans == 3 and _is_grey(image):
        problem = f"it is a grey image (mode {image.mode})"
    if problem:
        raise RequestError(f"{filename}: {expectation(task, spec)}; {problem}.")


def _is_grey(image: Image.Image) -> bool:
    if image.mode in GREY_MODES[:-1]:
        return True
    pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    return int(np.abs(pixels - pixels[..., :1]).max()) <= GREY_TOLERANCE


def to_model_input(image: Image.Image, spec: Preprocessing) -> np.ndarray:
    """float32 [C, H, W] in [0, 1]: channels converted as the model needs, resized, divided by 255."""
    image = image.convert("L" if spec.in_chans == 1 else "RGB")
    if image.size != (spec.input_size, spec.input_size):
        image = image.resize((spec.input_size, spec.input_size), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return pixels[None] if spec.in_chans == 1 else pixels.transpose(2, 0, 1).copy()
