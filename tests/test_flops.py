"""The FLOP formula of bench/flops.py on an example worked out by hand."""

import pytest

from bench.flops import flops_per_token, peak_tflops
from model.config import ModelConfig, MoEConfig


def tiny() -> tuple[ModelConfig, MoEConfig]:
    model = ModelConfig(vocab_size=10, hidden_size=4, num_layers=2, num_heads=2, num_kv_heads=1, ffn_hidden_size=6)
    moe = MoEConfig(
        num_experts=4,
        num_zero_experts=1,
        num_copy_experts=1,
        num_constant_experts=2,
        top_k=2,
        expert_ffn_hidden_size=8,
        gating_residual=True,
    )
    return model, moe


def test_flops_per_token_by_hand():
    model, moe = tiny()
    b = flops_per_token(model, moe, seq_len=3, ffn_per_token=[2.0, 1.5])
    # D=4, H=2, G=1, Dh=2, S=3: projections 2*4*(2*2*2 + 2*1*2) = 96, scores + AV 2*2*3*2*2 = 48; two layers.
    assert b.attention == 2 * (96 + 48)
    assert b.dense_ffn == 0  # every layer is MoE
    # E = 8: 2*4*8 = 64 per layer, plus the gating residual 2*8*8 = 128 in the second layer only.
    assert b.router == 64 + (64 + 128)
    # One expert-token: 2*3*4*8 = 192; layer 0 uses 2.0 experts per token, layer 1 1.5.
    assert b.experts == 2.0 * 192 + 1.5 * 192
    # Constant experts: 2*3*4*2 = 48 per layer.
    assert b.constant == 2 * 48
    assert b.head == 2 * 4 * 10
    assert b.forward == 288 + 256 + 672 + 96 + 80 == 1392
    assert b.train == 3 * 1392


def test_vanilla_default_and_dense_layers():
    model, moe = tiny()
    moe.every_n_layers = 2  # layer 0 MoE, layer 1 dense SwiGLU
    b = flops_per_token(model, moe, seq_len=3)
    assert b.dense_ffn == 2 * 3 * 4 * 6
    assert b.experts == 2 * 192  # None: top_k FFN experts per token
    assert b.router == 64  # a single MoE layer: no residual term
    with pytest.raises(ValueError, match="2 values for 1 MoE layers"):
        flops_per_token(model, moe, seq_len=3, ffn_per_token=[1.0, 1.0])


def test_peak_table():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == ("H100 SXM", 989.4)
    assert peak_tflops("NVIDIA H100 PCIe") == ("H100 PCIe", 756.5)
    assert peak_tflops("NVIDIA H200") == ("H200", 989.4)
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == ("A100", 312.0)
    assert peak_tflops("cpu") is None


def test_shared_experts_count_for_every_token():
    model, moe = tiny()
    moe.shared_experts = 2
    b = flops_per_token(model, moe, seq_len=3, ffn_per_token=[2.0, 1.5])
    # Each layer adds 2 shared expert-tokens of 2*3*4*8 = 192 FLOPs.
    assert b.experts == (2.0 + 2) * 192 + (1.5 + 2) * 192
