"""The FastAPI app: thin routers over one Service held in app.state, behind the request guard."""

from __future__ import annotations

from fastapi import FastAPI

from server.api.http import adapters, errors, models, openai, tokenize
from server.api.http.guard import RequestGuard
from server.service import Service


def create_app(service: Service, *, lifespan=None) -> FastAPI:
    app = FastAPI(title="loraplex", summary="One vLLM base, many tenants' LoRA adapters.", lifespan=lifespan)
    app.state.service = service
    errors.install(app)
    for r in (openai.router, tokenize.router, models.router, adapters.router):
        app.include_router(r)
    app.add_middleware(RequestGuard, service=service)  # the key and a bounded body, before any route
    return app
