"""Capacity: which assignments an expert keeps when it may take at most C of them (training only).

Two rules, both without a host sync (the position of each assignment in its expert's queue comes from a stable sort):

- Token choice with MoE++'s heterogeneous capacity (moepp and topk routers): an FFN expert keeps
  C_ffn = ceil(gamma * tau * A / (tau * N_ffn + N_zc)) assignments and a zero-computation expert
  C_zc = ceil(gamma * A / (tau * N_ffn + N_zc)), A = tokens * top_k, gamma = moe.capacity_factor (spec §3). Queue
  order: every token's first choice before any second choice (GShard), then token order.
- Expert choice (ETR): every expert keeps its C highest-scoring assignments.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from model.config import MoEConfig


def queue_positions(key_A: Tensor, order_A: Tensor, num_keys: int) -> Tensor:
    """The position of every element in the queue of its key, queues ordered by `order_A`: a stable sort of `key_A`
    (so that each key's elements are contiguous in it). Keys lie in [0, num_keys)."""
    # scatter_add rather than bincount: CUDA's bincount reads the maximum back to size its output (a host sync).
    counts = torch.zeros(num_keys, dtype=torch.long, device=key_A.device)
    counts.scatter_add_(0, key_A, torch.ones_like(key_A))
    group_start = torch.cumsum(counts, 0) - counts
    pos_sorted = torch.arange(order_A.numel(), device=order_A.device) - group_start[key_A[order_A]]
    position = torch.empty_like(pos_sorted)
    position[order_A] = pos_sorted
    return position


def capacity_limits(cfg: MoEConfig, num_tokens: int) -> tuple[int, int]:
    """(C_ffn, C_zc) for `num_tokens` tokens, rounded up."""
    assert cfg.capacity_factor is not None
    a = num_tokens * cfg.top_k
    denom = cfg.tau * cfg.num_experts + cfg.num_zc_experts
    # The 1e-9 keeps float noise (1.1 * 200 / 10 = 22.000000000000004) from adding a slot.
    c_ffn = math.ceil(cfg.capacity_factor * cfg.tau * a / denom - 1e-9)
    c_zc = math.ceil(cfg.capacity_factor * a / denom - 1e-9)
    return c_ffn, c_zc


def capacities(cfg: MoEConfig, num_tokens: int) -> Tensor:
    """Per-expert capacity [E] (a host tensor), from capacity_limits."""
    c_ffn, c_zc = capacity_limits(cfg, num_tokens)
    caps = torch.full((cfg.num_total_experts,), c_zc, dtype=torch.long)
    caps[: cfg.num_experts] = c_ffn
    return caps


def capacity_mask(expert_idx_TK: Tensor, cfg: MoEConfig) -> Tensor:
    """[T, K] bool: the first C_i assignments of each expert i in queue order (first choices, then token order)."""
    T, K = expert_idx_TK.shape
    c_ffn, c_zc = capacity_limits(cfg, T)
    by_priority = expert_idx_TK.t().reshape(-1)  # [K*T]: choice-major order
    position = queue_positions(by_priority, torch.argsort(by_priority, stable=True), cfg.num_total_experts)
    # Capacities picked on the device from two host ints (a [E] tensor built on the host would be a blocking
    # host-to-device copy).
    kept = position < torch.where(by_priority < cfg.num_experts, c_ffn, c_zc)
    return kept.view(K, T).t()


def expert_choice_mask(expert_A: Tensor, score_A: Tensor, capacity: int, num_experts: int) -> Tensor:
    """Each expert keeps the `capacity` assignments with the highest score (ties: lower index first). expert_A ==
    num_experts marks an assignment that was never made."""
    by_score = torch.argsort(-score_A, stable=True)
    order = by_score[torch.argsort(expert_A[by_score], stable=True)]
    position = queue_positions(expert_A, order, num_experts + 1)
    return (position < capacity) & (expert_A < num_experts)
