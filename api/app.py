"""create_app(settings): the FastAPI app, built by a factory so that tests and workers start it with their own settings.

Models load in a background thread at startup: /health/live answers at once, /health/ready turns 200 when every
model and its default predictor are ready, and no request ever triggers loading.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.auth import BearerAuth
from api.errors import ApiError
from api.limits import RequestLimits
from api.metrics import Metrics, MetricsMiddleware
from api.models import Registry
from api.routes import health, metrics, page, v1, v2
from api.schemas import InferRequest
from api.settings import SETTINGS_ENV, Settings
from api.state import Service
from zoo import __version__
from zoo.errors import ConfigError, DataError, ZooError

log = logging.getLogger("api")

LoadCallback = Callable[[str | None], None]


def resolve_refs(settings: Settings) -> list[str]:
    """The REFs to serve: the command line's, or the embedded default (built into the cache on first use)."""
    if settings.refs:
        return list(settings.refs)
    from zoo.demo import embedded_default

    return [str(embedded_default())]


def create_app(settings: Settings, *, on_loaded: LoadCallback | None = None) -> FastAPI:
    """The service for `settings`; `on_loaded(error or None)` is called once loading has finished."""
    service = Service(settings=settings, registry=Registry(), metrics=Metrics())

    def load() -> None:
        try:
            service.registry.load(settings, resolve_refs)
        finally:
            if on_loaded is not None:
                on_loaded(service.registry.error)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        threading.Thread(target=load, name="zoo-loader", daemon=True).start()
        yield
        await service.stop()

    app = FastAPI(
        title="prior-zoo", version=__version__, lifespan=lifespan,
        description="Predictive uncertainty (total, aleatoric, epistemic; nats) from prior-zoo priors and "
                    "posteriors, over JSON/multipart (/v1) and the Open Inference Protocol (/v2).",
    )
    app.state.service = service
    for router in (health.router, v1.router, v2.router, page.router, metrics.router):
        app.include_router(router)
    _add_error_handlers(app)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    # middleware: the last added runs first: metrics → CORS → auth → limits → routes
    app.add_middleware(RequestLimits, max_body_bytes=settings.max_body_bytes, max_inflight=settings.queue_size,
                       on_inflight=service.metrics.inflight.set)
    if settings.api_token:
        app.add_middleware(BearerAuth, token=settings.api_token)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "Inference-Header-Content-Length"])
    app.add_middleware(MetricsMiddleware, metrics=service.metrics)
    return app


def app_from_env() -> FastAPI:
    """Factory for `--workers N` processes: the settings travel in ZOO_SERVE_SETTINGS (JSON), the token in its
    own variable."""
    text = os.environ.get(SETTINGS_ENV)
    settings = Settings.from_json(text) if text else Settings.from_env()
    return create_app(settings)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as {"error": "..."}: 4xx for what the client can fix, 5xx without a traceback for the rest."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return _error(err.status, err.message, err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        message = err.detail if isinstance(err.detail, str) else str(err.detail)
        if err.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see /docs"
        return _error(err.status_code, message, dict(err.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        parts = []
        for e in err.errors()[:3]:
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "request"
            parts.append(f"{where}: {e.get('msg', 'invalid')}")
        return _error(422, "; ".join(parts) or "invalid request")

    @app.exception_handler(ZooError)
    async def zoo_error(request: Request, err: ZooError) -> JSONResponse:
        status = 422 if isinstance(err, ConfigError | DataError) else 500
        return _error(status, str(err))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error(500, "internal server error; the server log has the details")


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus the Open Inference Protocol request body, which the infer route parses itself."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        extra = InferRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(extra.pop("$defs", {}))
        components["InferRequest"] = extra
        app.openapi_schema = schema
    return app.openapi_schema
