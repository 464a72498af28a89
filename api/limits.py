"""What one request may cost: body bytes, concurrent inference requests, decoded pixels, and what counts as an image.

The checks run before the expensive step they guard: Content-Length before reading, a byte count while reading,
the image header's size before decoding, so a decompression bomb or an endless upload is refused, never buffered.
"""

from __future__ import annotations

import io
import json
import re
import warnings
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from PIL import Image

from api.errors import NotAnImage, TooLarge

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
"""Decoders PIL may use: the common web formats, not every format PIL knows (TIFF, EPS... stay off)."""

INFERENCE_PATH = re.compile(r"^/v1/models/[^/]+/predict$|^/v2/models/[^/]+/infer$")


async def send_error(send: Send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    """Answer {"error": message} straight from ASGI, for middleware that refuses before the app runs."""
    body = json.dumps({"error": message}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class RequestLimits:
    """ASGI middleware: refuses bodies over `max_body_bytes` (413) and inference requests beyond `max_inflight`
    at once (503 with Retry-After), before anything is read or decoded.

    Admission is counted from the first byte to the response, so reading, decoding, queueing and running together
    stay bounded in memory: at most max_inflight × max_body_bytes of uploads exist at any time.
    """

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, max_inflight: int,
                 on_inflight: Callable[[int], None] | None = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_inflight = max_inflight
        self.inflight = 0
        self.on_inflight = on_inflight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared == -1:
            await send_error(send, 400, "Content-Length is not a number")
            return
        if declared is not None and declared > self.max_body_bytes:
            await send_error(send, 413, self._too_large())
            return
        inference = scope.get("method") == "POST" and INFERENCE_PATH.match(scope.get("path", "")) is not None
        if inference and self.inflight >= self.max_inflight:
            await send_error(send, 503, f"the server is busy ({self.inflight} inference requests in progress); "
                                        "retry after the Retry-After seconds", {"Retry-After": "1"})
            return
        if inference:
            self._count(+1)
        try:
            await self._guarded(scope, receive, send)
        finally:
            if inference:
                self._count(-1)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app with a byte-counting receive; past the limit, stop reading and answer 413 ourselves."""
        received = 0
        exceeded = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    exceeded = True
                    raise TooLarge(self._too_large())
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                return  # whatever the app makes of the interrupted read, the answer is 413
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await send_error(send, 413, self._too_large())

    def _too_large(self) -> str:
        return (f"the request body exceeds {self.max_body_bytes} bytes; send fewer or smaller images "
                "(the limit is --max-body-bytes / ZOO_MAX_BODY_BYTES)")

    def _count(self, delta: int) -> None:
        self.inflight += delta
        if self.on_inflight is not None:
            self.on_inflight(self.inflight)


def _content_length(scope: Scope) -> int | None:
    """The declared body length, None when absent, -1 when malformed."""
    for key, value in scope.get("headers", []):
        if key == b"content-length":
            try:
                n = int(value)
            except ValueError:
                return -1
            return n if n >= 0 else -1
    return None


def decode_image(data: bytes, *, max_pixels: int, name: str = "file") -> Image.Image:
    """An RGB image from raw bytes, decided by decoding (never by the declared Content-Type).

    The pixel count is read from the header and checked before any pixel is decoded, so a small file that
    expands to gigabytes is a 413, not an allocation. Truncated or corrupt data is a 415.
    """
    if not data:
        raise NotAnImage(f"{name} is empty (0 bytes); upload a JPEG, PNG, WebP, GIF or BMP image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise TooLarge(f"{name} is {width}×{height} = {width * height} pixels, over the limit of "
                               f"{max_pixels} (--max-pixels / ZOO_MAX_PIXELS); downscale it")
            image.load()
            return image.convert("RGB")
    except TooLarge:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise TooLarge(f"{name} decodes to too many pixels ({err}); downscale it") from None
    except Exception as err:  # PIL's decoders raise many types on corrupt input; all mean "not an image"
        raise NotAnImage(f"{name} is not a decodable image ({type(err).__name__}); upload a complete JPEG, PNG, "
                         "WebP, GIF or BMP file") from None
