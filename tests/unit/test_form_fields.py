"""The Ray ingress's reading of an upload form (server/api/http/multipart.FormFields): the text
fields up to the first file part, checked there, and nothing past it."""

from __future__ import annotations

import asyncio

import pytest

from server.api.http.multipart import FormFields, before_files
from server.errors import Conflict

FORM = (b'--b\r\nContent-Disposition: form-data; name="name"\r\n\r\nmine\r\n'
        b'--b\r\nContent-Disposition: form-data; name="tenant"\r\n\r\nacme\r\n'
        b'--b\r\nContent-Disposition: form-data; name="files"; filename="adapter_model.safetensors"\r\n\r\n')
CTYPE = "multipart/form-data; boundary=b"


def read(fields: FormFields, *chunks: bytes) -> list[bool]:
    """Feed the chunks in turn; whether the reader was done after each."""
    async def run():
        done = []
        for chunk in chunks:
            await fields.feed(chunk)
            done.append(fields.done)
        return done
    return asyncio.run(run())


def test_the_check_runs_at_the_first_file_part_with_the_fields_before_it():
    seen = []
    fields = FormFields(CTYPE, before_files(lambda n, t: seen.append((n, t)), name=None, tenant=None))
    # one byte at a time: the check waits for the file part's headers, then nothing more is read
    done = read(fields, *(FORM[i:i + 1] for i in range(len(FORM))), b"\xff" * (1 << 20), b"--b--\r\n")
    assert seen == [("mine", "acme")]
    assert done.index(True) == len(FORM) - 1 and all(done[len(FORM) - 1:])


def test_the_path_and_query_name_the_adapter_before_the_form():
    seen = []
    fields = FormFields(CTYPE, before_files(lambda n, t: seen.append((n, t)), name="from-path", tenant="q"))
    read(fields, FORM)
    assert seen == [("from-path", "q")]


def test_a_refusal_propagates_from_the_check():
    def taken(name, tenant):
        raise Conflict(f"adapter {name!r} already exists", field="name")

    fields = FormFields(CTYPE, before_files(taken, name=None, tenant=None))
    with pytest.raises(Conflict):
        read(fields, FORM)


def test_a_form_without_a_name_and_a_body_that_is_no_form_are_left_to_the_replica():
    seen = []
    check = before_files(lambda n, t: seen.append(n), name=None, tenant=None)
    nameless = FormFields(CTYPE, check)
    assert read(nameless, b'--b\r\nContent-Disposition: form-data; name="files"; filename="x"\r\n\r\n') == [True]
    assert FormFields("application/json", check).done
    garbled = FormFields(CTYPE, check)
    assert read(garbled, b"--x\r\n") == [True]  # malformed: no error here, the replica's parse names it
    assert seen == []
