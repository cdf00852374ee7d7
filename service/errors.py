"""Domain errors and their one conversion to HTTP.

Everything below the routes raises a ``ServiceError`` subclass (a stable machine-readable ``code`` and
a message safe to show a client). Only the handlers installed by ``install_error_handlers`` turn them
into responses ``{"error": {"code": ..., "message": ...}}`` with the status from ``HTTP_STATUS``; the
WebSocket route turns them into error replies or close codes. No handler ever returns a stack trace.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("vad.server")


class ServiceError(Exception):
    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ServiceError):
    code = "bad_request"


class MissingFile(ServiceError):
    code = "missing_file"


class EmptyUpload(ServiceError):
    code = "empty_upload"


class UploadTooLarge(ServiceError):
    code = "too_large"


class UnsupportedMedia(ServiceError):
    code = "unsupported_media_type"


class Undecodable(ServiceError):
    code = "undecodable"


class LimitExceeded(ServiceError):
    """Decodable, but over VAD_MAX_PIXELS / VAD_MAX_FRAMES."""

    code = "limit_exceeded"


class FrameTooSmall(ServiceError):
    code = "frame_too_small"


class InvalidControl(ServiceError):
    """A WebSocket control message that is JSON but not a valid options object."""

    code = "invalid_control"


class Overloaded(ServiceError):
    code = "overloaded"


class NotReady(ServiceError):
    code = "not_ready"


class InferenceFailed(ServiceError):
    """The forward pass itself failed (e.g. out of GPU memory): the server's fault, not the input's."""

    code = "inference_failed"


class UnknownVersion(ServiceError):
    code = "version_not_found"


class VersionRejected(ServiceError):
    """A version that exists but fails verification, loading or the smoke test."""

    code = "version_rejected"


class Unauthorized(ServiceError):
    code = "unauthorized"


class Forbidden(ServiceError):
    code = "forbidden"


class InvalidJobRequest(ServiceError):
    """A training-job submission with bad options, paths or form fields."""

    code = "invalid_request"


class JobNotFound(ServiceError):
    code = "job_not_found"


class EventNotFound(ServiceError):
    code = "not_found"


class JobFinished(ServiceError):
    """Cancelling a training job that has already succeeded, failed or been cancelled."""

    code = "job_finished"


class CamerasDisabled(ServiceError):
    """VAD_CAMERA_URL_ALLOW is empty: no camera may be added."""

    code = "cameras_disabled"


class CameraUrlRefused(ServiceError):
    """A camera URL the allowlist (or the footage root, for files) does not permit."""

    code = "camera_url_refused"


class InvalidCameraUrl(ServiceError):
    """A camera URL that does not parse (no host, bad port, control characters)."""

    code = "invalid_camera_url"


class CameraNotFound(ServiceError):
    code = "camera_not_found"


class CameraExists(ServiceError):
    code = "camera_exists"


class TooManyCameras(ServiceError):
    """Adding a camera beyond VAD_MAX_CAMERAS."""

    code = "too_many_cameras"


class CameraElsewhere(ServiceError):
    """A camera's live picture, asked of a replica that does not run it (several replicas share the cameras)."""

    code = "camera_elsewhere"


class NoCameraFrame(ServiceError):
    """A camera's latest picture, asked for before its first scored frame."""

    code = "no_frame_yet"


HTTP_STATUS: dict[type[ServiceError], int] = {
    BadRequest: 400,
    Unauthorized: 401,
    Forbidden: 403,
    UnknownVersion: 404,
    JobNotFound: 404,
    EventNotFound: 404,
    JobFinished: 409,
    CamerasDisabled: 403,
    CameraUrlRefused: 403,
    InvalidCameraUrl: 422,
    CameraNotFound: 404,
    CameraExists: 409,
    TooManyCameras: 409,
    NoCameraFrame: 404,
    CameraElsewhere: 409,
    InvalidJobRequest: 422,
    UploadTooLarge: 413,
    UnsupportedMedia: 415,
    MissingFile: 422,
    EmptyUpload: 422,
    Undecodable: 422,
    LimitExceeded: 422,
    FrameTooSmall: 422,
    InvalidControl: 422,
    VersionRejected: 422,
    Overloaded: 503,
    NotReady: 503,
    InferenceFailed: 500,
}

STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                405: "method_not_allowed", 409: "conflict", 413: "too_large", 415: "unsupported_media_type",
                422: "invalid_request", 503: "unavailable"}


def status_of(error: ServiceError) -> int:
    for cls in type(error).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]  # type: ignore[index]
    return 500


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def error_response(error: ServiceError, retry_after_s: int) -> JSONResponse:
    headers: dict[str, str] = {}
    if isinstance(error, (Overloaded, NotReady)):
        headers["Retry-After"] = str(retry_after_s)
    if isinstance(error, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(error_body(error.code, error.message), status_of(error), headers=headers)


def install_error_handlers(app: FastAPI, retry_after_s: int) -> None:
    async def on_service_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        return error_response(exc, retry_after_s)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in exc.errors()
        )
        return JSONResponse(error_body("invalid_request", problems or "invalid request"), 422)

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = STATUS_CODES.get(exc.status_code, "http_error")
        return JSONResponse(error_body(code, str(exc.detail)), exc.status_code, headers=exc.headers)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal", "internal server error"), 500)

    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
