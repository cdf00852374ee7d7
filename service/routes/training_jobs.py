"""Training jobs: submit normal footage for training by a `vad worker`, follow, list and cancel."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from starlette.requests import HTTPConnection

from service.deps import AdminAuth
from service.jobs.service import TrainingService
from service.jobs.store import STATES
from service.jobs.views import public_job
from service.schemas import ErrorResponse

router = APIRouter(prefix="/v1/training-jobs", tags=["training"])


def get_training(connection: HTTPConnection) -> TrainingService:
    return connection.app.state.training


TrainingDep = Annotated[TrainingService, Depends(get_training)]
StateFilter = Annotated[str | None, Query(pattern="^(" + "|".join(STATES) + ")$", description="Only jobs in this state.")]


@router.post(
    "", status_code=202, dependencies=[AdminAuth],
    summary="Queue a training job (multipart: 'files' and/or 'paths' (JSON list), 'options' (JSON object))",
    responses={
        202: {"description": '{"id": "...", "state": "queued"}'},
        **{code: {"model": ErrorResponse} for code in (400, 401, 403, 413, 415, 422)},
    },
)
async def submit_job(request: Request, training: TrainingDep) -> JSONResponse:
    job = await training.submit(request)
    return JSONResponse(
        {"id": job.id, "state": job.state}, status_code=202, headers={"Location": f"/v1/training-jobs/{job.id}"}
    )


@router.get("", summary="Training jobs, newest first")
async def list_jobs(
    training: TrainingDep, state: StateFilter = None, limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    jobs = await training.list(state, limit)
    return {"jobs": [public_job(job, training.settings, detail=False) for job in jobs]}


@router.get("/{job_id}", summary="One training job: state, progress, history, version",
            responses={404: {"model": ErrorResponse}})
async def get_job(job_id: str, training: TrainingDep) -> dict[str, Any]:
    return public_job(await training.get(job_id), training.settings)


@router.delete(
    "/{job_id}", dependencies=[AdminAuth],
    summary="Cancel: a queued job at once (200), a running one at its next epoch (202)",
    responses={**{code: {"model": ErrorResponse} for code in (401, 403, 404, 409)}},
)
async def cancel_job(job_id: str, training: TrainingDep) -> JSONResponse:
    job = await training.cancel(job_id)
    return JSONResponse(public_job(job, training.settings), status_code=200 if job.finished else 202)
