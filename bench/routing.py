"""Controlled routing for the layer benchmarks: MoE++ / vanilla layers at the paper's shapes whose routers produce
exactly the assignment mix a tau gives at balance (spec §4), or a mix recorded from a trained checkpoint.

The router still does all of its own work (logits, gating residual, softmax, top-k, balance loss); a fixed [T, E]
offset is added to its logits so that top-k picks the prescribed experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from model.config import MoEConfig
from model.moe import MoELayer
from model.routers import MoEppRouter

HIDDEN, FFN = 768, 2048  # paper §6: hidden 768, FFN 2048 per expert for 0.6B, 1B and 2B
# (name, FFN experts, zero, copy, constant): the paper's (8+4), (16+4) and (32+8) layers.
SHAPES = [("(8+4)", 8, 1, 1, 2), ("(16+4)", 16, 1, 1, 2), ("(32+8)", 32, 1, 1, 6)]
TAUS = [0.1, 0.25, 0.5, 0.75, 1.0]
# Logit offsets: a token's first choice, second choice, everything else. The gap (19) is far larger than the
# router's own logits at init (std ~0.5), so top-2 always returns the prescribed pair.
FIRST, SECOND = 20.0, 19.0


def ffn_share(tau: float, n_ffn: int, n_zc: int) -> float:
    """Share of assignments that go to FFN experts at balance: tau*N_ffn / (tau*N_ffn + N_zc) (spec §4)."""
    return tau * n_ffn / (tau * n_ffn + n_zc)


def moe_config(n_ffn: int, n_zero: int, n_copy: int, n_const: int, tau: float = 0.75) -> MoEConfig:
    """MoE++ layer config; with n_zero = n_copy = n_const = 0 the vanilla twin (no gating residual)."""
    zc = n_zero + n_copy + n_const
    return MoEConfig(
        num_experts=n_ffn,
        num_zero_experts=n_zero,
        num_copy_experts=n_copy,
        num_constant_experts=n_const,
        top_k=2,
        expert_ffn_hidden_size=FFN,
        gating_residual=zc > 0,
        tau=tau,
    )


def balanced_assignments(
    num_tokens: int, n_ffn: int, n_zc: int, share: float, top_k: int = 2, seed: int = 0
) -> np.ndarray:
    """[T, K] expert ids with round(share*T*K) FFN assignments spread evenly over the FFN experts, the rest spread
    evenly over the zero-computation experts (ids n_ffn..), and no token given the same expert twice."""
    rng = np.random.default_rng(seed)
    total = num_tokens * top_k
    n_ffn_assign = round(share * total)
    ffn = np.arange(n_ffn_assign) % n_ffn
    zc = n_ffn + np.arange(total - n_ffn_assign) % max(n_zc, 1)
    flat = rng.permutation(np.concatenate([ffn, zc]))
    idx = flat.reshape(top_k, num_tokens).T.copy()
    # Repair tokens that drew one expert twice by swapping their second pick with another token's: the per-expert
    # counts are unchanged. A few passes suffice (collisions are rare and swaps rarely create new ones).
    for _ in range(100):
        bad = np.flatnonzero(idx[:, 0] == idx[:, 1])
        if len(bad) == 0:
            return idx
        for t in bad:
            for u in rng.permutation(num_tokens)[:64]:
                if idx[u, 1] != idx[t, 0] and idx[t, 1] != idx[u, 0]:
                    idx[t, 1], idx[u, 1] = idx[u, 1], idx[t, 1]
                    break
    raise RuntimeError("could not build a collision-free assignment")


def logit_offsets(expert_idx_TK: np.ndarray, num_experts: int) -> Tensor:
    """[T, E] fp32: FIRST for each token's first expert, SECOND for its second, 0 elsewhere."""
    t = torch.arange(len(expert_idx_TK))
    idx = torch.from_numpy(expert_idx_TK)
    offsets = torch.zeros(len(expert_idx_TK), num_experts)
    offsets[t, idx[:, 0]] = FIRST
    offsets[t, idx[:, 1]] = SECOND
    return offsets


class ControlledRouter(MoEppRouter):
    """The real router plus a fixed logit offset that decides its top-k (see the module docstring)."""

    offsets_TE: Tensor

    def logits(self, x_TD: Tensor, prev_logits_TE: Tensor | None) -> Tensor:
        return super().logits(x_TD, prev_logits_TE) + self.offsets_TE


def control(layer: MoELayer, expert_idx_TK: np.ndarray) -> None:
    """Swap the layer's router for a ControlledRouter (same weights) that routes token t to expert_idx_TK[t]."""
    old = layer.router
    router = ControlledRouter(old.wg.in_features, old.cfg, old.gate_map is not None)
    router.load_state_dict(old.state_dict())
    router.register_buffer("offsets_TE", logit_offsets(expert_idx_TK, old.cfg.num_total_experts), persistent=False)
    layer.router = router.to(next(old.parameters()).device)


@dataclass
class LayerPair:
    """An MoE++ layer and its vanilla twin sharing the same FFN expert weights."""

    moepp: MoELayer
    vanilla: MoELayer
    n_ffn: int
    n_zc: int

    def to(self, device: torch.device | str) -> LayerPair:
        self.moepp.to(device)
        self.vanilla.to(device)
        return self


def build_pair(n_ffn: int, n_zero: int, n_copy: int, n_const: int, seed: int = 0) -> LayerPair:
    torch.manual_seed(seed)
    # has_residual: a layer after the first, as 11 of the paper's 12 MoE++ layers are (its router pays the E x E
    # gating-residual matmul).
    moepp = MoELayer(HIDDEN, moe_config(n_ffn, n_zero, n_copy, n_const), FFN, has_residual=True)
    vanilla = MoELayer(HIDDEN, moe_config(n_ffn, 0, 0, 0), FFN, has_residual=False)
    vanilla.experts.load_state_dict(moepp.experts.state_dict())
    return LayerPair(moepp.eval(), vanilla.eval(), n_ffn, n_zero + n_copy + n_const)
