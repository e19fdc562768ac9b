"""Tuned LoRA kernel configs: the tuner's choice, the files it writes as vLLM's own loader reads
them, the configs loraplex ships, and which folder the engine is given."""

from __future__ import annotations

import json
import os

import pytest

from benchmarks import lora_kernels as tuner
from benchmarks.models import SHAPES
from server.engine import lora_kernels

H100 = "NVIDIA H100 80GB HBM3"


@pytest.fixture
def vllm_loader(monkeypatch):
    """vLLM's get_lora_op_configs, reading VLLM_TUNED_CONFIG_FOLDER afresh, on a named card."""
    import torch
    from vllm.lora.ops.triton_ops import utils

    def use(folder, gpu=H100):
        monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", str(folder))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: gpu)
        utils.load_lora_op_config.cache_clear()
        utils.get_lora_op_configs.cache_clear()
        return utils.get_lora_op_configs

    yield use
    utils.load_lora_op_config.cache_clear()
    utils.get_lora_op_configs.cache_clear()


def _timings(fast: int, tradeoff: int) -> dict:
    """Every module, op and batch: candidate ``fast`` takes half the default's time at every
    adapter count; ``tradeoff`` a fifth at many adapters but 1.2x at one."""
    out = {}
    for name in tuner.modules(SHAPES["llama-3.1-8b"]):
        for op, cands in (("shrink", tuner.SHRINK), ("expand", tuner.EXPAND)):
            for m in tuner.BATCHES:
                counts = [a for a in tuner.ADAPTERS if a <= m]
                row = {"default": {a: 100.0 for a in counts}}
                for i, c in enumerate(cands):
                    f = {fast: lambda a: 0.5, tradeoff: lambda a: 1.2 if a == 1 else 0.2}.get(i, lambda a: 1.1)
                    row[json.dumps(c, sort_keys=True)] = {a: 100.0 * f(a) for a in counts}
                out[(name, op, m)] = row
    return out


def test_a_config_slower_at_any_adapter_count_is_not_chosen():
    row = {"default": {1: 10.0, 64: 100.0}, "a": {1: 12.0, 64: 20.0}, "b": {1: 10.1, 64: 60.0},
           "c": {1: 9.0}}  # c was not measured at 64 adapters (budget ran out)
    assert tuner.choose(row, "default") == "b"
    assert tuner.choose({"default": {1: 1.0}, "a": {1: 1.5}}, "default") == "default"


def test_tuned_files_are_read_back_by_vllm_for_every_layer_of_the_shape(tmp_path, vllm_loader):
    shape = SHAPES["llama-3.1-8b"]
    timings = _timings(fast=3, tradeoff=5)
    # candidate 3 was not timed at 4 adapters for down_proj's shrink at 64 tokens: the default stays there
    timings[("down", "shrink", 64)][json.dumps(tuner.SHRINK[3], sort_keys=True)].pop(4)
    chosen, summary = tuner.report(shape, 16, 128, timings, tuner.vllm_default(16, 128))
    down_64 = ("shrink", "1", 64, "14336", "16")
    assert chosen[down_64]["split_k"] == 64 and chosen[down_64]["block_k"] == 256  # vLLM's default, written out
    assert all(c in (tuner.SHRINK[3], tuner.EXPAND[3]) for key, c in chosen.items() if key != down_64)
    assert summary["lora_ms_per_forward_pass"]["m=128 adapters=64"]["speedup"] == 2.0
    tuner.write_configs(tmp_path, lora_kernels.file_prefix(H100), 128, chosen)
    get = vllm_loader(tmp_path)
    # the lookups vLLM's ops make for each layer of the 8B shape: (hidden_size, rank, slices)
    assert get("shrink", 129, 64, 14336, 16, 1)["split_k"] == 64  # not o_proj's, the key nearest in k
    for m in (1, 7, 128, 300, 8192):
        assert get("shrink", 129, m, 4096, 16, 3) == tuner.SHRINK[3]  # qkv
        assert m == 64 or get("shrink", 129, m, 14336, 16, 1) == tuner.SHRINK[3]  # down
        assert get("expand", 129, m, 14336, 16, 2, add_inputs=True) == tuner.EXPAND[3]  # gate_up
        assert get("expand", 129, m, 4096, 16, 1, add_inputs=False) == tuner.EXPAND[3]  # o, down (dual stream)
    # a layer of 4 slices (olmo_hybrid's in_proj_qkvg): vLLM looks slice counts up exactly
    assert get("expand", 129, 128, 4096, 16, 4, add_inputs=True) == tuner.EXPAND[3]
    assert get("shrink", 129, 128, 4096, 16, 8) == tuner.SHRINK[3]
    # another slot count or card: nearest slot count; a card with no file gets vLLM's defaults
    assert get("expand", 33, 128, 4096, 16, 3, add_inputs=True) == tuner.EXPAND[3]
    get = vllm_loader(tmp_path, gpu="NVIDIA A100-SXM4-80GB")
    assert get("expand", 129, 128, 4096, 16, 3, add_inputs=True)["block_m"] == 64


def test_a_budget_that_ends_between_layers_sharing_a_key_keeps_the_default(tmp_path):
    """o_proj and down_proj's expand share a key: a candidate timed on o_proj alone looks twice
    as fast on their sum, and must not be chosen."""
    shape = SHAPES["llama-3.1-8b"]
    timings = _timings(fast=99, tradeoff=99)  # no candidate beats the default ...
    cand = json.dumps(tuner.EXPAND[0], sort_keys=True)
    for m in tuner.BATCHES:
        timings[("o", "expand", m)][cand] = {a: 1.0 for a in timings[("o", "expand", m)]["default"]}
        del timings[("down", "expand", m)][cand]  # ... but this one, timed on o_proj only
    chosen, _ = tuner.report(shape, 16, 128, timings, tuner.vllm_default(16, 128))
    assert chosen[("expand", "1", 128, "16", "4096")]["block_m"] == 64  # vLLM's default


def test_vllms_launch_on_the_shipped_configs_is_timed_beside_and_never_chosen(tmp_path):
    timings = _timings(fast=0, tradeoff=1)
    for row in timings.values():  # vLLM's launch, tuned: faster than anything the work list tried
        row["vllm_tuned"] = {a: 10.0 for a in row["default"]}
    chosen, summary = tuner.report(SHAPES["llama-3.1-8b"], 16, 128, timings, lambda op, m, s: {"default": op})
    assert "vllm_tuned" not in summary["chosen"].values()
    cell = summary["lora_ms_per_forward_pass"]["m=128 adapters=64"]
    assert cell["vllm_tuned_ms"] < cell["tuned_ms"] and cell["vs_vllm_tuned"] < 1


def test_the_shipped_configs_are_looked_up_as_vllm_does_and_the_folder_is_let_go(monkeypatch, vllm_loader):
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: H100)
    monkeypatch.delenv("VLLM_TUNED_CONFIG_FOLDER", raising=False)
    args = ("expand", 129, 128, 14336, 16, 2)  # op, slots + 1, batch, hidden (n), rank (k), slices
    got = tuner.from_folder(lora_kernels.BUNDLED, *args, add_inputs=True)
    assert "VLLM_TUNED_CONFIG_FOLDER" not in os.environ
    assert got == vllm_loader(lora_kernels.BUNDLED)(*args, add_inputs=True)
    monkeypatch.delenv("VLLM_TUNED_CONFIG_FOLDER")
    from vllm.lora.ops.triton_ops import utils

    utils.load_lora_op_config.cache_clear(), utils.get_lora_op_configs.cache_clear()
    assert utils.get_lora_op_configs(*args, add_inputs=True) != got  # the shipped config is not vLLM's default


def test_bundled_configs_cover_every_layer_they_name(vllm_loader):
    files = sorted(lora_kernels.BUNDLED.glob("*_SHRINK.json"))
    assert files, "loraplex ships tuned configs for at least one card"
    for f in files:
        gpu = f.name.removesuffix("_SHRINK.json").replace("_", " ")
        get = vllm_loader(lora_kernels.BUNDLED, gpu=gpu)
        for add in (True, False):
            assert (lora_kernels.BUNDLED / f"{lora_kernels.file_prefix(gpu)}_EXPAND_{str(add).upper()}.json").is_file()
        for m in (1, 128, 8192):
            for op, k, slices, add in (("shrink", 4096, 3, None), ("shrink", 14336, 1, None),
                                       ("expand", 14336, 2, True), ("expand", 4096, 1, False),
                                       ("expand", 4096, 4, True), ("shrink", 2048, 8, None)):
                cfg = get(op, 129, m, k, 16, slices, add_inputs=add)
                assert {"block_m", "block_n", "block_k", "num_warps", "num_stages", "num_ctas"} <= cfg.keys()
                if op == "shrink":
                    assert cfg["split_k"] >= 1


def test_which_folder_the_engine_gets(tmp_path):
    env = {"VLLM_TUNED_CONFIG_FOLDER": "/mine"}
    assert lora_kernels.resolve("auto", H100, env) == "/mine"  # the user's environment wins under auto
    assert lora_kernels.resolve("auto", H100, env, moe=True) == "/mine"
    assert lora_kernels.resolve("off", H100, env) is None
    assert lora_kernels.resolve(str(tmp_path), H100, env) == str(tmp_path)
    assert lora_kernels.resolve("auto", None, env) is None  # no CUDA: no Triton kernels
    assert lora_kernels.resolve("auto", "A card loraplex has no configs for", {}) is None
    shipped = next(lora_kernels.BUNDLED.glob("*_SHRINK.json")).name.removesuffix("_SHRINK.json")
    assert lora_kernels.resolve("auto", shipped.replace("_", " "), {}) == str(lora_kernels.BUNDLED)
    # MoE layers: vLLM would read their LoRA configs from the folder too, and none are shipped
    assert lora_kernels.resolve("auto", shipped.replace("_", " "), {}, moe=True) is None
    assert lora_kernels.resolve(str(tmp_path), H100, {}, moe=True) == str(tmp_path)


def test_moe_models_are_told_apart_by_their_config(tmp_path):
    (tmp_path / "dense").mkdir()
    (tmp_path / "dense" / "config.json").write_text(json.dumps(SHAPES["tiny"]))
    (tmp_path / "moe").mkdir()
    (tmp_path / "moe" / "config.json").write_text(json.dumps({"text_config": {"num_local_experts": 8}}))
    assert not lora_kernels.has_experts(tmp_path / "dense") and lora_kernels.has_experts(tmp_path / "moe")
    assert not lora_kernels.has_experts(tmp_path / "missing")


def test_the_engine_processes_get_the_folder_through_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", "/mine")
    assert lora_kernels.apply("auto", None) is None and os.environ["VLLM_TUNED_CONFIG_FOLDER"] == "/mine"
    # off names no folder of loraplex's, and leaves yours (vLLM reads MoE and Mamba configs there too)
    assert lora_kernels.apply("off", H100) == "/mine" == os.environ["VLLM_TUNED_CONFIG_FOLDER"]
    assert lora_kernels.apply(str(tmp_path), H100) == str(tmp_path) == os.environ["VLLM_TUNED_CONFIG_FOLDER"]
    monkeypatch.delenv("VLLM_TUNED_CONFIG_FOLDER")
    assert lora_kernels.apply("off", H100) is None and "VLLM_TUNED_CONFIG_FOLDER" not in os.environ
    assert lora_kernels.apply("auto", H100, moe=True) is None and "VLLM_TUNED_CONFIG_FOLDER" not in os.environ
    assert lora_kernels.apply("auto", H100) == str(lora_kernels.BUNDLED) == os.environ["VLLM_TUNED_CONFIG_FOLDER"]


CAPTURED = [1, 2, 4, *range(8, 256, 8), *range(256, 513, 16)]  # vLLM 0.25's capture sizes up to 512


@pytest.mark.parametrize("folder", [lora_kernels.BUNDLED, None], ids=["bundled", "vllm-defaults"])
def test_the_warmup_compiles_every_kernel_a_batch_can_launch(folder, vllm_loader, monkeypatch):
    """Every batch size up to the token budget launches the LoRA kernels with a config and an
    ``M`` specialization that a captured size or a warmup size already compiled, as vLLM's own
    lookup picks them for each layer of the 8B shape."""
    if folder is None:
        get = vllm_loader(lora_kernels.BUNDLED)
        monkeypatch.delenv("VLLM_TUNED_CONFIG_FOLDER")
        from vllm.lora.ops.triton_ops import utils
        utils.load_lora_op_config.cache_clear()
    else:
        get = vllm_loader(folder)
    max_tokens = 8192
    sizes = lora_kernels.warmup_sizes(lora_kernels.batch_keys(folder, H100), CAPTURED, max_tokens)
    assert all(CAPTURED[-1] < n <= max_tokens for n in sizes)
    lookups = [(op, slices, k, n, add) for k, n, slices in ((4096, 16, 3), (4096, 16, 1), (4096, 16, 2),
                                                           (14336, 16, 1))
               for op, add in (("shrink", None),)] + \
              [("expand", slices, 16, n, add) for n, slices in ((4096, 3), (4096, 1), (14336, 2))
               for add in (True, False)]

    def compiled(m):
        cfgs = tuple(json.dumps(get(op, 129, m, k, n, slices, add_inputs=add), sort_keys=True)
                     for op, slices, k, n, add in lookups)
        return m == 1, m % 16 == 0, cfgs

    ready = {compiled(m) for m in CAPTURED + sizes}
    padded = lambda m: next(c for c in CAPTURED if c >= m) if m <= CAPTURED[-1] else m  # noqa: E731
    missing = [m for m in range(1, max_tokens + 1) if compiled(padded(m)) not in ready]
    assert not missing, f"batches of {missing[:5]}... tokens would compile a LoRA kernel while serving"
    if folder is not None:
        assert sizes, "the bundled prefill configs differ from the decode ones: something must be warmed"
    assert lora_kernels.warmup_sizes([], CAPTURED, 512) == []
