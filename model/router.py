"""MoE++ router: logits with gating residual, gate conventions, top-k, heterogeneous balance loss and capacity.

Expert index order (as in the released checkpoint): [FFN x N_ffn, constant x n_const, copy x n_copy, zero x n_zero].
All router arithmetic is fp32 whatever the autocast state, because top-k decisions are sensitive to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import MoEConfig


@dataclass
class RouterOutput:
    # Pre-normalisation logits including this layer's residual term: what the next MoE layer receives.
    logits_TE: Tensor
    probs_TE: Tensor
    expert_idx_TK: Tensor
    # Gate weights of the chosen experts, fp32; dropped assignments already have gate 0.
    gates_TK: Tensor
    # False for assignments dropped by the capacity limit.
    kept_TK: Tensor
    balance_loss: Tensor


class Router(nn.Module):
    def __init__(self, hidden_size: int, cfg: MoEConfig, has_residual: bool) -> None:
        super().__init__()
        self.cfg = cfg
        n = cfg.num_total_experts
        if cfg.router.two_layer:
            self.wg: nn.Module = nn.Sequential(
                nn.Linear(hidden_size, 8 * n, bias=False), nn.Tanh(), nn.Linear(8 * n, n, bias=False)
            )
        else:
            self.wg = nn.Linear(hidden_size, n, bias=False)
        self.gate_map = nn.Linear(n, n, bias=False) if has_residual else None
        # eta_i of the heterogeneous balance loss: 1 for FFN experts, tau for zero-computation experts.
        eta = torch.ones(n)
        eta[cfg.num_experts :] = cfg.tau
        self.register_buffer("eta_E", eta, persistent=False)
        # Sums the balance statistics over the ranks that hold other tokens of the same micro-batch (sequence
        # parallelism installs it; model/ itself never communicates). Its backward must be the identity.
        self.stats_reducer: Callable[[Tensor], Tensor] | None = None

    def compute_logits(self, x_TD: Tensor, prev_logits_TE: Tensor | None) -> Tensor:
        """G_j = W_j x + Wg_j G_{j-1} in fp32 (no residual term when this layer has no gate_map)."""
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            x = x_TD.float()
            if isinstance(self.wg, nn.Linear):
                logits = F.linear(x, self.wg.weight.float())
            else:
                first, _, second = self.wg
                logits = F.linear(torch.tanh(F.linear(x, first.weight.float())), second.weight.float())
            if self.gate_map is not None:
                if prev_logits_TE is None:
                    raise ValueError("this MoE layer has a gating residual but received no previous router logits")
                logits = logits + F.linear(prev_logits_TE.float(), self.gate_map.weight.float())
        return logits

    def forward(self, x_TD: Tensor, prev_logits_TE: Tensor | None) -> RouterOutput:
        cfg = self.cfg
        logits = self.compute_logits(x_TD, prev_logits_TE)
        scores = logits
        if cfg.router.logits_std_norm:
            # The residual handed to the next layer stays the un-normalised `logits`.
            scores = logits / (logits.std(dim=-1, keepdim=True) / cfg.router.target_std)
        probs = scores.softmax(dim=-1)
        top_p, expert_idx = probs.topk(cfg.top_k, dim=-1)
        gates = self.apply_gate_convention(top_p, expert_idx)
        # Capacity is a training device (spec §3): evaluation and inference stay dropless and batch-independent.
        kept = (
            self.capacity_mask(expert_idx)
            if cfg.capacity_factor is not None and self.training
            else torch.ones_like(gates, dtype=torch.bool)
        )
        gates = gates * kept
        return RouterOutput(logits, probs, expert_idx, gates, kept, self.balance_loss(probs, expert_idx))

    def apply_gate_convention(self, top_p_TK: Tensor, expert_idx_TK: Tensor) -> Tensor:
        if self.cfg.router.gate_convention == "paper":
            return top_p_TK
        # release: zero-expert gates are set to 0 and the remaining pair renormalised, so {zero, X} gives X weight 1.
        # A token whose top-k are all zero experts keeps all-zero gates (their output is 0 anyway).
        first_zero = self.cfg.num_total_experts - self.cfg.num_zero_experts
        masked = top_p_TK * (expert_idx_TK < first_zero)
        return masked / masked.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(masked.dtype).tiny)

    def capacities(self, num_tokens: int) -> Tensor:
        """Per-expert capacity [E]: C_ffn = gamma*tau*A/(tau*N_ffn + N_zc), C_zc = gamma*A/(tau*N_ffn + N_zc),
        A = tokens * top_k; rounded up."""
        cfg = self.cfg
        assert cfg.capacity_factor is not None
        a = num_tokens * cfg.top_k
        denom = cfg.tau * cfg.num_experts + cfg.num_zc_experts
        # The 1e-9 keeps float noise (1.1 * 200 / 10 = 22.000000000000004) from adding a slot.
        c_ffn = math.ceil(cfg.capacity_factor * cfg.tau * a / denom - 1e-9)
        c_zc = math.ceil(cfg.capacity_factor * a / denom - 1e-9)
        caps = torch.full((cfg.num_total_experts,), c_zc, dtype=torch.long)
        caps[: cfg.num_experts] = c_ffn
        return caps

    def capacity_mask(self, expert_idx_TK: Tensor) -> Tensor:
        """Keep the first C_i assignments of each expert i. Priority: every token's first choice before any
        second choice (GShard), then token order. No host sync: the position of each assignment inside its
        expert's queue comes from a stable sort."""
        T, K = expert_idx_TK.shape
        E = self.cfg.num_total_experts
        caps = self.capacities(T).to(expert_idx_TK.device)
        by_priority = expert_idx_TK.t().reshape(-1)  # [K*T]: choice-major order
        order = torch.argsort(by_priority, stable=True)
        counts = torch.bincount(by_priority, minlength=E)
        group_start = torch.cumsum(counts, 0) - counts
        pos_sorted = torch.arange(order.numel(), device=order.device) - group_start[by_priority[order]]
        position = torch.empty_like(pos_sorted)
        position[order] = pos_sorted
        kept = position < caps[by_priority]
        return kept.view(K, T).t()

    def balance_loss(self, probs_TE: Tensor, expert_idx_TK: Tensor) -> Tensor:
        """L_b = sum_i eta_i * f_i * P_i; f_i = fraction of tokens whose top-k holds i (sum f = K, before any
        capacity drop), P_i = mean routing probability."""
        E = probs_TE.shape[1]
        counts = torch.bincount(expert_idx_TK.reshape(-1), minlength=E).to(probs_TE.dtype)
        stats = torch.cat([counts, probs_TE.sum(dim=0), probs_TE.new_tensor([probs_TE.shape[0]])])
        if self.stats_reducer is not None:
            stats = self.stats_reducer(stats)
        f, P = stats[:E] / stats[-1], stats[E : 2 * E] / stats[-1]
        return (self.eta_E * f * P).sum()
