"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response

from service.deps import ServicesDep
from service.schemas import ErrorResponse, Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="The process is up")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz", response_model=Readiness, summary="A model is loaded",
    responses={503: {"model": ErrorResponse, "description": "No model loaded"}},
)
async def readyz(request: Request, services: ServicesDep) -> Readiness:
    return Readiness(status="ready", model_version=services.store.require().version, replica=request.app.state.replica.id)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(services: ServicesDep) -> Response:
    return Response(services.metrics.render(), media_type=CONTENT_TYPE_LATEST)
