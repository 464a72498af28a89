"""HTTP errors of the service: each becomes a 4xx/5xx response with the body {"error": "..."} and nothing else."""

from __future__ import annotations

from collections.abc import Mapping


class ApiError(Exception):
    """An error with its HTTP status and a message that says what to do; never carries a traceback to the client."""

    status = 400

    def __init__(self, message: str, *, status: int | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        self.headers = dict(headers or {})


class NotFound(ApiError):
    """An unknown model (or route)."""

    status = 404


class TooLarge(ApiError):
    """Body, file count or decoded pixels above the configured limits."""

    status = 413


class NotAnImage(ApiError):
    """A file that does not decode as an image, whatever its Content-Type says."""

    status = 415


class Unprocessable(ApiError):
    """A tensor of the wrong shape or datatype, or a parameter out of range."""

    status = 422


class Busy(ApiError):
    """The inference queue is full, or models are still loading: retry later."""

    status = 503

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})
