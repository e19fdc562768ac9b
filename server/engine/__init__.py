"""The engine boundary: the only package that imports vllm (see vllm_engine.py)."""

from server.engine.types import Completion, Sampling

__all__ = ["Completion", "Sampling"]
