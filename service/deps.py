"""Typed dependencies shared by the routes (FastAPI ``Annotated`` aliases)."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Header, Query
from starlette.requests import HTTPConnection

from service.batcher import Batcher
from service.cameras.manager import CameraManager
from service.errors import Forbidden, Unauthorized
from service.events.recorder import EventRecorder
from service.metrics import Metrics
from service.model_store import ModelStore, ServingModel
from service.settings import Settings


@dataclass
class Services:
    """Everything one app instance owns; created by create_app, reached through ``app.state``."""

    settings: Settings
    metrics: Metrics
    store: ModelStore
    batcher: Batcher
    events: EventRecorder  # events from scored frames: store, bus (SSE, webhooks), retention
    upload_dir: Path | None = None  # a private temp folder, created at startup
    cameras: CameraManager | None = None  # the cameras the server watches; set by create_app


def get_services(connection: HTTPConnection) -> Services:
    return connection.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_ready_model(services: ServicesDep) -> ServingModel:
    """The model this request will use to the end, pinned now (503 not_ready when none is loaded)."""
    return services.store.require()


ReadyModel = Annotated[ServingModel, Depends(get_ready_model)]


def require_api_key(
    services: ServicesDep, authorization: Annotated[str | None, Header()] = None
) -> None:
    """When VAD_API_KEY is set: 401 without ``Authorization: Bearer <key>``, 403 for a wrong key."""
    expected = services.settings.api_key
    if expected is None:
        return
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("this endpoint needs 'Authorization: Bearer <API key>'")
    if not hmac.compare_digest(token.strip().encode(), expected.get_secret_value().encode()):
        raise Forbidden("the API key is not valid")


AdminAuth = Depends(require_api_key)

IncludeMaps = Annotated[bool, Query(alias="maps", description="Include each frame's patch anomaly map.")]
StreamFlag = Annotated[bool, Query(alias="stream", description="Stream NDJSON (same as Accept: application/x-ndjson).")]
AcceptHeader = Annotated[str | None, Header(alias="accept")]
