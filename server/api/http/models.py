"""/v1/models, /health, /ready and /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Header
from fastapi.responses import JSONResponse

from server.api.http.body import OffLoopRoute
from server.api.http import deps
from server.api.http.metrics import exposition
from server.errors import PermissionDenied
from server.service import Service
from server.tenants.store import Principal

router = APIRouter(route_class=OffLoopRoute)


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
    """Readiness: 503 while the engine is not serving, and from the first moment of a drain."""
    if service.draining:
        return JSONResponse({"status": "draining", "engine": "vllm"}, status_code=503)
    if not service.engine.ready:
        return JSONResponse({"status": "starting", "engine": "not ready"}, status_code=503)
    return {"status": "ready", "model": service.served_name, "engine": "vllm"}


@router.get("/metrics")
async def metrics(authorization: str | None = Header(None), service: Service = Depends(deps.service)):
    """Prometheus text format. Its labels name tenants and adapters, so here it needs an admin
    key; --metrics-port serves it without one on a listener of its own (server/api/http/metrics.py)."""
    if not service.auth.authenticate(authorization).is_admin:
        raise PermissionDenied("/metrics names every tenant and adapter, so it needs an admin key; an operator can "
                               "also serve it without one on --metrics-port")
    return await exposition()
