"""JSON bodies parsed and validated without holding the event loop.

FastAPI parses a body with ``json.loads`` and validates it with pydantic, both on the event loop.
For a body near ``--max-request-bytes`` (8 MiB) that is 0.1-1.5 s during which no other tenant's
request moves: a million token ids, or 200,000 one-word chat messages. A worker thread alone does
not help: ``json.loads`` is one C call that holds the GIL from the first byte to the last.

:class:`OffLoopRoute` gives a body over :data:`INLINE_BYTES` to a body-reading thread (its own pool). The thread
counts the body's JSON values (numbers, strings, arrays, objects, keys) against
``--max-request-values`` and its depth against :data:`MAX_DEPTH`: parsing, validating and freeing
each value is work done holding the GIL, some of it in single C calls (pydantic validating a list
of ints), so their number bounds what one request can take from the others. Then it parses the body in 64 KiB
pieces (ijson's push parser; the GIL goes back to the loop between pieces) and validates it with the
route's own body field, as FastAPI would, errors included. FastAPI then finds the model already made
and only checks its type. Smaller bodies take FastAPI's own path (the work is short and a thread hop
would cost more than it saves), after a depth check if they hold enough brackets to need one. The
request models do their part: every list stops at its first bad item, and an object with far more
keys than its model has fields is one error (``protocol.py``).

The Ray ingress reads only ``model`` from a body, with :func:`top_level_string`, to route it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import operator
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ijson
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from ijson.utils import sendable_list

from server.errors import InvalidArgument

INLINE_BYTES = 64 << 10
"""Bodies up to this size are parsed on the loop: at most a few milliseconds of work."""

PIECE_BYTES = 64 << 10
"""What the parser takes in one C call: about a millisecond, then the loop may run."""


MAX_DEPTH = 256
"""How deep a request body's arrays and objects may nest. No request needs more; and a parser's
cost grows with the square of depth (each level's path is a longer string)."""

READERS = 2
"""Threads that read large bodies. Their own pool, not the loop's default executor: a flood of large
bodies then queues behind itself, never ahead of other tenants' prompt rendering and registry
writes; and the GIL lets no more than about one of them run at a time anyway."""

_ENDS = ("end_map", "end_array")
_DEPTH = {"start_map": 1, "start_array": 1, "end_map": -1, "end_array": -1}
_kind = operator.itemgetter(0)


def _pieces(parser, raw: bytes) -> Iterator[None]:
    """Send ``raw`` to ijson's push ``parser`` a piece of :data:`PIECE_BYTES` at a time, yielding after
    each piece and once more after the end. Raises ValueError where ``raw`` stops being JSON."""
    view = memoryview(raw)
    try:
        for start in range(0, len(view), PIECE_BYTES):
            parser.send(bytes(view[start:start + PIECE_BYTES]))
            yield
        parser.close()
    except (ijson.JSONError, UnicodeDecodeError) as e:
        raise ValueError(f"not JSON: {e}") from None
    yield


def _events(raw: bytes) -> Iterator[list[tuple[str, Any]]]:
    """``raw``'s JSON events (ijson's basic ones), one list per piece of :data:`PIECE_BYTES`; each list
    is reused for the next piece. Raises ValueError where ``raw`` stops being JSON."""
    events = sendable_list()
    for _ in _pieces(ijson.basic_parse_coro(events, use_float=True), raw):
        yield events
        del events[:]


def _levels(kinds: list[str], depth: int) -> list[int]:
    """The depth before each event of ``kinds`` and after the last one, from ``depth`` (C loops only)."""
    return list(itertools.accumulate(map(_DEPTH.get, kinds, itertools.repeat(0)), initial=depth))


def check_shape(raw: bytes, max_values: int) -> None:
    """Refuse ``raw`` if it holds more than ``max_values`` JSON values (numbers, strings, arrays,
    objects, keys) or nests deeper than :data:`MAX_DEPTH`. Raises ValueError if it is not JSON."""
    values = depth = 0
    for events in _events(raw):
        kinds = list(map(_kind, events))
        values += len(kinds) - sum(map(kinds.count, _ENDS))
        if values > max_values:
            raise InvalidArgument(f"the body holds more than {max_values:,} JSON values "
                                  "(--max-request-values)", field="body")
        levels = _levels(kinds, depth)
        if max(levels) > MAX_DEPTH:
            raise InvalidArgument(f"the body nests arrays and objects more than {MAX_DEPTH} deep", field="body")
        depth = levels[-1]


def parse(raw: bytes) -> Any:
    """``json.loads(raw)``, a piece at a time, for a body :func:`check_shape` has passed.
    Raises ValueError on a body that is not JSON."""
    out = sendable_list()
    for _ in _pieces(ijson.items_coro(out, "", use_float=True), raw):
        pass
    if len(out) != 1:
        raise ValueError("not one JSON document")
    return out[0]


def top_level_string(raw: bytes, key: str) -> str | None:
    """The string at ``key`` in the JSON object ``raw``, read a piece at a time up to that key; None
    if there is none, it is not a string, or ``raw`` is not a JSON object of sane depth as far as it
    was read."""
    depth, found = 0, False
    try:
        for events in _events(raw):
            if found:  # the key ended the last piece
                return events[0][1] if events and events[0][0] == "string" else None
            kinds = list(map(_kind, events))
            levels = _levels(kinds, depth)
            at = 0
            while True:
                try:
                    at = events.index(("map_key", key), at)
                except ValueError:
                    break
                if levels[at] == 1:  # a key of the outermost object
                    if at + 1 == len(events):
                        found = True
                        break
                    kind, value = events[at + 1]
                    return value if kind == "string" else None
                at += 1
            if max(levels) > MAX_DEPTH:
                return None
            depth = levels[-1]
    except ValueError:
        pass
    return None


@functools.cache
def _readers() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(READERS, thread_name_prefix="loraplex-body")


async def off_loop(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` on a body-reading thread (:data:`READERS`)."""
    return await asyncio.get_running_loop().run_in_executor(_readers(), fn, *args)


def _json_error() -> RequestValidationError:
    # FastAPI's shape for a body that is not JSON; errors.py answers it with 400 invalid_json.
    return RequestValidationError([{"type": "json_invalid", "loc": ("body", 0), "msg": "JSON decode error",
                                    "input": {}, "ctx": {"error": "not JSON"}}])


class OffLoopRoute(APIRoute):
    """An APIRoute whose large JSON body is parsed and validated in a worker thread."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        field = self.body_field
        if field is None:
            return handler

        def validate(raw: bytes, cap: int):
            try:
                check_shape(raw, cap)
                value = parse(raw)
            except ValueError:
                raise _json_error() from None
            model, errors = field.validate(value, {}, loc=("body",))
            if errors:
                raise RequestValidationError(errors, body=None)
            return model

        async def route(request: Request) -> Response:
            raw = await request.body()  # the guard has already bounded it (--max-request-bytes)
            if not _is_json(request):
                return await handler(request)
            cap = request.app.state.service.settings.max_request_values
            if len(raw) > INLINE_BYTES:
                # Starlette's Request.json() returns what is cached here; FastAPI's own validation of
                # an instance of the model is a type check.
                request._json = await off_loop(validate, raw, cap)
            elif raw.count(b"[") + raw.count(b"{") > MAX_DEPTH:  # may be too deep: a millisecond to know
                with contextlib.suppress(ValueError):  # not JSON: FastAPI's parse says so
                    check_shape(raw, cap)
            return await handler(request)

        return route


def _is_json(request: Request) -> bool:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()  # as FastAPI reads it
    main, _, sub = kind.partition("/")
    return not kind or (main == "application" and (sub == "json" or sub.endswith("+json")))
