"""Adapter management: upload, list, get, replace, delete, pin -- and vLLM's load/unload endpoints."""

from __future__ import annotations

from fastapi import APIRouter, Depends, File, Form, UploadFile
from fastapi.responses import PlainTextResponse

from server.adapters.registry import AdapterRecord
from server.adapters.upload import UploadFile as Upload
from server.api.http import deps
from server.api.http.protocol import LoadLoraRequest, UnloadLoraRequest
from server.errors import InvalidArgument
from server.service import Service
from server.tenants.store import Principal

router = APIRouter()


def card(service: Service, rec: AdapterRecord) -> dict:
    return {"id": rec.name, "object": "adapter", "model": f"{service.served_name}:{rec.name}", "tenant": rec.tenant,
            "version": rec.version, "digest": f"sha256:{rec.digest}", "rank": rec.rank,
            "target_modules": list(rec.target_modules), "size_bytes": rec.size_bytes, "pinned": rec.pinned,
            "created": int(rec.created_at), "residency": service.residency_of(rec)}


async def _read(files: list[UploadFile] | None, archive: UploadFile | None) -> dict:
    if archive is not None and files:
        raise InvalidArgument("send either files or archive, not both", field="archive")
    if archive is not None:
        return {"tarball": await archive.read()}
    if not files:
        raise InvalidArgument("no adapter files: send adapter_config.json and adapter_model.safetensors as "
                              "'files', or a .tar.gz as 'archive'", field="files")
    return {"files": [Upload(f.filename or "", await f.read()) for f in files]}


@router.post("/v1/adapters", status_code=201)
async def upload(name: str = Form(...), tenant: str | None = Form(None), files: list[UploadFile] | None = File(None),
                 archive: UploadFile | None = File(None), principal: Principal = Depends(deps.principal),
                 service: Service = Depends(deps.service)):
    rec = await service.upload(principal, name, tenant=tenant, **await _read(files, archive))
    return card(service, rec)


@router.get("/v1/adapters")
async def list_adapters(tenant: str | None = None, principal: Principal = Depends(deps.principal),
                        service: Service = Depends(deps.service)):
    return {"object": "list", "data": [card(service, r) for r in service.list_adapters(principal, tenant)]}


@router.get("/v1/adapters/{name}")
async def get_adapter(name: str, tenant: str | None = None, principal: Principal = Depends(deps.principal),
                      service: Service = Depends(deps.service)):
    return card(service, service.get_adapter(principal, name, tenant))


@router.put("/v1/adapters/{name}")
async def replace(name: str, tenant: str | None = Form(None), files: list[UploadFile] | None = File(None),
                  archive: UploadFile | None = File(None), principal: Principal = Depends(deps.principal),
                  service: Service = Depends(deps.service)):
    rec = await service.upload(principal, name, tenant=tenant, replace=True, **await _read(files, archive))
    return card(service, rec)


@router.delete("/v1/adapters/{name}")
async def delete(name: str, tenant: str | None = None, principal: Principal = Depends(deps.principal),
                 service: Service = Depends(deps.service)):
    removed = await service.delete_adapter(principal, name, tenant)
    return {"id": name, "object": "adapter", "deleted": True, "versions": len(removed)}


@router.post("/v1/adapters/{name}/pin")
async def pin(name: str, tenant: str | None = None, principal: Principal = Depends(deps.principal),
              service: Service = Depends(deps.service)):
    return card(service, await service.set_pinned(principal, name, True, tenant))


@router.post("/v1/adapters/{name}/unpin")
async def unpin(name: str, tenant: str | None = None, principal: Principal = Depends(deps.principal),
                service: Service = Depends(deps.service)):
    return card(service, await service.set_pinned(principal, name, False, tenant))


# vLLM's own endpoints, so its tooling works unchanged (admins only, paths under --lora-roots).
@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(req: LoadLoraRequest, principal: Principal = Depends(deps.principal),
                            service: Service = Depends(deps.service)):
    await service.load_from_path(principal, req.lora_name, req.lora_path, req.tenant)
    return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(req: UnloadLoraRequest, principal: Principal = Depends(deps.principal),
                              service: Service = Depends(deps.service)):
    await service.delete_adapter(principal, req.lora_name, req.tenant)
    return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")
