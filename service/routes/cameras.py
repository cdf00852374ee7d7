"""Cameras the server watches itself: add, list, inspect, change, remove; the latest scored frame.

A camera's URL is shown redacted (``rtsp://user:***@host/...``): its credentials never leave the server.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import HTTPConnection

from service.cameras.manager import CameraManager
from service.cameras.store import NAME_PATTERN
from service.deps import AdminAuth
from service.schemas import ErrorResponse

router = APIRouter(prefix="/v1/cameras", tags=["cameras"])
CameraName = Annotated[str, Path(pattern=NAME_PATTERN.pattern, description="The camera's name.")]
URL_ERRORS = {
    403: {"model": ErrorResponse, "description": "Cameras disabled (VAD_CAMERA_URL_ALLOW empty), or the URL is not allowed"},
    422: {"model": ErrorResponse, "description": "A malformed body or URL"},
}
AUTH_ERRORS = {401: {"model": ErrorResponse}, 403: {"model": ErrorResponse}}


class NewCamera(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN.pattern, description="1-63 of a-z 0-9 _ -, starting with a letter or digit.")
    url: str = Field(min_length=1, description="rtsp://, rtsps://, http(s):// (e.g. MJPEG) or file:/// under VAD_FOOTAGE_ROOT.")
    fps: float = Field(10.0, gt=0, le=60, description="Frames per second sampled from the camera and scored.")
    enabled: bool = True


class CameraChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(None, min_length=1)
    fps: float | None = Field(None, gt=0, le=60)
    enabled: bool | None = None


def get_cameras(connection: HTTPConnection) -> CameraManager:
    cameras = connection.app.state.services.cameras
    assert cameras is not None  # create_app sets it
    return cameras


CamerasDep = Annotated[CameraManager, Depends(get_cameras)]


@router.post("", status_code=201, dependencies=[AdminAuth], summary="Add a camera (persisted; opened at once when enabled)",
             responses={**AUTH_ERRORS, **URL_ERRORS, 409: {"model": ErrorResponse, "description": "Name taken, or VAD_MAX_CAMERAS reached"}})
async def add_camera(body: NewCamera, cameras: CamerasDep) -> Response:
    view = await cameras.add(body.name, body.url, body.fps, body.enabled)
    return JSONResponse(view, 201, headers={"Location": f"/v1/cameras/{body.name}"})


@router.get("", summary="Every camera with its state")
async def list_cameras(cameras: CamerasDep) -> dict[str, Any]:
    return {"cameras": await cameras.list()}


@router.get("/{name}", summary="One camera: state, last frame time, frames scored and dropped, reconnects, last error",
            responses={404: {"model": ErrorResponse}})
async def get_camera(name: CameraName, cameras: CamerasDep) -> dict[str, Any]:
    return await cameras.view(name)


@router.patch("/{name}", dependencies=[AdminAuth], summary="Change a camera's url, fps or enabled (it reconnects)",
              responses={**AUTH_ERRORS, **URL_ERRORS, 404: {"model": ErrorResponse}})
async def change_camera(name: CameraName, body: CameraChange, cameras: CamerasDep) -> dict[str, Any]:
    return await cameras.update(name, body.url, body.fps, body.enabled)


@router.delete("/{name}", status_code=204, dependencies=[AdminAuth], summary="Stop watching a camera and forget it",
               responses={**AUTH_ERRORS, 404: {"model": ErrorResponse}})
async def delete_camera(name: CameraName, cameras: CamerasDep) -> Response:
    await cameras.delete(name)
    return Response(status_code=204)


ELSEWHERE = {409: {"model": ErrorResponse, "description": "The camera runs on another replica (named), or on none now"}}


@router.get("/{name}/latest.jpg", summary="The camera's latest scored frame (JPEG)", response_class=Response,
            responses={200: {"content": {"image/jpeg": {}}}, 404: {"model": ErrorResponse}, **ELSEWHERE})
async def latest_frame(name: CameraName, cameras: CamerasDep) -> Response:
    return Response(await cameras.latest_jpeg(name), media_type="image/jpeg", headers={"Cache-Control": "no-store"})


@router.get("/{name}/latest-heatmap.png", summary="The latest scored frame with its anomaly map over it (PNG)",
            response_class=Response, responses={200: {"content": {"image/png": {}}}, 404: {"model": ErrorResponse}, **ELSEWHERE})
async def latest_heatmap(name: CameraName, cameras: CamerasDep) -> Response:
    return Response(await cameras.latest_heatmap(name), media_type="image/png", headers={"Cache-Control": "no-store"})
