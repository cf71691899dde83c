"""The CUDA suite (`pytest -m cuda`, run by bench/gpu.sh): grouped-GEMM experts vs the loop, a bf16 training run,
train.compile, the host syncs per step under CUDA's sync debug mode, and peak memory. Skipped without a GPU."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

from data.loader import build_data
from model.experts import FFNExperts, LoopedSwiGLU, _grouped_mm_usable
from model.transformer import Decoder
from parallel.compile import apply_compile
from train.config_load import load_config
from train.optim import build_optimizer
from train.step import autocast_context, train_step

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SMALL = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128", "moe.expert_ffn_hidden_size=64"]


def tiny(overrides: list[str] = ()):
    return load_config("configs/tiny-cpu.yaml", ["train.device=cuda", *overrides])


def test_grouped_gemm_matches_the_loop_in_bf16_with_empty_experts():
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm is missing in this torch")
    torch.manual_seed(0)
    experts = FFNExperts(6, 128, 96).cuda()
    counts = [5, 0, 17, 0, 0, 42]  # empty experts at the start, middle and in a run
    x = torch.randn(sum(counts), 128, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert _grouped_mm_usable(x)
        xg = x.clone().requires_grad_()
        y_grouped = experts(xg, counts, torch.tensor(counts, device="cuda"))
    assert y_grouped.dtype == torch.bfloat16
    g = torch.randn_like(y_grouped)
    y_grouped.backward(g)
    grads_grouped = (xg.grad, experts.w_up.grad.clone(), experts.w_down.grad.clone())
    experts.zero_grad(set_to_none=True)

    # The loop over experts on the same bf16 operands (the CPU path, forced here).
    xl = x.clone().requires_grad_()
    bf = torch.bfloat16
    y_loop = LoopedSwiGLU.apply(xl.to(bf), experts.w_up.to(bf), experts.w_down.to(bf), counts)
    y_loop.backward(g)
    grads_loop = (xl.grad, experts.w_up.grad, experts.w_down.grad)

    # bf16 GEMMs with fp32 accumulation in both; the orders of accumulation differ: bf16-rounding tolerance.
    torch.testing.assert_close(y_grouped.float(), y_loop.float(), rtol=2e-2, atol=2e-3)
    for a, b, name in zip(grads_grouped, grads_loop, ("x", "w_up", "w_down"), strict=True):
        scale = b.float().abs().max().item()
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * scale, msg=name)
    for e in (1, 3, 4):  # an expert without rows gets a zero gradient, not garbage
        assert grads_grouped[1][e].abs().max() == 0 and grads_grouped[2][e].abs().max() == 0


def run_steps(cfg, steps: int, compiled: bool = False) -> list[float]:
    torch.manual_seed(cfg.train.seed)
    model = Decoder(cfg.model, cfg.moe).cuda()
    model.init_weights()
    if compiled:
        apply_compile(model)
    optimizer = build_optimizer(model, cfg.optim)
    data = build_data(cfg.data, cfg.train.seed)
    amp = autocast_context(torch.device("cuda"), cfg.train.dtype)
    tc = cfg.train
    losses = []
    for step in range(steps):
        batch = data.global_batch(step * tc.global_batch_size, tc.global_batch_size).cuda()
        result = train_step(model, optimizer, list(batch.split(tc.micro_batch_size)), cfg.optim.clip_grad, amp)
        losses.append(result.loss.item())
    return losses


def test_bf16_training_of_tiny_cpu_lowers_the_loss():
    cfg = tiny(["train.dtype=bf16"])
    losses = run_steps(cfg, 40)
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5


def test_compile_on_cuda_matches_eager_in_fp32_and_trains_in_bf16():
    torch._dynamo.reset()
    cfg = tiny([*SMALL, "train.dtype=fp32"])
    torch.manual_seed(0)
    eager = Decoder(cfg.model, cfg.moe).cuda()
    eager.init_weights()
    compiled = copy.deepcopy(eager)
    apply_compile(compiled)
    tokens = torch.randint(0, cfg.model.vocab_size, (4, 65), device="cuda")
    results = []
    for model in (eager, compiled):
        out = model(tokens[:, :-1])
        loss = F.cross_entropy(out.logits_BSV.flatten(0, 1), tokens[:, 1:].flatten()) + out.aux_loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_e, grads_e), (loss_c, grads_c) = results
    # fp32, TF32 off (torch's default for matmuls): rounding differences of fused kernels only.
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=0)
    for name, g in grads_e.items():
        torch.testing.assert_close(grads_c[name], g, rtol=0, atol=1e-4 * g.abs().max().item() + 1e-12, msg=name)
    losses = run_steps(tiny([*SMALL, "train.dtype=bf16"]), 15, compiled=True)
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_one_host_sync_per_moe_layer_under_sync_debug_mode(dtype):
    cfg = tiny(["train.dtype=" + dtype])
    torch.manual_seed(0)
    model = Decoder(cfg.model, cfg.moe).cuda()
    model.init_weights()
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 65), device="cuda")
    amp = autocast_context(torch.device("cuda"), dtype)

    def forward_backward():
        with amp:
            out = model(tokens[:, :-1])
            loss = F.cross_entropy(out.logits_BSV.flatten(0, 1).float(), tokens[:, 1:].flatten()) + out.aux_loss
        loss.backward()

    forward_backward()  # first-call work (allocator, cuBLAS handles) is not the hot path
    torch.cuda.synchronize()
    num_moe = sum(block.is_moe for block in model.layers.values())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            forward_backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    # The dispatcher's read of the rows per expert, once per MoE layer; nothing in the backward.
    assert len(syncs) == num_moe, [str(w.message) for w in syncs]
    # Under "error" that one read is what raises: the dispatcher's, in the forward.
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            forward_backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_peak_memory_and_throughput_are_reported():
    from bench.train_throughput import run_preset

    r = run_preset("tiny-cpu", steps=2, warmup=1, device_name="cuda")
    assert r["memory_kind"] == "max allocated (CUDA)"
    # At least the fp32 weights, their gradients and Adam's two moments: 16 bytes per parameter.
    assert r["memory_gb"] * 1e9 >= 16 * r["params"]
    assert r["tokens_per_s"] > 0 and r["tflops"] > 0
    if r["peak_name"] is not None:
        assert 0 < r["mfu"] < 1
