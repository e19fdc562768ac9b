"""/tokenize, /detokenize and /version, in vLLM's request and response shapes.

Tenant-aware: ``model`` is resolved in the caller's namespace (another tenant's adapter is a 404,
as everywhere), and an adapter's tokenizer is the base's.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter, Depends

from server.api.http.body import OffLoopRoute
from server.api.http import deps
from server.api.http.protocol import DetokenizeRequest, TokenizeRequest
from server.service import Service
from server.tenants.store import Principal

router = APIRouter(route_class=OffLoopRoute)


@router.post("/tokenize")
async def tokenize(req: TokenizeRequest, principal: Principal = Depends(deps.principal),
                   service: Service = Depends(deps.service)):
    if req.model is not None:
        service.resolve(principal, req.model)
    prompts = service.prompts
    if req.messages is not None:
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        ids = await prompts.render_chat([m.for_template() for m in req.messages], tools=tools,
                                        add_generation_prompt=req.add_generation_prompt,
                                        continue_final_message=req.continue_final_message,
                                        template_kwargs=req.chat_template_kwargs,
                                        add_special_tokens=bool(req.add_special_tokens))
    else:
        ids = await prompts.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False)
    strs = prompts.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
    return {"count": len(ids), "max_model_len": service.settings.max_model_len, "tokens": ids, "token_strs": strs}


@router.post("/detokenize")
async def detokenize(req: DetokenizeRequest, principal: Principal = Depends(deps.principal),
                     service: Service = Depends(deps.service)):
    if req.model is not None:
        service.resolve(principal, req.model)
    return {"prompt": await service.prompts.detokenize(req.tokens)}


@router.get("/version")
async def server_version(service: Service = Depends(deps.service)):
    """vLLM's version (what vLLM's /version says), and loraplex's."""
    return {"version": service.engine_version, "loraplex": _version("loraplex")}


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None
