"""Activation checkpointing of the decoder layers, with the kept inputs optionally in host memory.

Per token and decoder layer, autograd keeps about ``4h + 2q + 2kv + 3i`` values
for backward (Llama with LoRA on every linear, Liger's SwiGLU; h hidden, q/kv
attention widths, i MLP width): for Llama-3.1-8B in bf16 that is 136 KiB a
token a layer, 17 GiB for 2 x 2048 tokens over 32 layers. The modes trade that
memory for time:

    off      keep everything: the fastest step (4 passes' worth of matmuls per token
             instead of 6), the most memory; the default on CPU, where host RAM is large
    layers   keep only each layer's input [tokens, h] and recompute the layer in
             backward (PyTorch's non-reentrant checkpoint): 1/17 of the above, one
             more forward per step
    offload  as layers, and the kept inputs wait in pinned host memory (32 MiB a
             layer at 2 x 2048 tokens, 1 GiB for all 32): copied out on a side stream
             while the forward runs, and back one layer ahead of the backward, so
             neither copy stalls the compute stream
    auto     offload on CUDA, off on CPU
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MODES = ("auto", "off", "layers", "offload")


def resolve(mode: str, device: str) -> str:
    if mode not in MODES:
        raise ValueError(f"--checkpointing must be one of {', '.join(MODES)}; got {mode!r}")
    if mode == "auto":
        return "offload" if device == "cuda" else "off"
    if mode == "offload" and device != "cuda":
        return "layers"  # the activations already live in host memory
    return mode


def enable(model, mode: str) -> None:
    """Checkpoint every decoder layer of a transformers model (the PEFT-wrapped one works too)."""
    if mode == "off":
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mode == "offload":
        offload = HostOffload()
        for module in base.modules():
            if getattr(module, "gradient_checkpointing", False) and hasattr(module, "_gradient_checkpointing_func"):
                module._gradient_checkpointing_func = offload


@dataclass
class _Kept:
    host: torch.Tensor
    copied: torch.cuda.Event
    device_copy: torch.Tensor | None = None
    loaded: torch.cuda.Event | None = None


@dataclass
class HostOffload:
    """Checkpoint function for transformers' ``GradientCheckpointingLayer`` that keeps inputs on the host.

    The layers of one forward are kept as a stack: the backward meets them in
    reverse, so the next one to load is always on top.
    """

    stream: torch.cuda.Stream | None = None
    kept: list[_Kept] = field(default_factory=list)

    def __call__(self, function, hidden: torch.Tensor, *args):
        if args or not torch.is_grad_enabled():
            return function(hidden, *args)
        if self.stream is None:
            self.stream = torch.cuda.Stream(hidden.device)
        if not hidden.requires_grad:  # the first layer's input: let the layers' LoRA weights get gradients
            hidden = hidden.detach().requires_grad_()
        return _OffloadedLayer.apply(self, function, hidden)

    def stash(self, t: torch.Tensor) -> None:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        compute = torch.cuda.current_stream(t.device)
        self.stream.wait_stream(compute)  # t is written
        with torch.cuda.stream(self.stream):
            host.copy_(t, non_blocking=True)
            copied = self.stream.record_event()
        t.record_stream(self.stream)  # t's memory is not reused before the copy has read it
        self.kept.append(_Kept(host, copied))

    def _load(self, k: _Kept, device) -> None:
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(k.copied)
            k.device_copy = k.host.to(device, non_blocking=True)
            k.loaded = self.stream.record_event()

    def fetch(self, device) -> torch.Tensor:
        k = self.kept.pop()
        if k.device_copy is None:
            self._load(k, device)
        compute = torch.cuda.current_stream(device)
        compute.wait_event(k.loaded)
        t = k.device_copy
        t.record_stream(compute)  # allocated on the side stream, used and freed on this one
        if self.kept:  # the layer before this one is next in backward: bring it in meanwhile
            self._load(self.kept[-1], device)
        return t


def _rng_states(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


class _OffloadedLayer(torch.autograd.Function):
    """Run a layer without keeping its activations; its input goes to the host. Backward brings the
    input back, replays the layer under the forward's RNG and autocast state, and backpropagates."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, offload: HostOffload, function, hidden):
        ctx.offload, ctx.function, ctx.device = offload, function, hidden.device
        ctx.rng = _rng_states(hidden.device)
        offload.stash(hidden)
        with torch.no_grad():
            out = function(hidden)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"offloaded checkpointing needs a layer that returns one tensor, not {type(out)}")
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad):
        hidden = ctx.offload.fetch(ctx.device).detach().requires_grad_()
        cpu_rng, cuda_rng = ctx.rng
        devices = [ctx.device] if cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, ctx.device)
            out = ctx.function(hidden)
        torch.autograd.backward(out, grad)
        return None, None, hidden.grad


__all__ = ["MODES", "resolve", "enable", "HostOffload"]
