"""The FLOP formula (train/flops.py) on an example worked out by hand, and the TFLOP/s and MFU the training log
derives from it and the routing counters."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from model.config import ModelConfig, MoEConfig
from model.moe import RoutingStats
from parallel.config import ParallelConfig
from parallel.mesh import init_parallel
from train.config import Config, LoggingConfig, TrainConfig
from train.config_load import load_config
from train.flops import device_peak_tflops, flops_per_token, peak_tflops
from train.metrics import MetricsLogger
from train.step import StepResult
from train.trainer import format_line, log_step

ROOT = Path(__file__).resolve().parents[1]


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
    assert peak_tflops("NVIDIA H100 NVL") == ("H100 NVL", 835.5)
    assert peak_tflops("NVIDIA H200") == ("H200", 989.4)
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == ("A100", 312.0)
    assert peak_tflops("NVIDIA B200") == ("B200", 2250.0)
    assert peak_tflops("cpu") is None
    # The override wins everywhere; on CPU there is no peak without it.
    assert device_peak_tflops(torch.device("cpu")) is None
    assert device_peak_tflops(torch.device("cpu"), 123.0) == 123.0
    import bench.flops

    assert bench.flops.flops_per_token is flops_per_token  # the benchmarks count with the same formula


def test_shared_experts_count_for_every_token():
    model, moe = tiny()
    moe.shared_experts = 2
    b = flops_per_token(model, moe, seq_len=3, ffn_per_token=[2.0, 1.5])
    # Each layer adds 2 shared expert-tokens of 2*3*4*8 = 192 FLOPs.
    assert b.experts == (2.0 + 2) * 192 + (1.5 + 2) * 192


def step_record(model: ModelConfig, moe: MoEConfig, counts: list[list[int]], peak: float | None = None) -> dict:
    """log_step's record for one step whose MoE layers kept `counts` assignments per expert, 10 tokens each,
    at 1000 tokens/s on one CPU process."""
    cfg = Config(
        model=model, moe=moe, train=TrainConfig(global_batch_size=2, micro_batch_size=2), logging=LoggingConfig()
    )
    cfg.data.seq_len = 5
    cfg.logging.peak_tflops = peak
    ctx = init_parallel(ParallelConfig(), "cpu")
    routing = [RoutingStats(torch.tensor(c), torch.tensor(0), num_tokens=10) for c in counts]
    result = StepResult(torch.tensor(2.0), torch.tensor(0.0), torch.tensor(1.0), routing)
    logger = MetricsLogger(Path("unused"), 10, enabled=False)
    return log_step(cfg, ctx, logger, result, 1, 1e-3, 2, 0, tokens_per_s=1000.0)


def test_logged_tflops_count_the_ffn_assignments_computed():
    model, moe = tiny()
    # E = [4 FFN, 2 constant, 1 copy, 1 zero]; 10 tokens x top-2 = 20 assignments per layer.
    # Layer 0: 20 FFN assignments (2.0 per token); layer 1: 15 (1.5 per token), the rest on zero-computation experts.
    counts = [[5, 5, 5, 5, 0, 0, 0, 0], [4, 4, 4, 3, 2, 1, 1, 1]]
    record = step_record(model, moe, counts)
    # Forward FLOPs per token from test_flops_per_token_by_hand (S = 3 there, 5 here: attention 2 * (96 + 80)).
    forward = 2 * (96 + 2 * 2 * 5 * 2 * 2) + 256 + (2.0 + 1.5) * 192 + 96 + 80
    assert record["tflops"] == pytest.approx(3 * forward * 1000.0 / 1e12, rel=1e-12)
    assert "mfu" not in record  # CPU, no logging.peak_tflops: TFLOP/s only
    assert "TFLOP/s" in format_line(record, 10, None) and "MFU" not in format_line(record, 10, None)

    with_peak = step_record(model, moe, counts, peak=1e-9)
    assert with_peak["mfu"] == pytest.approx(with_peak["tflops"] / 1e-9)
    assert f"MFU {with_peak['mfu']:.1%}" in format_line(with_peak, 10, None)


def test_moepp_counts_fewer_flops_than_its_vanilla_twin():
    model, moe = tiny()
    moe.expert_ffn_hidden_size = 64  # experts dominate the layer, as in any real config: 2*3*4*64 = 1536 each
    vanilla = dataclasses.replace(
        moe, num_zero_experts=0, num_copy_experts=0, num_constant_experts=0, gating_residual=False
    )
    # The same tokens: the vanilla twin puts every assignment on an FFN expert, MoE++ sends 7 of the second
    # layer's 20 to zero-computation experts.
    moepp_counts = [[5, 5, 5, 5, 0, 0, 0, 0], [4, 3, 3, 3, 2, 2, 2, 1]]
    vanilla_counts = [[5, 5, 5, 5], [5, 5, 5, 5]]
    pp, van = step_record(model, moe, moepp_counts), step_record(model, vanilla, vanilla_counts)
    assert pp["tflops"] < van["tflops"]
    # The gap: 0.7 FFN expert-tokens per token of layer 1 at 1536 FLOPs each, less MoE++'s own router and constant
    # experts (+ 2*4*4 router columns per layer, + 2*8*8 gating residual, + 48 constant per layer), x3 for training.
    per_token = 0.7 * 1536 - (2 * (2 * 4 * 4) + 2 * 8 * 8 + 2 * 48)
    assert (van["tflops"] - pp["tflops"]) * 1e12 / 1000.0 == pytest.approx(3 * per_token, rel=1e-9)


def test_training_log_has_tflops_and_mfu_with_a_peak(tmp_path, capsys):
    from train.trainer import run

    cfg = load_config(
        ROOT / "configs/tiny-cpu.yaml",
        [
            "train.max_steps=2",
            "logging.interval=1",
            "train.eval_interval=0",
            f"train.run_dir={tmp_path}",
            "model.num_layers=2",
            "logging.progress_bar=false",
            "logging.peak_tflops=0.5",
        ],
    )
    run(cfg)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        assert r["tflops"] > 0 and math.isfinite(r["tflops"])
        assert r["mfu"] == pytest.approx(r["tflops"] / 0.5)
    out = capsys.readouterr().out
    assert "TFLOP/s" in out and "MFU" in out
