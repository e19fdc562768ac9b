"""/v1/models, /health, /ready and /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.api.http import deps
from server.metrics import EXPOSITION
from server.service import Service
from server.tenants.store import Principal

router = APIRouter()


@router.get("/v1/models")
async def list_models(principal: Principal = Depends(deps.principal), service: Service = Depends(deps.service)):
    return {"object": "list", "data": [
        {"id": c.id, "object": "model", "created": c.created, "owned_by": c.owned_by, "root": c.root,
         "parent": c.parent, "max_model_len": service.settings.max_model_len}
        for c in service.list_models(principal)]}


@router.get("/health")
async def health(service: Service = Depends(deps.service)):
    """Liveness: 503 while the engine is dead or being restarted (see server/runtime.py)."""
    if not service.engine.ready:
        return JSONResponse({"status": "engine_dead", "engine": "restarting"}, status_code=503)
    return {"status": "ok"}


@router.get("/ready")
async def ready(service: Service = Depends(deps.service)):
    if not service.engine.ready:
        return JSONResponse({"status": "starting", "engine": "not ready"}, status_code=503)
    return {"status": "ready", "model": service.served_name, "engine": "vllm"}


@router.get("/metrics")
async def metrics():
    return Response(generate_latest(EXPOSITION), media_type=CONTENT_TYPE_LATEST)
