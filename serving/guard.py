"""ASGI middleware that vets uploads before BentoML parses them.

BentoML answers some malformed forms with a 500 (a binary value in a text field) and treats a text value
in a file field as a URL to download. This guard reads the body (bounded), parses the form itself and lets
through only well-formed requests: the expected file and text fields and nothing else.
"""

from __future__ import annotations

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import JSONResponse

from serving.preprocessing import MAX_BATCH_IMAGES

MAX_REQUEST_BYTES = 64 * 1024 * 1024
# route -> (file field, whether several files are allowed, text fields)
UPLOAD_ROUTES = {
    "/classify": ("image", False, ("task",)),
    "/classify_batch": ("images", True, ("task",)),
}


class UploadGuard:
    def __init__(self, app, max_bytes: int = MAX_REQUEST_BYTES):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        route = UPLOAD_ROUTES.get(scope.get("path", "")) if scope["type"] == "http" else None
        if route is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        body, problem = await self._vet(scope, receive, route)
        if problem:
            await JSONResponse({"error": problem[1]}, status_code=problem[0])(scope, receive, send)
            return
        await self.app(scope, _replay(body), send)

    async def _vet(self, scope, receive, route) -> tuple[bytes, tuple[int, str] | None]:
        headers = dict(scope.get("headers") or [])
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        if not content_type.startswith("multipart/form-data"):
            return b"", (
                415,
                f"Content-Type {content_type or '(none)'!r} is not accepted: send multipart/form-data "
                f"with the file field {route[0]!r} and the field 'task'.",
            )
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return b"", self._too_big(int(length))
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", (400, "the client disconnected before the body was complete.")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return b"", self._too_big(size)
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        return body, await self._check_form(scope, body, route)

    def _too_big(self, size: int) -> tuple[int, str]:
        return 413, f"request body of {size} bytes exceeds the limit of {self.max_bytes} bytes."

    async def _check_form(self, scope, body: bytes, route) -> tuple[int, str] | None:
        file_field, many, text_fields = route
        try:
            form = await Request(scope, _replay(body)).form(max_files=MAX_BATCH_IMAGES + 1, max_fields=16)
        except MultiPartException as err:
            return 400, f"malformed multipart/form-data body: {err}."
        try:
            allowed = (file_field, *text_fields)
            unexpected = sorted(set(form.keys()) - set(allowed))
            if unexpected:
                return 400, f"unexpected form field(s) {', '.join(map(repr, unexpected))}; send {', '.join(allowed)}."
            files = form.getlist(file_field)
            if not files:
                return 400, f"missing the file field {file_field!r}."
            if any(not isinstance(f, UploadFile) for f in files):
                return 400, f"{file_field!r} must be an uploaded file, not text (URLs are not fetched)."
            if not many and len(files) > 1:
                return 400, f"send one file in {file_field!r} (use /classify_batch for several)."
            if len(files) > MAX_BATCH_IMAGES:
                return 413, f"{len(files)} images exceeds the limit of {MAX_BATCH_IMAGES} per request."
            for name in text_fields:
                values = form.getlist(name)
                if len(values) != 1 or not isinstance(values[0], str):
                    return 400, f"the form needs exactly one text field {name!r}."
            return None
        finally:
            await form.close()


def _replay(body: bytes):
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive
