"""The vanilla top-k router (moe.router.kind: topk; Switch, Mixtral, DeepSeekMoE): p = softmax(W x) over the
experts, each token takes the k most probable.

It is the MoE++ router without the gating residual (the config refuses one for this kind), so the logits, the
optional std-norm, the two-layer gate and the capacity are MoE++'s (model/routers/moepp.py). Gates: the top-k
probabilities (router.gate_convention, as for moepp) or, with router.mixtral_gating, Mixtral's softmax over the k
chosen scores only, g_tk = exp(s_tk) / sum_k' exp(s_tk'), which sums to 1 per token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from model.routers.moepp import MoEppRouter


class TopKRouter(MoEppRouter):
    def gates(
        self, logits_TE: Tensor, scores_TE: Tensor, probs_TE: Tensor, expert_idx_TK: Tensor
    ) -> tuple[Tensor, Tensor]:
        if not self.cfg.router.mixtral_gating:
            return super().gates(logits_TE, scores_TE, probs_TE, expert_idx_TK)
        gates = scores_TE.gather(1, expert_idx_TK).softmax(dim=-1)
        return gates, torch.ones_like(expert_idx_TK, dtype=torch.bool)
