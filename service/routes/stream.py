"""WS /v1/stream: a camera stream, one encoded frame per binary message (see service/ws_session.py)."""

from __future__ import annotations

from fastapi import APIRouter, WebSocket

from service.deps import ServicesDep
from service.ws_session import StreamSession

router = APIRouter(tags=["scoring"])


@router.websocket("/v1/stream")
async def stream(websocket: WebSocket, services: ServicesDep) -> None:
    await StreamSession(websocket, services).run()
