"""Prompts a tenant sends, checked by the service before the engine sees them: characters, the
vocabulary, the chat template's own refusals -- each a 400 naming the field."""

from __future__ import annotations

import asyncio

import pytest

from server.adapters.registry import AdapterRegistry
from server.adapters.store import AdapterStore
from server.config import Settings
from server.db import Database
from server.engine.types import Sampling
from server.errors import InvalidArgument
from server.metrics import Metrics
from server.service import Service
from server.tenants import TenantStore
from tests.adapter_files import tiny_base
from tests.tiny import make_tokenizer


class Engine:
    ready = True


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def service(tmp_path, tokenizer):
    db = Database(tmp_path / "registry.sqlite3")
    return Service(Settings(data_dir=tmp_path, max_model_len=64), base=None, base_spec=tiny_base(), engine=Engine(),
                   tokenizer=tokenizer, tenants=TenantStore(db), registry=AdapterRegistry(db),
                   store=AdapterStore(tmp_path / "adapters"), metrics=Metrics())


def test_a_template_that_refuses_the_conversation_is_a_400(service, tokenizer):
    tokenizer.chat_template = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation roles "
                               "must start with user') }}{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    ok = asyncio.run(service.prompts.render_chat([{"role": "user", "content": "hi"}]))
    assert ok
    with pytest.raises(InvalidArgument, match="must start with user") as e:
        asyncio.run(service.prompts.render_chat([{"role": "assistant", "content": "hi"}]))
    assert e.value.field == "messages"


def test_prompts_over_the_character_cap_are_refused_untokenized(service):
    assert service.prompts.max_chars == 64 * 64  # default: 64 characters per token of context
    with pytest.raises(InvalidArgument, match="--max-prompt-chars") as e:
        asyncio.run(service.prompts.encode("x" * (64 * 64 + 1)))
    assert e.value.field == "prompt"
    long = asyncio.run(service.prompts.encode("hello world " * 300))  # large: tokenized in a worker thread
    assert long == asyncio.run(service.prompts.encode("hello world " * 300)) and len(long) > 300


@pytest.mark.parametrize("ids", [[1, len], [1, -1], [1, 10**12], [True, 2]])
def test_token_ids_must_be_in_the_vocabulary(service, ids, tokenizer):
    from server.tenants import Principal, Role

    ids = [len(tokenizer) if x is len else x for x in ids]
    with pytest.raises(InvalidArgument, match="vocabulary") as e:
        service.inference.prepare(Principal("acme", Role.TENANT), "tiny-llama", [ids], Sampling(max_tokens=4),
                                  prompt_field="prompt", client_ids=True)
    assert e.value.field == "prompt"
