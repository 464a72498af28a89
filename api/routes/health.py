"""Liveness (the process answers) and readiness (every model is loaded and its predictor built)."""

from __future__ import annotations

from fastapi import APIRouter

from api.errors import Busy
from api.schemas import ErrorBody, Health
from api.state import Service, ServiceDep

router = APIRouter(prefix="/health", tags=["health"])


def require_ready(service: Service) -> None:
    """503 with the reason until loading has finished (and for good if it failed)."""
    registry = service.registry
    if registry.error is not None:
        raise Busy(f"loading the models failed: {registry.error}", retry_after=60)
    if not registry.ready:
        raise Busy("models are still loading", retry_after=5)


@router.get("/live", response_model=Health)
def live() -> Health:
    return Health(status="live")


@router.get("/ready", response_model=Health, responses={503: {"model": ErrorBody}})
def ready(service: ServiceDep) -> Health:
    require_ready(service)
    return Health(status="ready", models=sorted(service.registry.models))
