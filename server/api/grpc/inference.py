"""loraplex.v1.Inference: Generate, Chat and ListModels over the service.

Each method authenticates, converts the request, and awaits the service;
service errors propagate to ``errors.ErrorInterceptor``. A stream is written
from inside the handler with ``context.write``, iterating the service's
generator under ``aclosing``: when the client cancels or the deadline passes,
grpc.aio cancels the handler's task, and closing the generator runs its
``finally``, which aborts the request in vLLM.
"""

from __future__ import annotations

import asyncio
from contextlib import aclosing

import grpc

from server.api.grpc import protocol
from server.api.grpc.pb import inference_pb2 as ipb
from server.api.grpc.pb import inference_pb2_grpc
from server.inference.generation import Generation, Usage
from server.service import Service
from server.tenants.store import Principal


INLINE_MESSAGES = 256
"""A conversation this long or shorter is read on the loop (well under a millisecond)."""


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, service: Service):
        self.service = service

    async def Generate(self, request: ipb.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        principal = await self.service.authenticate(protocol.authorization(context),
                                                    charge=protocol.charge(context, self.service))
        gen = self.service.inference.prepare(principal, request.model,
                                             [await protocol.prompt_ids(self.service, request)],
                                             protocol.sampling(request), prompt_field="prompt",
                                             client_ids=bool(request.prompt_token_ids))
        await self._stream(principal, gen, "generate", context)

    async def Chat(self, request: ipb.ChatRequest, context: grpc.aio.ServicerContext) -> None:
        principal = await self.service.authenticate(protocol.authorization(context),
                                                    charge=protocol.charge(context, self.service))
        most = self.service.settings.max_request_values
        if len(request.messages) > INLINE_MESSAGES:
            messages = await asyncio.to_thread(protocol.messages, request, most)
        else:
            messages = protocol.messages(request, most)
        ids = await self.service.prompts.render_chat(messages)
        gen = self.service.inference.prepare(principal, request.model, [ids], protocol.sampling(request),
                                             prompt_field="messages")
        await self._stream(principal, gen, "chat", context)

    async def ListModels(self, request: ipb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> ipb.ListModelsResponse:
        principal = await self.service.authenticate(protocol.authorization(context),
                                                    charge=protocol.charge(context, self.service))
        limit = self.service.settings.max_model_len
        return ipb.ListModelsResponse(models=[protocol.model(c, limit) for c in self.service.list_models(principal)])

    async def _stream(self, principal: Principal, gen: Generation, endpoint: str,
                      context: grpc.aio.ServicerContext) -> None:
        """Write each delta as it comes; usage rides on the message that finishes the last choice."""
        usage, finished = Usage(prompt_tokens=len(gen.prompt_ids)), 0
        inference = self.service.inference
        rid = protocol.request_id(context)
        admission = await inference.admit(principal, gen, protocol="grpc", endpoint=endpoint, request_id=rid)
        try:
            await context.send_initial_metadata((("x-request-id", rid),))
            deltas = inference.generate(principal, gen, admission, protocol="grpc", endpoint=endpoint)
            async with aclosing(deltas):
                async for d in deltas:
                    usage.completion_tokens += len(d.token_ids)
                    finished += d.finish_reason is not None
                    await context.write(protocol.delta(d, usage if finished == gen.sampling.n else None,
                                                       k=gen.sampling.logprobs or 0))
        finally:
            admission.release()  # a handler cancelled before its first delta never ran the stream's own
        if finished < gen.sampling.n:  # the engine ended a choice without a reason: still report usage
            await context.write(ipb.GenerateResponse(usage=protocol.usage(usage)))
