"""The FastAPI application: ``create_app(settings)`` builds one self-contained instance (its own
model store, batcher, metrics registry and upload folder), so tests can run several side by side."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from model import __version__
from service.batcher import Batcher
from service.cameras.manager import CameraManager
from service.deps import Services
from service.errors import install_error_handlers
from service.events.recorder import EventRecorder
from service.events.relay import EventRelay
from service.events.webhooks import WebhookOutbox
from service.jobs.service import TrainingService
from service.jobs.store import SqlJobStore
from service.metrics import Metrics
from service.model_store import ModelStore
from service.replicas import Replica
from service.routes import cameras, clips, events, frames, health, models, stream, training_jobs
from service.settings import Settings, get_settings
from service.ui import mount_ui

log = logging.getLogger("vad.server")
UNMATCHED_ROUTE = "<unmatched>"


class RequestMetricsMiddleware:
    """Observes every HTTP request's duration (until its last body byte) by route template, method
    and status. Route templates, not raw paths, keep the label set small."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or UNMATCHED_ROUTE
            self.metrics.request_duration.labels(route, scope["method"], str(status)).observe(
                time.perf_counter() - started
            )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    metrics = Metrics()
    replica = Replica(settings)  # this server among those sharing the database: heartbeat, camera and webhook shares
    services = Services(
        settings=settings,
        metrics=metrics,
        store=ModelStore(settings, metrics),
        batcher=Batcher(settings.max_batch_patches, settings.max_queue_delay_s, settings.max_queue, metrics),
        events=EventRecorder(settings, metrics, replica),
    )
    # VAD_CAMERA_URL_ALLOW is parsed here: a malformed entry stops the server from starting
    services.cameras = CameraManager(settings, metrics, services.store, services.batcher, services.events, replica)
    # training jobs: queue + activation policy, on the database the replica opened (one per process)
    training = TrainingService(settings, metrics, services.store, SqlJobStore(replica.database))
    webhooks = WebhookOutbox(settings, metrics, replica)  # VAD_WEBHOOK_URLS: opened/closed events, from a persistent outbox
    webhooks.attach(services.events.bus)
    relay = EventRelay(replica.database, replica.id, services.events.bus)  # the other replicas' changes, to SSE
    relay.attach()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services.upload_dir = Path(tempfile.mkdtemp(prefix="vad-uploads-"))
        await services.batcher.start()
        try:
            await replica.start()  # before the events: live replicas' open events are theirs
            await webhooks.start()  # before the events: their start closes (publishes) what a crash left open
            await services.events.start()
            await relay.start()
            await services.store.start()
            await training.start()
            await services.cameras.start()  # the stored cameras, once a model is loaded
            yield
        finally:
            await services.cameras.stop()  # before the events: a camera's open event closes
            await training.stop()
            await services.store.stop()
            await relay.stop()
            await services.events.stop()
            await webhooks.stop()
            await replica.stop()  # last: the others see it gone, and take over, at once
            await services.batcher.stop()
            shutil.rmtree(services.upload_dir, ignore_errors=True)

    app = FastAPI(
        title="Video anomaly detection (ALOCC)",
        version=__version__,
        description="R + D one-class networks scoring video patches; see docs/server.md.",
        lifespan=lifespan,
    )
    app.state.services = services
    app.state.replica = replica
    app.state.training = training
    install_error_handlers(app, settings.retry_after_s)
    for module in (health, models, clips, frames, stream, training_jobs, events, cameras):
        app.include_router(module.router)
    mount_ui(app)  # the web page at / (service/static), no auth
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Accept"],
        )
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    return app
