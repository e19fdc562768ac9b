"""/v1/completions and /v1/chat/completions: OpenAI wire format over the service."""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

import anyio
from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import ClientDisconnect

from server.api.http import deps
from server.api.http.errors import body, error_response, status_of
from server.api.http.protocol import ChatCompletionRequest, CompletionRequest
from server.engine.types import Completion
from server.errors import LoraplexError
from server.service import Admission, Generation, Service, Usage
from server.tenants.store import Principal

logger = logging.getLogger(__name__)
router = APIRouter()


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, separators=(',', ':'))}\n\n"


def _usage(u: Usage) -> dict:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens}


def _completion_logprobs(d: Completion, offset: int) -> dict | None:
    if d.logprobs is None:
        return None
    tokens = [lp.token for lp in d.logprobs]
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in d.logprobs],
            "top_logprobs": [lp.top for lp in d.logprobs], "text_offset": offsets}


def _chat_logprobs(d: Completion) -> dict | None:
    if d.logprobs is None:
        return None
    return {"content": [{"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.token.encode()),
                         "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())}
                                          for t, v in lp.top.items()]} for lp in d.logprobs]}


class _Run:
    """Shared by both endpoints: one generation, streamed or collected."""

    def __init__(self, service: Service, principal, gen: Generation, *, endpoint: str, chat: bool,
                 include_usage: bool, token_ids: bool = False):
        self.service, self.principal, self.gen = service, principal, gen
        self.endpoint, self.chat, self.include_usage, self.token_ids = endpoint, chat, include_usage, token_ids
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.usage = Usage(prompt_tokens=len(gen.prompt_ids))
        self.admission: Admission | None = None

    async def admit(self) -> None:
        """Before any response byte: a request that cannot run gets its own status, even a stream."""
        self.admission = await self.service.admit(self.principal, self.gen, protocol="http", endpoint=self.endpoint)

    def release(self) -> None:
        if self.admission is not None:
            self.admission.release()

    def _stream(self) -> AsyncIterator[Completion]:
        return self.service.generate(self.principal, self.gen, self.admission, protocol="http",
                                     endpoint=self.endpoint)

    def _chunk(self, choices: list[dict], usage: Usage | None = None) -> dict:
        obj = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.gen.model, "choices": choices}
        if self.include_usage:
            obj["usage"] = _usage(usage) if usage else None
        return obj

    def _delta_choice(self, d: Completion, offsets: list[int], started: set[int]) -> dict:
        if self.chat:
            delta = {"content": d.text}
            if d.index not in started:
                started.add(d.index)
                delta = {"role": "assistant", **delta}
            choice = {"index": d.index, "delta": delta, "logprobs": _chat_logprobs(d), "finish_reason": d.finish_reason}
        else:
            choice = {"index": d.index, "text": d.text, "logprobs": _completion_logprobs(d, offsets[d.index]),
                      "finish_reason": d.finish_reason}
            offsets[d.index] += len(d.text)
        if self.token_ids:
            choice["token_ids"] = d.token_ids
        return choice

    async def sse(self) -> AsyncIterator[str]:
        offsets = [0] * self.gen.sampling.n
        started: set[int] = set()
        try:
            # aclosing: when the client goes away the response closes this generator, and this
            # closes the service's, whose finally aborts the vLLM request and releases the adapter.
            async with contextlib.aclosing(self._stream()) as deltas:
                async for d in deltas:
                    self.usage.completion_tokens += len(d.token_ids)
                    yield _sse(self._chunk([self._delta_choice(d, offsets, started)]))
            if self.include_usage:
                yield _sse(self._chunk([], self.usage))
        except LoraplexError as exc:  # after the 200 went out: report in-band, as OpenAI does
            yield _sse(body(exc.message, exc.type, exc.field, exc.code) | {"status": status_of(exc)})
        yield _sse("[DONE]")

    def _collect(self, d: Completion, texts: list[str], finish: list, lps: list, ids: list[list[int]]) -> None:
        self.usage.completion_tokens += len(d.token_ids)
        ids[d.index] += d.token_ids
        if d.logprobs is not None:
            if self.chat:
                lps[d.index] = lps[d.index] or {"content": []}
                lps[d.index]["content"] += _chat_logprobs(d)["content"]
            else:
                part = _completion_logprobs(d, len(texts[d.index]))
                if lps[d.index] is None:
                    lps[d.index] = part
                else:
                    for k in part:
                        lps[d.index][k] += part[k]
        texts[d.index] += d.text
        finish[d.index] = d.finish_reason or finish[d.index]

    async def collect(self) -> dict:
        n = self.gen.sampling.n
        texts, finish, lps, ids = [""] * n, [None] * n, [None] * n, [[] for _ in range(n)]
        async with contextlib.aclosing(self._stream()) as deltas:
            async for d in deltas:
                self._collect(d, texts, finish, lps, ids)
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": lps[i],
                        "finish_reason": finish[i]} for i in range(n)]
        else:
            choices = [{"index": i, "text": texts[i], "logprobs": lps[i], "finish_reason": finish[i]}
                       for i in range(n)]
        if self.token_ids:
            for c, t in zip(choices, ids):
                c["token_ids"] = t
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.gen.model, "choices": choices, "usage": _usage(self.usage)}


class _ClosingStreamingResponse(StreamingResponse):
    """Starlette stops iterating a stream whose client went away (a failed send raises
    ``ClientDisconnect``) without closing it, so the generator's ``finally`` -- which aborts the
    vLLM request and releases the adapter -- would wait for garbage collection, indefinitely
    while anything refers to it. This closes it at once, and releases the admission even if the
    stream never started."""

    def __init__(self, content, *, on_close, **kw):
        super().__init__(content, **kw)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except ClientDisconnect:
            logger.debug("client went away during a stream")
        finally:
            with anyio.CancelScope(shield=True):  # cleanup must run even in a cancelled scope
                await self.body_iterator.aclose()
            self._on_close()


async def _respond(run: _Run, stream: bool):
    await run.admit()
    if stream:
        return _ClosingStreamingResponse(run.sse(), on_close=run.release, media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        return JSONResponse(await run.collect())
    except LoraplexError as exc:
        return error_response(exc)
    finally:
        run.release()


@router.post("/v1/completions")
async def completions(req: CompletionRequest, principal: Principal = Depends(deps.principal),
                      service: Service = Depends(deps.service)):
    ids = list(req.prompt) if isinstance(req.prompt, list) else await service.encode(req.prompt)
    gen = service.prepare(principal, req.model, ids, req.sampling(req.logprobs), prompt_field="prompt",
                          client_ids=isinstance(req.prompt, list))
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return await _respond(_Run(service, principal, gen, endpoint="completions", chat=False,
                               include_usage=include_usage, token_ids=req.return_token_ids), req.stream)


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, principal: Principal = Depends(deps.principal),
                           service: Service = Depends(deps.service)):
    ids = await service.render_chat([m.model_dump() for m in req.messages])
    gen = service.prepare(principal, req.model, ids, req.sampling(), prompt_field="messages")
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return await _respond(_Run(service, principal, gen, endpoint="chat", chat=True,
                               include_usage=include_usage, token_ids=req.return_token_ids), req.stream)
