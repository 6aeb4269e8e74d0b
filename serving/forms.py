"""The upload forms of /classify and /classify_batch: read once, bounded, parsed in memory, checked strictly.

The body is read up to a byte limit and parsed by python-multipart straight into bytes (no temporary files,
no second parse), and only the expected fields pass: the file field and the text field ``task``. Text in a
file field is refused rather than fetched as a URL. Every problem is a ``RequestError``: a 4xx JSON answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from http import HTTPStatus

from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header
from starlette.requests import ClientDisconnect, Request

from serving.preprocessing import MAX_BATCH_IMAGES, MAX_IMAGE_BYTES, RequestError

MAX_REQUEST_BYTES = 64 * 1024 * 1024
MAX_PARTS = 4 * MAX_BATCH_IMAGES  # parsing stops here; the per-field limits below give the precise message
MAX_TEXT_BYTES = 1024


@dataclass(frozen=True)
class FormSpec:
    file_field: str
    many: bool  # several files allowed
    text_fields: tuple[str, ...] = ("task",)
    optional_fields: tuple[str, ...] = ()  # text fields that may be left out

    @property
    def fields(self) -> tuple[str, ...]:
        return (self.file_field, *self.text_fields, *self.optional_fields)


@dataclass(frozen=True)
class Part:
    name: str
    filename: str | None  # None for a text field
    data: bytes


@dataclass(frozen=True)
class UploadForm:
    files: list[bytes]
    text: dict[str, str]


async def read_form(request: Request, spec: FormSpec, max_bytes: int = MAX_REQUEST_BYTES) -> UploadForm:
    boundary = _boundary(request.headers.get("content-type", ""), spec)
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise _too_big(int(length), max_bytes)
    return _checked(_parse(await _read_body(request, max_bytes), boundary), spec)


@lru_cache(maxsize=1024)  # clients repeat the same few headers; python-multipart's parser is slow-ish
def _options(header: str | bytes) -> tuple[bytes, dict[bytes, bytes]]:
    return parse_options_header(header)


def _boundary(content_type: str, spec: FormSpec) -> bytes:
    media_type, options = _options(content_type)
    if media_type != b"multipart/form-data":
        raise RequestError(
            f"Content-Type {content_type or '(none)'!r} is not accepted: send multipart/form-data with the file "
            f"field {spec.file_field!r} and the field 'task'.",
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
        )
    if not options.get(b"boundary"):
        raise RequestError("multipart/form-data without a boundary parameter.", HTTPStatus.BAD_REQUEST)
    return options[b"boundary"]


def _too_big(size: int, limit: int) -> RequestError:
    return RequestError(
        f"request body of {size} bytes exceeds the limit of {limit} bytes.", HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    )


async def _read_body(request: Request, max_bytes: int) -> bytes:
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise _too_big(size, max_bytes)
            chunks.append(chunk)
    except ClientDisconnect:
        raise RequestError("the client disconnected before the body was complete.", HTTPStatus.BAD_REQUEST) from None
    return b"".join(chunks)


def _parse(body: bytes, boundary: bytes) -> list[Part]:
    parts: list[Part] = []
    headers: dict[bytes, bytes] = {}
    field, value, data = bytearray(), bytearray(), []

    def on_part_begin():
        headers.clear()
        data.clear()

    def on_header_end():
        headers[bytes(field).lower()] = bytes(value)
        field.clear()
        value.clear()

    def on_part_end():
        if len(parts) >= MAX_PARTS:
            raise RequestError(f"more than {MAX_PARTS} form parts.", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        _, options = _options(headers.get(b"content-disposition", b""))
        if b"name" not in options:
            raise RequestError("a form part has no name in its Content-Disposition.", HTTPStatus.BAD_REQUEST)
        filename = options.get(b"filename")
        parts.append(
            Part(
                options[b"name"].decode("utf-8", "replace"),
                None if filename is None else filename.decode("utf-8", "replace"),
                b"".join(data),
            )
        )

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_part_data": lambda buffer, start, end: data.append(buffer[start:end]),
            "on_part_end": on_part_end,
            "on_header_field": lambda buffer, start, end: field.extend(buffer[start:end]),
            "on_header_value": lambda buffer, start, end: value.extend(buffer[start:end]),
            "on_header_end": on_header_end,
        },
    )
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as err:
        raise RequestError(f"malformed multipart/form-data body: {err}.", HTTPStatus.BAD_REQUEST) from None
    if not parts:
        raise RequestError("malformed multipart/form-data body: no form parts found.", HTTPStatus.BAD_REQUEST)
    return parts


def _checked(parts: list[Part], spec: FormSpec) -> UploadForm:
    unexpected = sorted({p.name for p in parts} - set(spec.fields))
    if unexpected:
        raise RequestError(
            f"unexpected form field(s) {', '.join(map(repr, unexpected))}; send {', '.join(spec.fields)}.",
            HTTPStatus.BAD_REQUEST,
        )
    files = [p for p in parts if p.name == spec.file_field]
    if not files:
        raise RequestError(f"missing the file field {spec.file_field!r}.", HTTPStatus.BAD_REQUEST)
    if any(p.filename is None for p in files):
        raise RequestError(
            f"{spec.file_field!r} must be an uploaded file, not text (URLs are not fetched).", HTTPStatus.BAD_REQUEST
        )
    if not spec.many and len(files) > 1:
        raise RequestError(
            f"send one file in {spec.file_field!r} (use /classify_batch for several).", HTTPStatus.BAD_REQUEST
        )
    if len(files) > MAX_BATCH_IMAGES:
        raise RequestError(
            f"{len(files)} images exceeds the limit of {MAX_BATCH_IMAGES} per request.",
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        )
    for index, part in enumerate(files):
        if len(part.data) > MAX_IMAGE_BYTES:
            label = f"{spec.file_field}[{index}]" if spec.many else spec.file_field
            raise RequestError(
                f"{label}: {len(part.data)} bytes exceeds the limit of {MAX_IMAGE_BYTES} bytes.",
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            )
    text = {}
    for name in (*spec.text_fields, *spec.optional_fields):
        values = [p for p in parts if p.name == name]
        if not values and name in spec.optional_fields:
            continue
        if len(values) != 1 or values[0].filename is not None:
            wanted = "at most one" if name in spec.optional_fields else "exactly one"
            raise RequestError(f"the form needs {wanted} text field {name!r}.", HTTPStatus.BAD_REQUEST)
        if len(values[0].data) > MAX_TEXT_BYTES:
            raise RequestError(f"the field {name!r} is longer than {MAX_TEXT_BYTES} bytes.", HTTPStatus.BAD_REQUEST)
        try:
            text[name] = values[0].data.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(f"the field {name!r} is not UTF-8 text.", HTTPStatus.BAD_REQUEST) from None
    return UploadForm([p.data for p in files], text)
