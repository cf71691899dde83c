"""Model FLOPs of a training step, TFLOP/s and MFU, counted from the config and the routing actually observed.

Per token, forward, one multiply-add = 2 FLOPs (D hidden, H query heads, G key/value heads, Dh head dim, S sequence
length, F dense FFN width, Fe expert width, E all experts, V vocabulary):

    attention      per layer   2*D*(2*H*Dh + 2*G*Dh)       q, k, v, o projections
                             + 2*2*S*H*Dh                  scores QK^T and weighted sum AV over the full S x S
                                                           matrix (PaLM / Megatron convention; a causal kernel
                                                           does about half of it)
    dense FFN      per dense layer   2*3*D*F               SwiGLU: gate, up, down
    router         per MoE layer     2*D*E                 (+ 2*E*E gating residual, two-layer: 2*D*8E + 2*8E*E)
    FFN experts    per MoE layer     n_ffn * 2*3*D*Fe      n_ffn = FFN experts per token *of that layer*: its kept
                                                           FFN assignments over its tokens, from the routing
                                                           counters (top_k for vanilla MoE without drops)
    shared experts per MoE layer     K_s * 2*3*D*Fe        every token (moe.shared_experts)
    constant exp.  per MoE layer     2*3*D*n_const         W_c x ([2, D] each) and the v term
    LM head                          2*D*V                 (embedding lookup: 0)

Copy and zero experts cost nothing, so an MoE++ step counts fewer FLOPs than its vanilla twin's. A training step
costs 3x the forward (backward = 2x forward; no activation recomputation). MFU = achieved model FLOP/s per device /
the device's dense bf16 peak.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from model.config import ModelConfig, MoEConfig

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s per GPU: NVIDIA's data sheets list bf16 "with sparsity";
# these are half of those figures (H100 SXM 1,979 -> 989.4, H100 PCIe 1,513 -> 756.5, H100/H200 NVL 1,671 ->
# 835.5, H200 SXM 1,979 -> 989.4, B200 (HGX B200) 4,500 -> 2,250; A100's sheet gives 312 dense, 624 sparse).
BF16_PEAK_TFLOPS = {
    "H100 SXM": 989.4,
    "H100 PCIe": 756.5,
    "H100 NVL": 835.5,
    "H200": 989.4,
    "H200 NVL": 835.5,
    "A100": 312.0,
    "B200": 2250.0,
}


@dataclass
class FlopBreakdown:
    """Forward FLOPs per token, by part."""

    attention: float = 0.0
    dense_ffn: float = 0.0
    router: float = 0.0
    experts: float = 0.0
    constant: float = 0.0
    head: float = 0.0

    @property
    def forward(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self))

    @property
    def train(self) -> float:
        return 3 * self.forward


def flops_per_token(
    model: ModelConfig, moe: MoEConfig, seq_len: int, ffn_per_token: list[float] | float | None = None
) -> FlopBreakdown:
    """ffn_per_token: FFN experts per token of each MoE layer (a list, in layer order) or one value for all;
    None means top_k (every assignment on an FFN expert, as in a vanilla MoE)."""
    D, H, G, Dh = model.hidden_size, model.num_heads, model.kv_heads, model.head_dim
    moe_layers = [i for i in range(model.num_layers) if moe.is_moe_layer(i)]
    if ffn_per_token is None:
        ffn_per_token = float(min(moe.top_k, moe.num_experts))
    per_layer = ffn_per_token if isinstance(ffn_per_token, list) else [ffn_per_token] * len(moe_layers)
    if len(per_layer) != len(moe_layers):
        raise ValueError(f"ffn_per_token has {len(per_layer)} values for {len(moe_layers)} MoE layers")
    b = FlopBreakdown()
    b.attention = model.num_layers * (2 * D * (2 * H * Dh + 2 * G * Dh) + 2 * 2 * seq_len * H * Dh)
    b.dense_ffn = (model.num_layers - len(moe_layers)) * 2 * 3 * D * model.ffn_hidden_size
    E, Fe = moe.num_total_experts, moe.expert_ffn_hidden_size or model.ffn_hidden_size
    for j, n_ffn in enumerate(per_layer):
        b.router += 2 * D * 8 * E + 2 * 8 * E * E if moe.router.two_layer else 2 * D * E  # etr: the cosine, alike
        if moe.gating_residual and j > 0:  # the first MoE layer has no residual term
            b.router += 2 * E * E
        b.experts += (n_ffn + moe.shared_experts) * 2 * 3 * D * Fe
        b.constant += 2 * 3 * D * moe.num_constant_experts
    b.head = 2 * D * model.vocab_size
    return b


def peak_tflops(device_name: str) -> tuple[str, float] | None:
    """(table entry, dense bf16 peak) for a CUDA device name such as 'NVIDIA H100 80GB HBM3', or None."""
    name = device_name.upper()
    for chip in ("H200", "H100"):
        if chip in name:
            if "NVL" in name:
                key = f"{chip} NVL"
            elif chip == "H100":
                key = "H100 PCIe" if "PCIE" in name else "H100 SXM"
            else:
                key = chip
            return key, BF16_PEAK_TFLOPS[key]
    for chip in ("B200", "A100"):
        if chip in name:
            return chip, BF16_PEAK_TFLOPS[chip]
    return None


def device_peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """The peak MFU is measured against: `override` (logging.peak_tflops) if given, else the table entry of a known
    CUDA device, else None (CPU, unknown GPUs: TFLOP/s only)."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    known = peak_tflops(torch.cuda.get_device_name(device))
    return known[1] if known else None


def tflops_per_device(flops: FlopBreakdown, tokens_per_s: float, num_devices: int) -> float:
    """Model TFLOP/s each device achieves: the training FLOPs of the tokens processed per second, shared evenly
    by every device of the run (Megatron's per-GPU convention)."""
    return flops.train * tokens_per_s / num_devices / 1e12
