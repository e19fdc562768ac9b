"""loraplex.v1 messages <-> the service's types.

What the HTTP front's pydantic models do for JSON, done for protobuf: read
the caller's key from metadata, check sampling fields against the same bounds
as ``server/api/http/protocol.py`` (an unset optional field takes the HTTP
default), and write service results back as messages. Nothing here decides
anything the service decides.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from server.adapters.registry import AdapterRecord
from server.adapters.staging import StagedUpload
from server.api.grpc.pb import adapters_pb2 as apb
from server.api.grpc.pb import inference_pb2 as ipb
from server.engine.types import MAX_STOP, Completion, Sampling
from server.errors import InvalidArgument, RequestTimeout, require
from server.inference import generation
from server.inference.generation import Usage
from server.service import ModelCard, Service

ROLES = {ipb.ROLE_SYSTEM: "system", ipb.ROLE_USER: "user", ipb.ROLE_ASSISTANT: "assistant",
         ipb.ROLE_DEVELOPER: "developer"}


def authorization(context: grpc.aio.ServicerContext) -> str | None:
    """The ``authorization`` metadata value (``Bearer <key>``), as HTTP reads the header."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value
    return None


FORWARDED = "x-loraplex-forwarded"
"""Metadata a Ray Serve engine replica (server/cluster) adds to a call it forwards to its own
loopback gRPC server: the ingress charged the tenant's rate already. Trusted only with that
replica's secret (``Service.forward_secret``, None everywhere else)."""


def charge(context: grpc.aio.ServicerContext, service: Service) -> bool:
    """Whether this call's rate is still to be charged (False only for a replica's own forward)."""
    secret = service.forward_secret
    return secret is None or (FORWARDED, secret) not in tuple(context.invocation_metadata() or ())


def request_id(context: grpc.aio.ServicerContext) -> str:
    """The ``x-request-id`` metadata value, or a new id."""
    given = next((v for k, v in context.invocation_metadata() or () if k == "x-request-id"), None)
    return generation.request_id(given, "grpc")


# ---------------------------------------------------------------- requests


COMPLETION_MAX_TOKENS = 16
"""Generate's max_tokens when unset: OpenAI's default for completions, as over HTTP. Chat's: the context left."""


def sampling(req: ipb.GenerateRequest | ipb.ChatRequest) -> Sampling:
    """The sampling fields of a Generate or Chat request; :class:`Sampling` checks them, with the
    HTTP API's bounds, and unset ones take the same defaults as over HTTP."""
    def opt(name: str, default=None):
        return getattr(req, name) if req.HasField(name) else default

    default_max = COMPLETION_MAX_TOKENS if isinstance(req, ipb.GenerateRequest) else None
    require("stop", len(req.stop) <= MAX_STOP, f"at most {MAX_STOP} stop strings", f"{len(req.stop):,} of them")
    return Sampling(max_tokens=opt("max_tokens", default_max),
                    temperature=opt("temperature"), top_p=opt("top_p"), n=opt("n", 1), stop=tuple(req.stop),
                    seed=opt("seed"), logprobs=opt("logprobs"), ignore_eos=req.ignore_eos)


async def prompt_ids(service: Service, req: ipb.GenerateRequest) -> list[int]:
    if req.prompt and req.prompt_token_ids:
        raise InvalidArgument("send prompt or prompt_token_ids, not both", field="prompt")
    if req.prompt_token_ids:  # counted before a Python int is made of each (4 MiB hold 4 million)
        n, limit = len(req.prompt_token_ids), service.settings.max_model_len
        if n > limit:
            raise InvalidArgument(f"the prompt is {n:,} tokens; this model's context is {limit} tokens",
                                  field="prompt_token_ids")
        return list(req.prompt_token_ids)
    return await service.prompts.encode(req.prompt, add_special_tokens=True)  # as HTTP completions (vLLM's default)


def messages(req: ipb.ChatRequest, most: int) -> list[dict]:
    """The conversation as chat-template messages; at most ``most`` of them (--max-request-values,
    as over HTTP), each a few Python objects: a worker thread's work past a few thousand."""
    if not req.messages:
        raise InvalidArgument("a chat needs at least one message", field="messages")
    require("messages", len(req.messages) <= most, f"at most {most:,} messages (--max-request-values)",
            f"{len(req.messages):,} of them")
    for i, m in enumerate(req.messages):
        require(f"messages[{i}].role", m.role in ROLES, "one of " + ", ".join(ipb.Role.Name(r) for r in ROLES),
               ipb.Role.Name(m.role) if m.role in ipb.Role.values() else m.role)
    return [{"role": ROLES[m.role], "content": m.content} for m in req.messages]


async def next_message(stream: AsyncIterator[apb.UploadRequest], gap_s: float):
    """The stream's next message, or None at its end; a client silent for ``gap_s`` is refused,
    as an HTTP body that stalls is (--body-timeout-s): it would hold a staging directory forever."""
    try:
        return await asyncio.wait_for(anext(stream, None), gap_s)
    except TimeoutError:
        raise RequestTimeout(f"the upload sent nothing for {gap_s:g} s (--body-timeout-s)", field="body") from None


async def upload_metadata(stream: AsyncIterator[apb.UploadRequest], gap_s: float) -> apb.UploadMetadata:
    """The first message of an Upload/Replace stream, which must be its metadata."""
    first = await next_message(stream, gap_s)
    if first is None or first.WhichOneof("part") != "metadata":
        raise InvalidArgument("the first message of an upload must be its metadata", field="metadata")
    return first.metadata


async def upload_body(stream: AsyncIterator[apb.UploadRequest], staged: StagedUpload, gap_s: float) -> None:
    """The rest of the stream, written into ``staged`` as it arrives (file work in a worker thread)."""
    received = False
    while (msg := await next_message(stream, gap_s)) is not None:
        part = msg.WhichOneof("part")
        if part == "file":
            await asyncio.to_thread(staged.write_file, msg.file.filename, msg.file.data)
        elif part == "archive":
            await asyncio.to_thread(staged.write_archive, msg.archive)
        else:
            raise InvalidArgument("metadata must be sent once, as the first message", field="metadata")
        received = True
    if not received:
        raise InvalidArgument("no adapter files: send adapter_config.json and adapter_model.safetensors as "
                              "'file' chunks, or a .tar.gz as 'archive' chunks", field="files")


def tenant(req) -> str | None:
    return req.tenant if req.HasField("tenant") else None


# ---------------------------------------------------------------- responses


def usage(u: Usage) -> ipb.Usage:
    return ipb.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                     total_tokens=u.total_tokens)


def delta(d: Completion, final_usage: Usage | None = None, *, k: int = 0) -> ipb.GenerateResponse:
    """One choice's delta; each token's ``top`` holds its k most likely alternatives."""
    msg = ipb.GenerateResponse(index=d.index, text=d.text, token_ids=d.token_ids,
                               finish_reason=d.finish_reason or "")
    for lp in d.logprobs or ():
        msg.logprobs.add(token=lp.token, logprob=lp.logprob, top=dict(lp.top[:max(k, 1)]))
    if final_usage is not None:
        msg.usage.CopyFrom(usage(final_usage))
    return msg


def model(card: ModelCard, max_model_len: int) -> ipb.Model:
    return ipb.Model(id=card.id, created=card.created, owned_by=card.owned_by, root=card.root,
                     parent=card.parent or "", max_model_len=max_model_len)


def adapter(service: Service, rec: AdapterRecord) -> apb.Adapter:
    return apb.Adapter(name=rec.name, model=f"{service.served_name}:{rec.name}", tenant=rec.tenant,
                       version=rec.version, digest=f"sha256:{rec.digest}", rank=rec.rank,
                       target_modules=list(rec.target_modules), size_bytes=rec.size_bytes, pinned=rec.pinned,
                       created=int(rec.created_at), residency=service.adapters.residency_of(rec))
