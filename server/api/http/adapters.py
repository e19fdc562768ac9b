"""Adapter management: upload, list, get, replace, delete, pin -- and vLLM's load/unload endpoints.

Uploads take the raw request: the key is checked first (``deps.principal``), then the
multipart body streams into a staging directory (``multipart.receive``).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse

from server.adapters.registry import AdapterRecord
from server.api.http.body import OffLoopRoute
from server.api.http import deps, multipart
from server.api.http.protocol import LoadLoraRequest, UnloadLoraRequest
from server.errors import InvalidArgument
from server.service import Service
from server.tenants.store import Principal

router = APIRouter(route_class=OffLoopRoute)

# The upload routes read the raw request (streamed into staging), so FastAPI cannot derive their
# body from a signature; this is it, for /openapi.json and the clients and fuzzers that read it.
_UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object",
    "properties": {
        "name": {"type": "string", "description": "The adapter's name (POST only; PUT takes it from the path)."},
        "tenant": {"type": "string", "description": "Another tenant's namespace (admins only)."},
        "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                  "description": "adapter_config.json, adapter_model.safetensors, optionally loraplex.json."},
        "archive": {"type": "string", "format": "binary", "description": "Or: one .tar.gz of those files."},
    },
}}}}}


def card(service: Service, rec: AdapterRecord) -> dict:
    return {"id": rec.name, "object": "adapter", "model": f"{service.served_name}:{rec.name}", "tenant": rec.tenant,
            "version": rec.version, "digest": f"sha256:{rec.digest}", "rank": rec.rank,
            "target_modules": list(rec.target_modules), "size_bytes": rec.size_bytes, "pinned": rec.pinned,
            "created": int(rec.created_at), "residency": service.adapters.residency_of(rec)}


async def _upload(request: Request, principal: Principal, service: Service, *, name: str | None,
                  tenant: str | None) -> AdapterRecord:
    adapters = service.adapters
    replace = name is not None

    def check(n: str, t: str | None) -> None:
        adapters.check_upload(principal, n, t, replace=replace)

    async with adapters.staging(principal) as staged:
        fields = await multipart.receive(request, staged, before_files=multipart.before_files(check, name=name,
                                                                                             tenant=tenant))
        if name is None and "name" not in fields:
            raise InvalidArgument("the form has no 'name' field: the adapter's name", field="name")
        return await adapters.add(principal, name or fields["name"], staged, tenant=tenant or fields.get("tenant"),
                                  replace=replace)


@router.post("/v1/adapters", status_code=201, openapi_extra=_UPLOAD_BODY)
async def upload(request: Request, tenant: str | None = None, principal: Principal = Depends(deps.principal),
                 service: Service = Depends(deps.service)):
    return card(service, await _upload(request, principal, service, name=None, tenant=tenant))


@router.get("/v1/adapters")
async def list_adapters(tenant: str | None = None, principal: Principal = Depends(deps.principal),
                        service: Service = Depends(deps.service)):
    return {"object": "list", "data": [card(service, r) for r in service.adapters.list_adapters(principal, tenant)]}


@router.get("/v1/adapters/{name}")
async def get_adapter(name: str, tenant: str | None = None, principal: Principal = Depends(deps.principal),
                      service: Service = Depends(deps.service)):
    return card(service, service.adapters.get_adapter(principal, name, tenant))


@router.put("/v1/adapters/{name}", openapi_extra=_UPLOAD_BODY)
async def replace(name: str, request: Request, tenant: str | None = None,
                  principal: Principal = Depends(deps.principal), service: Service = Depends(deps.service)):
    return card(service, await _upload(request, principal, service, name=name, tenant=tenant))


@router.delete("/v1/adapters/{name}")
async def delete(name: str, tenant: str | None = None, principal: Principal = Depends(deps.principal),
                 service: Service = Depends(deps.service)):
    removed = await service.adapters.delete(principal, name, tenant)
    return {"id": name, "object": "adapter", "deleted": True, "versions": len(removed)}


@router.post("/v1/adapters/{name}/pin")
async def pin(name: str, tenant: str | None = None, principal: Principal = Depends(deps.principal),
              service: Service = Depends(deps.service)):
    return card(service, await service.adapters.set_pinned(principal, name, True, tenant))


@router.post("/v1/adapters/{name}/unpin")
async def unpin(name: str, tenant: str | None = None, principal: Principal = Depends(deps.principal),
                service: Service = Depends(deps.service)):
    return card(service, await service.adapters.set_pinned(principal, name, False, tenant))


# vLLM's own endpoints, so its tooling works unchanged (admins only, paths under --lora-roots).
@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(req: LoadLoraRequest, principal: Principal = Depends(deps.principal),
                            service: Service = Depends(deps.service)):
    await service.adapters.load_from_path(principal, req.lora_name, req.lora_path, req.tenant,
                                          replace=req.load_inplace)
    return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(req: UnloadLoraRequest, principal: Principal = Depends(deps.principal),
                              service: Service = Depends(deps.service)):
    await service.adapters.delete(principal, req.lora_name, req.tenant)
    return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")
