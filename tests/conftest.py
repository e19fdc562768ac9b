"""Session fixtures: one tiny random Llama, made in code, shared by every test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing in the test suite may reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    from tests.tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    from tests.tiny import make_dataset

    return make_dataset(tmp_path_factory.mktemp("data") / "task.jsonl", n=64)
