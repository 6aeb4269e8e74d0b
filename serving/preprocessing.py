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


def to_model_input(image: Image.Image, spec: Preprocessing) -> np.ndarray:
    """float32 [C, H, W] in [0, 1]: channels converted as the model needs, resized, divided by 255."""
    image = image.convert("L" if spec.in_chans == 1 else "RGB")
    if image.size != (spec.input_size, spec.input_size):
        image = image.resize((spec.input_size, spec.input_size), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return pixels[None] if spec.in_chans == 1 else pixels.transpose(2, 0, 1).copy()
