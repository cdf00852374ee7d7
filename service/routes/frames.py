"""POST /v1/frames: one image, scored alone (no predecessor, so its motion channel is empty)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from model.results import frame_body
from service.deps import IncludeMaps, ReadyModel, ServicesDep
from service.pipeline import SOURCE_FRAME, BatchedStream, decode_frame
from service.responses import json_response
from service.schemas import ErrorResponse, FrameResponse
from service.uploads import receive_bytes

router = APIRouter(tags=["scoring"])


@router.post(
    "/v1/frames", summary="Score one PNG/JPEG image",
    response_model=FrameResponse, response_class=Response,
    responses={code: {"model": ErrorResponse} for code in (400, 413, 415, 422, 503)},
)
async def score_frame(request: Request, services: ServicesDep, model: ReadyModel, maps: IncludeMaps = True) -> Response:
    settings = services.settings
    data = await receive_bytes(request, settings.max_image_bytes)
    gray = await decode_frame(data, settings.max_pixels, model.patch_size)
    with services.batcher.admit(SOURCE_FRAME):
        scorer = BatchedStream(model, services.batcher, services.metrics, SOURCE_FRAME)
        (result,) = await scorer.score(gray[None])
    return await json_response(frame_body(model.version, model.threshold, result, maps))
