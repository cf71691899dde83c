"""The MoE++ router (moe.router.kind: moepp, the default): one softmax over the N_ffn FFN experts and the N_zc
zero-computation experts jointly, fed by the gating residual.

Logits of MoE layer j: G_j = W_j x + Wg_j G_{j-1}, with W_j [E, d] (or, with router.two_layer,
Linear(d, 8E) -> tanh -> Linear(8E, E)) and Wg_j [E, E], both bias-free; the first MoE layer has no residual term
and no Wg. G_j, including its own residual term, is what layer j+1 receives. With router.logits_std_norm the
softmax reads G_j / (std(G_j) / target_std) (unbiased std over the experts), while the residual handed on stays
G_j. Each token takes the top-k experts of p = softmax; its gates (router.gate_convention) are
- paper: the top-k probabilities as they are (not renormalised);
- release (the released 7B): the zero experts' gates set to 0 and the rest divided by their sum, so a token routed
  to {zero, X} gives X the weight 1.
Capacity in training is MoE++'s heterogeneous one (model/routers/capacity.py). Spec: ../shared/spec/moepp.md §2-3.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import MoEConfig
from model.routers.base import Router
from model.routers.capacity import capacity_mask


class MoEppRouter(Router):
    """Learned gate W (one or two layers) plus, when has_residual, the gating residual map Wg (`gate_map`)."""

    def __init__(self, hidden_size: int, cfg: MoEConfig, has_residual: bool) -> None:
        super().__init__(hidden_size, cfg)
        n = cfg.num_total_experts
        self.wg: nn.Module
        if cfg.router.two_layer:
            self.wg = nn.Sequential(
                nn.Linear(hidden_size, 8 * n, bias=False), nn.Tanh(), nn.Linear(8 * n, n, bias=False)
            )
        else:
            self.wg = nn.Linear(hidden_size, n, bias=False)
        self.gate_map = nn.Linear(n, n, bias=False) if has_residual else None

    def logits(self, x_TD: Tensor, prev_logits_TE: Tensor | None) -> Tensor:
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

    def scores(self, logits_TE: Tensor) -> Tensor:
        router = self.cfg.router
        if not router.logits_std_norm:
            return logits_TE
        # The residual handed to the next layer stays the un-normalised logits.
        return logits_TE / (logits_TE.std(dim=-1, keepdim=True) / router.target_std)

    def gates(
        self, logits_TE: Tensor, scores_TE: Tensor, probs_TE: Tensor, expert_idx_TK: Tensor
    ) -> tuple[Tensor, Tensor]:
        gates = convention_gates(probs_TE.gather(1, expert_idx_TK), expert_idx_TK, self.cfg)
        return gates, torch.ones_like(expert_idx_TK, dtype=torch.bool)

    def keep_within_capacity(self, expert_idx_TK: Tensor, gates_TK: Tensor, taken_TK: Tensor) -> Tensor:
        return capacity_mask(expert_idx_TK, self.cfg)


def convention_gates(top_p_TK: Tensor, expert_idx_TK: Tensor, cfg: MoEConfig) -> Tensor:
    """The gates of the chosen experts from their probabilities, by router.gate_convention."""
    if cfg.router.gate_convention == "paper":
        return top_p_TK
    # release: zero-expert gates are set to 0 and the remaining pair renormalised, so {zero, X} gives X weight 1.
    # A token whose top-k are all zero experts keeps all-zero gates (their output is 0 anyway).
    first_zero = cfg.num_total_experts - cfg.num_zero_experts
    masked = top_p_TK * (expert_idx_TK < first_zero)
    return masked / masked.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(masked.dtype).tiny)
