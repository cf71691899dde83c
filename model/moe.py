"""The MoE++ layer: route -> dispatcher.dispatch -> FFN experts -> dispatcher.combine, plus the zero-computation
experts computed right here so they can never enter a dispatcher (and so never an all-to-all). They are computed
while the dispatch is pending and the shared experts while the combine is: under expert parallelism that work
overlaps the all-to-alls (model/dispatch.py); the layer itself knows nothing of ranks.

With zero zero-computation experts and no gating residual this is a plain top-k MoE.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from model.config import MoEConfig
from model.dispatch import AllToAllBytes, LocalDispatcher
from model.experts import ConstantExperts, DenseFFN, FFNExperts, compute_dtype
from model.routers import build_router


@dataclass
class RoutingStats:
    """Per-layer routing counters. Tensors stay on the device (detached) until the logger reads them."""

    expert_counts_E: Tensor  # kept assignments per expert, expert order [FFN, constant, copy, zero]
    dropped: Tensor  # assignments dropped by the capacity limit
    num_tokens: int
    # What this rank's dispatch and combine all-to-alls moved in the forward (all 0 on a single device).
    a2a: AllToAllBytes = field(default_factory=AllToAllBytes)
    # Each balance term of this layer, unweighted and detached (summed when micro-batches are merged).
    aux_terms: dict[str, Tensor] = field(default_factory=dict)


class MoELayer(nn.Module):
    """One MoE++ layer: y = sum over a token's kept assignments of gate * expert(x), plus the shared experts.

    FFN experts are SwiGLU and run behind `dispatcher`; zero experts give 0, copy experts x, constant experts
    a1 x + a2 v with [a1, a2] = softmax(W_c x), all computed here. `router` (model/routers/, by moe.router.kind)
    chooses the experts and their gates; has_residual: it adds the previous MoE layer's logits (gating residual).
    Which ranks hold which experts or tokens is the dispatcher's and the router's comm's business, never this layer's.
    """

    def __init__(self, hidden_size: int, cfg: MoEConfig, ffn_hidden_size: int, has_residual: bool) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_ffn = cfg.num_experts
        self.first_constant = cfg.num_experts
        self.first_copy = self.first_constant + cfg.num_constant_experts
        self.first_zero = self.first_copy + cfg.num_copy_experts
        self.router = build_router(hidden_size, cfg, has_residual)
        self.experts = FFNExperts(cfg.num_experts, hidden_size, cfg.expert_ffn_hidden_size or ffn_hidden_size)
        self.constant = ConstantExperts(cfg.num_constant_experts, hidden_size) if cfg.num_constant_experts else None
        # Shared experts see every token unweighted; tensor parallelism shards them like a dense FFN.
        shared_width = cfg.shared_ffn_hidden_size(ffn_hidden_size)
        self.shared = DenseFFN(hidden_size, shared_width) if shared_width else None
        # Not a submodule and not state: parallel/expert_parallel.py swaps it for the all-to-all dispatcher.
        self.dispatcher = LocalDispatcher()

    def forward(
        self, x_TD: Tensor, prev_logits_TE: Tensor | None, num_sequences: int = 1
    ) -> tuple[Tensor, Tensor, Tensor, RoutingStats]:
        """x_TD: num_sequences sequences of equal length, flattened. Returns (output [T, D], router logits for the
        next MoE layer [T, E], weighted balance loss, stats)."""
        route = self.router(x_TD, prev_logits_TE, num_sequences)
        T, K = route.expert_idx_TK.shape
        # Never in place: x_TD needs its gradient.
        x_in = x_TD * K if self.cfg.scale_input_by_topk else x_TD

        expert_idx_A = route.expert_idx_TK.reshape(-1)
        gates_A = route.gates_TK.reshape(-1)
        kept_A = route.kept_TK.reshape(-1)

        # Sort assignments by expert once; every non-FFN (or dropped) assignment gets the sentinel key num_ffn
        # and lands after the FFN ones, where the dispatcher never looks.
        key_A = torch.where((expert_idx_A < self.num_ffn) & kept_A, expert_idx_A, self.num_ffn)
        order_A = torch.argsort(key_A, stable=True)
        # Kept assignments per expert. scatter_add rather than bincount: CUDA's bincount reads the maximum back to
        # size its output (a host sync); the dispatcher's read of the FFN part is the layer's only one.
        counts = torch.zeros(self.cfg.num_total_experts, dtype=torch.long, device=x_TD.device)
        counts.scatter_add_(0, expert_idx_A, kept_A.long())
        tokens_per_expert = counts[: self.num_ffn]
        token_idx_A = order_A // K
        out, shared, traffic = self.routed_experts(
            x_in, x_TD, route.expert_idx_TK, route.gates_TK, gates_A, order_A, token_idx_A, tokens_per_expert
        )

        stats = RoutingStats(
            expert_counts_E=counts.detach(),
            dropped=(T * K - kept_A.sum()).detach(),
            num_tokens=T,
            a2a=traffic,
            aux_terms={k: v.detach() for k, v in route.aux_terms.items()},
        )
        out = out.to(x_TD.dtype)
        if shared is not None:
            out = out + shared
        return out, route.logits_TE, route.aux_loss, stats

    # Under train.compile (parallel/compile.py) this is where each block's graph breaks: the rows per expert are
    # data-dependent (the dispatcher's host read sizes every tensor from here to the combine), so the section runs
    # eagerly and the block's code before it (attention, norms, router, sort) and after it are compiled graphs.
    @torch.compiler.disable
    def routed_experts(
        self,
        x_in: Tensor,
        x_TD: Tensor,
        expert_idx_TK: Tensor,
        gates_TK: Tensor,
        gates_A: Tensor,
        order_A: Tensor,
        token_idx_A: Tensor,
        tokens_per_expert: Tensor,
    ) -> tuple[Tensor, Tensor | None, AllToAllBytes]:
        """Dispatch -> FFN experts -> combine, with the zero-computation experts computed while the dispatch is
        pending and the shared experts while the combine is. Returns (fp32 weighted sum of every expert's output
        [T, D], shared experts' output or None, the all-to-all traffic)."""
        # The rows travel in the experts' compute dtype (bf16 under bf16 autocast), not the fp32 residual's.
        dispatched = self.dispatcher.dispatch(x_in, token_idx_A, tokens_per_expert, compute_dtype(x_in))
        # Needs no other rank, so it runs while an asynchronous dispatcher moves the rows (and, in the backward,
        # their gradients): the overlap only zero-computation experts give.
        out = self.zero_computation_output(x_in, expert_idx_TK, gates_TK)
        y_AD = self.experts(dispatched.x_AD.wait(), dispatched.tokens_per_expert, dispatched.counts_E)
        coming_home = self.dispatcher.combine(y_AD, dispatched)
        # Likewise while the expert outputs travel home.
        shared = self.shared(x_TD) if self.shared is not None else None
        y_AD = coming_home.wait()
        n = y_AD.shape[0]
        # In place: `out` is a fresh sum whose value no backward needs, and a copy of [T, D] per layer is waste.
        # fp32: each token's expert outputs are weighted and summed in fp32 (and so are the gates' gradients).
        out.index_add_(0, token_idx_A[:n], y_AD.float() * gates_A[order_A[:n], None])

        return out, shared, dispatched.traffic

    def zero_computation_output(self, x_TD: Tensor, expert_idx_TK: Tensor, gates_TK: Tensor) -> Tensor:
        """Weighted sum of the copy and constant experts' outputs per token, fp32 [T, D]. Zero experts add nothing.

        Written as per-token coefficients (dense over tokens, no gather/scatter of D-wide rows and no host sync):
        out = c_x * x + sum_c coef_c * a2_c * v_c, with c_x = sum of copy gates + sum_c coef_c * a1_c."""
        if self.first_zero == self.first_constant:
            # No copy or constant expert (a vanilla layer, or zero experts only): nothing to add.
            return x_TD.new_zeros(x_TD.shape, dtype=torch.float32)
        is_copy = (expert_idx_TK >= self.first_copy) & (expert_idx_TK < self.first_zero)
        x_coef_T = (gates_TK * is_copy).sum(dim=-1)
        v_coef_TC = None
        if self.constant is not None:
            n_const = self.cfg.num_constant_experts
            is_const = (expert_idx_TK >= self.first_constant) & (expert_idx_TK < self.first_copy)
            slot_TK = (expert_idx_TK - self.first_constant).clamp(0, n_const - 1)
            gate_TC = gates_TK.new_zeros(gates_TK.shape[0], n_const).scatter_add(1, slot_TK, gates_TK * is_const)
            a_TC2 = self.constant.mix(x_TD)
            x_coef_T = x_coef_T + (gate_TC * a_TC2[..., 0]).sum(dim=-1)
            v_coef_TC = gate_TC * a_TC2[..., 1]
        out = x_TD.float() * x_coef_T[:, None]
        # One [T, D] buffer for the whole sum: the v term is accumulated in place (addmm_), not built as a second
        # [T, D] tensor and added (that cost two more full-size passes; bench/expert_forward.py). Safe for autograd:
        # the product's backward needs its inputs, not `out`.
        return out if v_coef_TC is None else out.addmm_(v_coef_TC, self.constant.v.float())
