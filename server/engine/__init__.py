"""The engine boundary: the only package that imports vllm (see vllm_engine.py)."""

from server.engine.types import Completion, EngineStats, Sampling

__all__ = ["Completion", "EngineStats", "Sampling"]
