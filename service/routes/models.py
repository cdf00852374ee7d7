"""Model versions: list, inspect the active one, activate (verified + smoke-tested hot swap)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from service.deps import AdminAuth, ReadyModel, ServicesDep
from service.schemas import Activation, ActiveModel, ErrorResponse, VersionList

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=VersionList, summary="Published versions with their manifests")
async def list_models(services: ServicesDep) -> VersionList:
    current = services.store.current
    entries = await asyncio.to_thread(services.store.list_versions)
    return VersionList(active=current.version if current else None, versions=entries)


@router.get(
    "/active", response_model=ActiveModel, summary="The version this replica serves, and whether it is the one ACTIVE names",
    responses={503: {"model": ErrorResponse}},
)
async def active_model(model: ReadyModel, services: ServicesDep) -> ActiveModel:
    return ActiveModel(**model.describe(), **services.store.status())


@router.post(
    "/{version}/activate", response_model=Activation, dependencies=[AdminAuth],
    summary="Verify, smoke-test and swap in a version; persisted as the registry's active version",
    responses={
        401: {"model": ErrorResponse}, 403: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
        422: {"model": ErrorResponse, "description": "The version fails verification or the smoke test"},
    },
)
async def activate(version: str, services: ServicesDep) -> Activation:
    model, previous = await services.store.activate(version)
    return Activation(version=model.version, previous=previous, changed=previous != model.version, device=model.device)
