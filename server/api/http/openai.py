"""/v1/completions and /v1/chat/completions: OpenAI's wire format over the inference service.

Each route parses (protocol.py), prepares and admits through the service, then answers: a
JSON body, or an SSE stream whose first delta is in hand before the status line goes out --
so a request that cannot run (429, 503, a schema vLLM cannot compile) gets a real status,
never a 200 and an error inside the stream. Errors after the first byte are reported in-band,
as OpenAI does. Response shapes follow vLLM's (``stop_reason``, ``token_ids`` with
``return_token_ids``, usage with ``stream_options``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import ClientDisconnect

from server.api.http.body import OffLoopRoute
from server.api.http import deps
from server.api.http.errors import body, error_response, status_of
from server.api.http.protocol import ChatCompletionRequest, CompletionRequest
from server.engine.types import Completion
from server.errors import InvalidArgument, LoraplexError
from server.inference import tools as tools_mod
from server.inference.generation import Admission, Generation, Usage, request_id
from server.service import Service
from server.tenants.store import Principal

logger = logging.getLogger(__name__)
router = APIRouter(route_class=OffLoopRoute)


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, separators=(',', ':'))}\n\n"


def _usage(u: Usage, *, details: bool = True) -> dict:
    out = {"prompt_tokens": u.prompt_tokens, "total_tokens": u.total_tokens, "completion_tokens": u.completion_tokens}
    return out | {"prompt_tokens_details": None, "completion_tokens_details": None} if details else out


FINGERPRINT = None


def _fingerprint(service: Service) -> str:
    global FINGERPRINT
    if FINGERPRINT is None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            ours = version("loraplex")
        except PackageNotFoundError:
            ours = "dev"
        FINGERPRINT = f"loraplex-{ours}-vllm-{service.engine_version}"
    return FINGERPRINT


def _completion_logprobs(d: Completion, offset: int, k: int) -> dict | None:
    """OpenAI's completions logprobs: ``top_logprobs`` holds the k most likely tokens and the
    sampled one (k + 1 entries, keyed by text), as vLLM builds it."""
    if d.logprobs is None:
        return None
    tokens = [lp.token for lp in d.logprobs]
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"text_offset": offsets, "token_logprobs": [lp.logprob for lp in d.logprobs], "tokens": tokens,
            "top_logprobs": [dict(lp.top[:k + 1]) for lp in d.logprobs]}


def _chat_logprobs(d: Completion, k: int) -> dict | None:
    if d.logprobs is None:
        return None
    return {"content": [{"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.token.encode(errors="replace")),
                         "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode(errors="replace"))}
                                          for t, v in lp.top[:k]]} for lp in d.logprobs]}


class _Choice:
    """One choice's text, ids, logprobs and end, as deltas arrive."""

    __slots__ = ("text", "ids", "logprobs", "finish", "stop_reason", "started", "offset")

    def __init__(self) -> None:
        self.text, self.ids, self.logprobs = "", [], None
        self.finish = self.stop_reason = None
        self.started = False
        self.offset = 0


class _Run:
    """One admitted request, streamed or collected; the endpoint shapes each delta."""

    chat = False

    def __init__(self, service: Service, principal: Principal, gen: Generation, *, rid: str, endpoint: str,
                 include_usage: bool, continuous_usage: bool, token_ids: bool, echo: list[str] | None):
        self.service, self.principal, self.gen, self.id = service, principal, gen, rid
        self.endpoint, self.include_usage, self.continuous_usage = endpoint, include_usage, continuous_usage
        self.token_ids, self.echo = token_ids, echo
        self.created = int(time.time())
        self.usage = Usage(prompt_tokens=gen.prompt_tokens)
        self.choices = [_Choice() for _ in range(gen.choices)]
        self.admission: Admission | None = None
        self.k = gen.sampling.logprobs or 0

    async def admit(self) -> None:
        self.admission = await self.service.inference.admit(self.principal, self.gen, protocol="http",
                                                            endpoint=self.endpoint, request_id=self.id)

    def release(self) -> None:
        if self.admission is not None:
            self.admission.release()

    def deltas(self) -> AsyncIterator[Completion]:
        return self.service.inference.generate(self.principal, self.gen, self.admission, protocol="http",
                                               endpoint=self.endpoint)

    def _prompt_of(self, index: int) -> int:
        return index // self.gen.sampling.n

    # ------------------------------------------------------------ shapes (per endpoint)

    def chunk_choices(self, d: Completion) -> list[dict]:
        raise NotImplementedError

    def final_choices(self) -> list[dict]:
        raise NotImplementedError

    def response_extra(self) -> dict:
        return {}

    # ------------------------------------------------------------ streaming

    def _chunk(self, choices: list[dict], usage: Usage | None = None, *, last: bool = False) -> dict:
        obj = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.gen.model, "choices": choices}
        if self.include_usage:
            obj["usage"] = _usage(usage, details=False) if (last or self.continuous_usage) and usage else None
        if last or any(c.get("finish_reason") for c in choices):
            obj["system_fingerprint"] = _fingerprint(self.service)
        return obj

    def _absorb(self, d: Completion) -> None:
        c = self.choices[d.index]
        self.usage.completion_tokens += len(d.token_ids)
        c.ids += d.token_ids
        c.finish = d.finish_reason or c.finish
        c.stop_reason = d.stop_reason if d.finish_reason else c.stop_reason

    async def sse(self, first: Completion | None, rest: AsyncIterator[Completion]) -> AsyncIterator[str]:
        # A client that left closes this stream: ``rest`` (the engine's stream) is closed with it,
        # so its requests are aborted before the front releases the admission.
        async with contextlib.aclosing(rest), contextlib.aclosing(self._sse(first, rest)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def _sse(self, first: Completion | None, rest: AsyncIterator[Completion]) -> AsyncIterator[str]:
        try:
            if first is not None:
                self._absorb(first)
                for k, choice in enumerate(self.chunk_choices(first)):
                    yield _sse(self._chunk([choice], self.usage) | (self.opening() if k == 0 else {}))
                async for d in rest:
                    self._absorb(d)
                    for choice in self.chunk_choices(d):
                        yield _sse(self._chunk([choice], self.usage))
            for choice in self.closing_choices():
                yield _sse(self._chunk([choice], self.usage))
            if self.include_usage:
                yield _sse(self._chunk([], self.usage, last=True))
        except LoraplexError as exc:  # after the 200 went out: report in-band, as OpenAI does
            yield _sse(body(exc.message, exc.type, exc.field, exc.code) | {"status": status_of(exc)})
        yield _sse("[DONE]")

    def opening(self) -> dict:
        """Top-level fields of a stream's first chunk."""
        return {}

    def closing_choices(self) -> list[dict]:
        """Chunks owed at the end of a stream (buffered tool calls)."""
        return []

    # ------------------------------------------------------------ collected

    async def collect(self) -> dict:
        async with contextlib.aclosing(self.deltas()) as deltas:
            async for d in deltas:
                self._absorb(d)
                self.collect_delta(d)
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.gen.model, "choices": self.final_choices(),
                "service_tier": None, "system_fingerprint": _fingerprint(self.service),
                "usage": _usage(self.usage)} | self.response_extra() | {"kv_transfer_params": None,
                                                                         "ec_transfer_params": None, "metrics": None}

    def collect_delta(self, d: Completion) -> None:
        c = self.choices[d.index]
        c.text += d.text
        if d.logprobs is not None:
            c.logprobs = (c.logprobs or []) + d.logprobs


class _CompletionRun(_Run):
    def chunk_choices(self, d: Completion) -> list[dict]:
        c = self.choices[d.index]
        text = d.text
        if not text and not d.finish_reason and d.logprobs is None and not self.token_ids and \
                (c.started or self.echo is None):
            return []  # a token that decodes to nothing yet (half a UTF-8 character) waits, as in vLLM
        if not c.started:
            c.started = True
            if self.echo is not None:
                text = self.echo[self._prompt_of(d.index)] + text
        choice = {"index": d.index, "text": text, "logprobs": _completion_logprobs(d, c.offset, self.k),
                  "finish_reason": d.finish_reason, "stop_reason": d.stop_reason if d.finish_reason else None}
        c.offset += len(text)
        first = len(c.ids) == len(d.token_ids)
        choice["prompt_token_ids"] = self.gen.prompts[self._prompt_of(d.index)] if self.token_ids and first else None
        choice["token_ids"] = d.token_ids if self.token_ids else None
        return [choice]

    def final_choices(self) -> list[dict]:
        out = []
        for i, c in enumerate(self.choices):
            text = (self.echo[self._prompt_of(i)] if self.echo is not None else "") + c.text
            lp = None
            if c.logprobs is not None:
                lp = _completion_logprobs(Completion(i, c.text, c.ids, logprobs=c.logprobs), 0, self.k)
            choice = {"index": i, "text": text, "logprobs": lp, "finish_reason": c.finish,
                      "stop_reason": c.stop_reason, "prompt_logprobs": None, "routed_experts": None}
            choice |= {"token_ids": c.ids, "prompt_token_ids": self.gen.prompts[self._prompt_of(i)]} \
                if self.token_ids else {"token_ids": None, "prompt_token_ids": None}
            out.append(choice)
        return out


class _ChatRun(_Run):
    chat = True

    def __init__(self, *args, plan: tools_mod.ToolPlan, parser=None, **kw):
        super().__init__(*args, **kw)
        self.plan, self.parser = plan, parser
        self.texts = ["" for _ in self.choices]  # what the model wrote so far, per choice (for tool parsing)
        self.streamers = {}

    def chunk_choices(self, d: Completion) -> list[dict]:
        c = self.choices[d.index]
        out = []
        if not c.started:
            c.started = True
            opening = {"role": "assistant", "content": self.echo[0] if self.echo else ""}
            if self.plan.mode == "named":
                opening = {"role": "assistant", "content": None, "tool_calls": [tools_mod.ToolCall(
                    self.plan.function, "").wire(0)]}
            out.append({"index": d.index, "delta": opening, "logprobs": None, "finish_reason": None})
        before = self.texts[d.index]
        self.texts[d.index] = before + d.text
        delta: dict | None
        if self.plan.mode == "named":
            delta = {"tool_calls": [{"index": 0, "function": {"arguments": d.text}}]} if d.text else None
        elif self.plan.mode == "required":
            delta = None  # the JSON array parses only whole: sent at the end
        elif self.plan.mode == "auto" and self.parser is not None:
            delta = self._streamer(d.index).delta(before, self.texts[d.index], d.text, d.token_ids)
        else:  # a token that decodes to nothing yet (half a UTF-8 character) waits, as in vLLM
            delta = {"content": d.text} if d.text or d.logprobs or self.token_ids else None
        finish = self._finish(c) if d.finish_reason else None
        if delta is not None or finish is not None:
            choice = {"index": d.index, "delta": delta or {}, "logprobs": _chat_logprobs(d, self.k),
                      "finish_reason": finish, "stop_reason": c.stop_reason if finish else None,
                      "token_ids": d.token_ids if self.token_ids else None}
            if finish is not None and self.plan.mode == "required":
                calls = self.plan.parse(self.texts[d.index])
                choice["delta"] = {"tool_calls": [call.wire(k) for k, call in enumerate(calls)]} if calls else {}
            out.append(choice)
        return out

    def opening(self) -> dict:
        return {"prompt_token_ids": self.gen.prompt_ids if self.token_ids else None, "prompt_text": None}

    def _streamer(self, index: int):
        if index not in self.streamers:
            self.streamers[index] = self.parser.streamer()
        return self.streamers[index]

    def _finish(self, c: _Choice) -> str | None:
        if c.finish is None:
            return None
        if self.plan.mode == "required" and c.finish == "stop":
            return "tool_calls"
        if self.plan.mode == "auto" and self.parser is not None:
            i = self.choices.index(c)
            if self.streamers.get(i) is not None and self.streamers[i].called:
                return "tool_calls"
        return c.finish

    def final_choices(self) -> list[dict]:
        out = []
        for i, c in enumerate(self.choices):
            content, calls, finish = c.text, [], c.finish
            if self.plan.constrained:
                calls, content = self.plan.parse(c.text), ""
                if self.plan.mode == "required" and finish == "stop":
                    finish = "tool_calls"
            elif self.plan.mode == "auto" and self.parser is not None:
                found, content = self.parser.extract(c.text)
                calls = [tools_mod.ToolCall(f["name"], f["arguments"], f["id"]) for f in found]
                if calls:
                    finish = "tool_calls"
            if self.echo and content is not None:
                content = self.echo[0] + content
            message = {"role": "assistant", "content": content, "refusal": None, "annotations": None, "audio": None,
                       "function_call": None, "tool_calls": [call.wire() for call in calls], "reasoning": None}
            lp = _chat_logprobs(Completion(i, c.text, c.ids, logprobs=c.logprobs), self.k) \
                if c.logprobs is not None else None
            out.append({"index": i, "message": message, "logprobs": lp, "finish_reason": finish,
                        "stop_reason": c.stop_reason, "token_ids": c.ids if self.token_ids else None,
                        "routed_experts": None})
        return out

    def response_extra(self) -> dict:
        return {"prompt_logprobs": None, "prompt_token_ids": self.gen.prompt_ids if self.token_ids else None,
                "prompt_text": None}


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
    headers = {"X-Request-Id": run.id}
    await run.admit()
    if not stream:
        try:
            return JSONResponse(await run.collect(), headers=headers)
        except LoraplexError as exc:
            response = error_response(exc)
            response.headers.update(headers)
            return response
        finally:
            run.release()
    deltas = run.deltas()
    try:
        first = await anext(deltas, None)  # before the status line: an error here is a real status
    except BaseException:
        await deltas.aclose()
        run.release()
        raise

    async def rest():
        async with contextlib.aclosing(deltas):
            async for d in deltas:
                yield d

    return _ClosingStreamingResponse(run.sse(first, rest()), on_close=run.release, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})


def _rid(request: Request, body_id: str | None, prefix: str) -> str:
    return request_id(request.headers.get("x-request-id") or body_id, prefix)


def _log(rid: str, principal: Principal, req) -> None:
    if req.user or req.safety_identifier:
        logger.info("request %s from tenant %s for end user %r", rid, principal.tenant,
                    req.user or req.safety_identifier)


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request, principal: Principal = Depends(deps.principal),
                      service: Service = Depends(deps.service)):
    rid = _rid(request, req.request_id, "cmpl")
    _log(rid, principal, req)
    prompts, are_ids = req.prompts()
    service.inference.check_prompt_count(principal, len(prompts))
    ids = prompts if are_ids else [await service.prompts.encode(p, add_special_tokens=req.add_special_tokens)
                                   for p in prompts]
    gen = service.inference.prepare(principal, req.model, ids, req.sampling(max_tokens=req.max_tokens,
                                                                           logprobs=req.logprobs),
                                    prompt_field="prompt", client_ids=are_ids, truncate=req.truncate_prompt_tokens,
                                    cache_salt=req.cache_salt)
    echo = ([service.prompts.decode(p) for p in gen.prompts] if are_ids else prompts) if req.echo else None
    options = req.stream_options
    run = _CompletionRun(service, principal, gen, rid=rid, endpoint="completions",
                         include_usage=bool(req.stream and options and options.include_usage),
                         continuous_usage=bool(options and options.continuous_usage_stats),
                         token_ids=bool(req.return_token_ids), echo=echo)
    return await _respond(run, req.stream)


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request,
                           principal: Principal = Depends(deps.principal), service: Service = Depends(deps.service)):
    rid = _rid(request, req.request_id, "chatcmpl")
    _log(rid, principal, req)
    parser = service.tool_parser
    plan = tools_mod.plan(req.tool_dicts(), req.choice(), req.parallel_tool_calls, auto_available=parser is not None)
    messages = [m.for_template() for m in req.messages]
    ids = await service.prompts.render_chat(
        messages, tools=plan.tools, add_generation_prompt=req.add_generation_prompt,
        continue_final_message=req.continue_final_message, documents=req.documents,
        template_kwargs=req.chat_template_kwargs, add_special_tokens=req.add_special_tokens)
    sampling = req.sampling(max_tokens=req.output_tokens(),
                            logprobs=(req.top_logprobs or 0) if req.logprobs else None)
    if plan.constrained and sampling.structured is not None:
        raise InvalidArgument("tool_choice required or a named function constrains the output to the tool call; "
                              "it cannot be combined with response_format or structured_outputs",
                              field="tool_choice")
    gen = service.inference.prepare(principal, req.model, [ids], _with_tools(sampling, plan),
                                    prompt_field="messages", truncate=req.truncate_prompt_tokens,
                                    cache_salt=req.cache_salt)
    last = messages[-1]
    echo = [last["content"] or ""] if req.echo and last["role"] == "assistant" else None
    options = req.stream_options
    run = _ChatRun(service, principal, gen, rid=rid, endpoint="chat",
                   include_usage=bool(req.stream and options and options.include_usage),
                   continuous_usage=bool(options and options.continuous_usage_stats),
                   token_ids=bool(req.return_token_ids), echo=echo, plan=plan,
                   parser=parser.for_request(plan.tools) if parser is not None and plan.mode == "auto" else None)
    return await _respond(run, req.stream)


def _with_tools(sampling, plan: tools_mod.ToolPlan):
    """``required`` and a named function constrain the output to the tool-call schema (as vLLM's
    tool parsers do), in place of any response_format."""
    import dataclasses

    structured = plan.structured()
    if structured is None:
        return sampling
    return dataclasses.replace(sampling, structured=structured)
