"""A multipart/form-data upload, streamed into a :class:`StagedUpload` as it arrives.

FastAPI's ``Form``/``File`` parameters read the whole body (spooled to a temp
file) before the route runs. Adapter uploads are hundreds of MB, and the route
must refuse a bad key, a taken name or an oversized body before it reads them;
so the route takes the raw request, its key already checked, and this parser
(python-multipart, the one Starlette uses) writes each file part into the
staging directory chunk by chunk, in a worker thread.

Form fields: ``name`` and ``tenant`` (text), ``files`` (each adapter file, as
many parts) or ``archive`` (one .tar.gz).

The Ray ingress reads the same form as it passes (:class:`FormFields`): only its
text fields, so that it refuses a taken name or a full quota before the files'
bytes, as the single server does; the replica that stages the upload parses it
whole.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from server.adapters.staging import StagedUpload
from server.errors import InvalidArgument

TEXT_FIELDS = ("name", "tenant")
FILE_FIELDS = ("files", "archive")
MAX_FIELD_BYTES = 1024
MAX_PARTS = 32
_BATCH = 1 << 20  # bytes handed to the parser per worker-thread hop
FIELDS_BYTES = 128 << 10
"""The first file part begins within this many bytes of the body. A form needs under 40 KiB
before it (text fields of at most MAX_FIELD_BYTES, part headers); past it python-multipart spends
Python time on every byte (a boundary's padding may be spaces and tabs, read one at a time)."""


def _fields_too_long(form: "_Form", parsed: int) -> None:
    if not form._checked and not form.ended and parsed > FIELDS_BYTES:
        raise InvalidArgument(f"the form's first file part does not begin within {FIELDS_BYTES >> 10} KiB: "
                              "send the text fields (name, tenant) first, each under "
                              f"{MAX_FIELD_BYTES} bytes", field="files")


def before_files(check: Callable[[str, str | None], object], *, name: str | None,
                 tenant: str | None) -> Callable[[dict[str, str]], None]:
    """An upload's ``before_files``: ``check(name, tenant)`` with the name from the path and the
    tenant from the query where they are given, else the form's (a form without a name is
    refused once it ends)."""
    def hook(fields: dict[str, str]) -> None:
        if (n := name or fields.get("name")) is not None:
            check(n, tenant or fields.get("tenant"))
    return hook


class _Form:
    """python-multipart's callbacks: headers -> a part's kind, data -> the staged upload or a field."""

    def __init__(self, staged: StagedUpload, before_files: Callable[[dict[str, str]], None]):
        self.staged, self.before_files = staged, before_files
        self.fields: dict[str, str] = {}
        self.parts = 0
        self._checked = False
        self._header_name = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._kind: tuple[str, str | None] | None = None  # (form field, file name or None)
        self._text = bytearray()
        self.ended = False

    def callbacks(self) -> dict:
        return {"on_part_begin": self._part_begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value_cb, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished, "on_part_data": self._data,
                "on_part_end": self._part_end, "on_end": self._end}

    def _end(self) -> None:
        self.ended = True

    def _part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise InvalidArgument(f"the form has more than {MAX_PARTS} parts", field="files")
        self._headers, self._kind, self._text = {}, None, bytearray()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_cb(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header_name.lower()] = self._header_value
        self._header_name, self._header_value = b"", b""

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = params.get(b"name", b"").decode("utf-8", "replace")
        filename = params.get(b"filename")
        if name in TEXT_FIELDS and filename is None:
            self._kind = (name, None)
            return
        if name not in FILE_FIELDS:
            known = ", ".join((*TEXT_FIELDS, *FILE_FIELDS))
            raise InvalidArgument(f"unexpected form field {name!r}; an upload has {known}", field=name or "files")
        if not self._checked:  # the first file part: refuse a taken name or a quota before any bytes
            self._checked = True
            self.before_files(dict(self.fields))
        self._kind = (name, (filename or b"").decode("utf-8", "replace"))
        if name == "files":
            self.staged.write_file(self._kind[1], b"")

    def _data(self, data: bytes, start: int, end: int) -> None:
        field, filename = self._kind
        chunk = data[start:end]
        if filename is None:
            self._text += chunk
            if len(self._text) > MAX_FIELD_BYTES:
                raise InvalidArgument(f"form field {field!r} is longer than {MAX_FIELD_BYTES} bytes", field=field)
        elif field == "files":
            self.staged.write_file(filename, chunk)
        else:
            self.staged.write_archive(chunk)

    def _part_end(self) -> None:
        field, filename = self._kind
        if filename is None:
            if field in self.fields:
                raise InvalidArgument(f"form field {field!r} is given twice", field=field)
            self.fields[field] = self._text.decode("utf-8", "replace")
        elif field == "files":
            self.staged.end_file(filename)


async def receive(request: Request, staged: StagedUpload, *,
                  before_files: Callable[[dict[str, str]], None] = lambda fields: None) -> dict[str, str]:
    """Stream the request's form into ``staged``; returns the text fields. ``before_files`` gets
    the text fields sent ahead of the first file part, to refuse the upload before its bytes."""
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise InvalidArgument("an adapter upload is multipart/form-data (fields name, files or archive)",
                              field="files")
    form = _Form(staged, before_files)
    pending, parsed = bytearray(), 0
    try:
        parser = MultipartParser(boundary, form.callbacks())
        # The guard (server/api/http/guard.py) bounds the body and its pauses; the staged
        # upload bounds the files' bytes.
        async for chunk in request.stream():
            pending += chunk
            if len(pending) >= _BATCH:
                await asyncio.to_thread(parser.write, bytes(pending))
                parsed += len(pending)
                pending.clear()
                _fields_too_long(form, parsed)
        await asyncio.to_thread(parser.write, bytes(pending))
        parser.finalize()
    except FormParserError as e:  # a malformed body, or a boundary python-multipart refuses
        raise InvalidArgument(f"malformed multipart body: {e}", field="files") from None
    if not form.ended:
        raise InvalidArgument("the multipart body ends before its closing boundary (truncated?)", field="files")
    return form.fields


class _Discard:
    """Where :class:`FormFields` puts the files' bytes: nowhere (the replica stages them)."""

    def write_file(self, name: str, data: bytes) -> None:
        pass

    def end_file(self, name: str) -> None:
        pass

    def write_archive(self, data: bytes) -> None:
        pass


class FormFields:
    """An upload form's text fields, read as the body passes (the Ray ingress): ``before_files``
    runs at the first file part, as in :func:`receive`, and nothing past it is parsed. A body that
    is not a form, or a malformed one, is left to the replica, whose parse says what is wrong."""

    _PIECE = 16 << 10
    """Bytes gathered before a worker-thread hop: a client sending a byte at a time costs one hop
    per 16 KiB, not one per byte."""

    def __init__(self, content_type: str, before_files: Callable[[dict[str, str]], None]):
        ctype, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        self._form = _Form(_Discard(), before_files)
        self._parser = None
        if ctype == b"multipart/form-data" and boundary:
            with contextlib.suppress(FormParserError):  # a boundary it refuses: the replica says so
                self._parser = MultipartParser(boundary, self._form.callbacks())
        self._pending = bytearray()
        self._parsed = 0

    @property
    def done(self) -> bool:
        return self._parser is None or self._form._checked or self._form.ended

    async def feed(self, chunk: bytes, *, more: bool = True) -> None:
        """Read ``chunk`` while the fields are not all read, in a worker thread (``before_files``
        reads the registry); raises what ``before_files`` or the form's bounds raise, and a 400
        when the first file part does not begin within :data:`FIELDS_BYTES`."""
        if self.done:
            return
        self._pending += chunk
        if len(self._pending) < self._PIECE and more:
            return
        piece, self._pending = bytes(self._pending), bytearray()
        try:
            await asyncio.to_thread(self._parser.write, piece)
        except FormParserError:
            self._parser = None
            return
        self._parsed += len(piece)
        _fields_too_long(self._form, self._parsed)
