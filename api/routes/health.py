"""Liveness (the process answers) and readiness (every model is loaded and its predictor built)."""

from __future__ import annotations

from fastapi import APIRouter

from api.schemas import ErrorBody, Health
from api.state import ServiceDep

router = APIRouter(prefix="/health", tags=["health"])


@router.get("/live", response_model=Health)
def live() -> Health:
    return Health(status="live")


@router.get("/ready", response_model=Health, responses={503: {"model": ErrorBody}})
def ready(service: ServiceDep) -> Health:
    service.require_ready()
    return Health(status="ready", models=sorted(service.registry.models))
