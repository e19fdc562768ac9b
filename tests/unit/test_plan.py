"""plan's arithmetic against values worked out by hand for a tiny Llama."""

import torch

from trainer.plan import Shape, layer_values, nf4_bytes, plan

TINY = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 64, "vocab_size": 512, "tie_word_embeddings": False}
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_parameter_counts():
    s = Shape.from_config(TINY)
    # per layer: q 128*128 + k 128*64 + v 128*64 + o 128*128 + 3 * 128*256 = 147456
    assert s.linear_params == 2 * 147_456
    # untied embed + lm_head 2 * 512*128, norms (2 per layer + final) * 128
    assert s.other_params == 131_072 + 640
    # r=8: sum r*(in+out) = 2048 + 1536 + 1536 + 2048 + 3 * 3072 = 16384 per layer
    assert s.adapter_params(8, ALL) == 32_768


def test_nf4_bytes_with_double_quant():
    # 16384 weights: 8192 B of nibbles, 256 8-bit absmax, one fp32 scale for those 256 blocks
    assert nf4_bytes(16_384) == 8_192 + 256 + 4
    assert nf4_bytes(32_768) == 16_384 + 512 + 8
    assert nf4_bytes(16_384, double_quant=False) == 8_192 + 4 * 256


def test_layer_values():
    s = Shape.from_config(TINY)
    # norms in and out 4h = 512, q/k/v/out 2q + 2kv = 384, MLP gate, up, product 3i = 768 (+ SiLU(gate) eager)
    assert layer_values(s, fused=True) == 1664
    assert layer_values(s, fused=False) == 1664 + 256


def test_fp32_cpu_breakdown():
    p = plan(TINY, r=8, targets=ALL, batch_size=2, seq_len=16, compute_dtype=torch.float32, device="cpu")
    n, a = 426_624, 32_768
    full, lora, qlora = p.mode("full"), p.mode("lora"), p.mode("qlora")
    assert (full.weights, full.gradients, full.optimizer, full.adapter) == (4 * n, 4 * n, 8 * n, 0)
    assert (lora.weights, lora.gradients, lora.optimizer, lora.adapter) == (4 * n, 4 * a, 8 * a, 4 * a)
    # q,o: 8452 each; k,v: 4228 each; gate/up/down: 16904 each -> 76072 per layer; other params fp32
    assert qlora.weights == 2 * 76_072 + 4 * 131_712
    # no checkpointing on CPU: 2 layers * 32 tokens * 1920 values * 4 B; the head: final norm in and out,
    # the answer rows and their gradient (2h + 2h a token), and the logits with their fp32 copy
    assert lora.activations == 2 * 32 * 1920 * 4 + 32 * 4 * 128 * 4 + 32 * 512 * 8


def test_cuda_checkpointing_modes_and_the_host_embedding():
    def total(mode, host=False, tied=False):
        cfg = {**TINY, "tie_word_embeddings": tied}
        return plan(cfg, r=8, targets=ALL, batch_size=1, seq_len=8, load_4bit=True, compute_dtype=torch.bfloat16,
                    device="cuda", checkpointing=mode, embedding_on_host=host).mode("qlora")

    a = 32_768
    off, layers, offload = total("off"), total("layers"), total("offload")
    per_layer, kept = 8 * 1664 * 2, 8 * 128 * 2  # fused kernels on CUDA; one layer input: tokens * h
    head = 2 * 8 * 128 * 2 + 2 * 8 * 128 * 2  # no logits: the fused loss
    assert off.activations == 2 * per_layer + head
    assert layers.activations == 2 * kept + per_layer + head
    assert offload.activations == 2 * kept + per_layer + head  # 2 layers: both inputs on the device at once
    assert (offload.optimizer, offload.adapter) == (2 * a, 4 * a + 2 * a)  # paged 8-bit; fp32 + bf16 copies
    assert total("offload", host=True).weights == offload.weights - 512 * 128 * 2
    assert total("offload", host=True, tied=True).weights == total("offload", tied=True).weights  # needed by lm_head


def test_bf16_cuda_uses_paged_8bit_states_for_qlora_only():
    p = plan(TINY, r=8, targets=ALL, batch_size=1, seq_len=8, compute_dtype=torch.bfloat16, device="cuda")
    n, a = 426_624, 32_768
    assert p.mode("full").weights == 2 * n and p.mode("full").optimizer == 4 * n  # AdamW states in bf16
    assert p.mode("lora").optimizer == 8 * a
    assert p.mode("qlora").optimizer == 2 * a
    assert "total" in p.table()
