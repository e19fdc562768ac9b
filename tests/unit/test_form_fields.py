"""The Ray ingress's reading of an upload form (server/api/http/multipart.FormFields): the text
fields up to the first file part, checked there, and nothing past it."""

from __future__ import annotations

import asyncio

import pytest

from server.api.http.multipart import FormFields, before_files
from server.errors import Conflict, InvalidArgument

FORM = (b'--b\r\nContent-Disposition: form-data; name="name"\r\n\r\nmine\r\n'
        b'--b\r\nContent-Disposition: form-data; name="tenant"\r\n\r\nacme\r\n'
        b'--b\r\nContent-Disposition: form-data; name="files"; filename="adapter_model.safetensors"\r\n\r\n')
CTYPE = "multipart/form-data; boundary=b"


def read(fields: FormFields, *chunks: bytes, more: bool = True) -> list[bool]:
    """Feed the chunks in turn (the last one ending the body unless ``more``); whether the reader
    was done after each."""
    async def run():
        done = []
        for i, chunk in enumerate(chunks):
            await fields.feed(chunk, more=more or i + 1 < len(chunks))
            done.append(fields.done)
        return done
    return asyncio.run(run())


def test_the_check_runs_at_the_first_file_part_with_the_fields_before_it():
    seen = []
    fields = FormFields(CTYPE, before_files(lambda n, t: seen.append((n, t)), name=None, tenant=None))
    # a byte at a time: gathered (one worker-thread hop per 16 KiB), then checked once the file
    # part's headers are read, and nothing more is parsed
    done = read(fields, *(FORM[i:i + 1] for i in range(len(FORM))), b"\xff" * (1 << 20), b"--b--\r\n")
    assert seen == [("mine", "acme")]
    assert done.index(True) == len(FORM) and all(done[len(FORM):])


def test_the_end_of_a_short_body_is_read():
    seen = []
    fields = FormFields(CTYPE, before_files(lambda n, t: seen.append((n, t)), name=None, tenant=None))
    assert read(fields, FORM, more=False) == [True] and seen == [("mine", "acme")]


def test_a_first_file_part_past_the_fields_bound_is_a_400():
    """Spaces after a boundary are its padding, which python-multipart reads a byte at a time in
    Python: 2 GiB of them held a core for minutes. The first file part must begin within 128 KiB."""
    fields = FormFields(CTYPE, before_files(lambda n, t: None, name=None, tenant=None))
    with pytest.raises(InvalidArgument, match="128 KiB") as e:
        read(fields, FORM[:FORM.index(b"--b", 10)] + b"--b", *[b" " * (64 << 10)] * 4)
    assert e.value.field == "files"


def test_a_boundary_python_multipart_refuses_is_left_to_the_replica():
    fields = FormFields("multipart/form-data; boundary=" + "x" * 300, before_files(lambda n, t: None, name=None,
                                                                                   tenant=None))
    assert fields.done


def test_the_path_and_query_name_the_adapter_before_the_form():
    seen = []
    fields = FormFields(CTYPE, before_files(lambda n, t: seen.append((n, t)), name="from-path", tenant="q"))
    read(fields, FORM, more=False)
    assert seen == [("from-path", "q")]


def test_a_refusal_propagates_from_the_check():
    def taken(name, tenant):
        raise Conflict(f"adapter {name!r} already exists", field="name")

    fields = FormFields(CTYPE, before_files(taken, name=None, tenant=None))
    with pytest.raises(Conflict):
        read(fields, FORM, more=False)


def test_a_form_without_a_name_and_a_body_that_is_no_form_are_left_to_the_replica():
    seen = []
    check = before_files(lambda n, t: seen.append(n), name=None, tenant=None)
    nameless = FormFields(CTYPE, check)
    assert read(nameless, b'--b\r\nContent-Disposition: form-data; name="files"; filename="x"\r\n\r\n', more=False) == [True]
    assert FormFields("application/json", check).done
    garbled = FormFields(CTYPE, check)
    assert read(garbled, b"--x\r\n", more=False) == [True]  # malformed: no error here, the replica's parse names it
    assert seen == []
