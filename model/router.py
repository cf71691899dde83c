"""Routers: MoE++ (joint softmax with gating residual), Mixtral-style top-k, and Expert-Token Resonance; their
balance losses, capacity, and the aux-loss-free selection bias.

Expert index order (as in the released checkpoint): [FFN x N_ffn, constant x n_const, copy x n_copy, zero x n_zero].
All router arithmetic is fp32 whatever the autocast state, because top-k decisions are sensitive to rounding.

The router never communicates itself. `parallel/` installs hooks when other ranks hold part of the picture:
`stats_reducer` (sequence parallelism: sum the balance statistics over tp, identity backward), `dp_reducer`
(global-batch balance: sum over data-parallel ranks, no autograd), `step_reducer` (the between-step updates: sum
over every rank that routed other tokens) and `group_gather` (ETR expert choice: concatenate per-assignment values
over the data-parallel group in rank order; returns them and this rank's first row).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model import balance
from model.config import MoEConfig
from model.recompute import once


@dataclass
class RouterOutput:
    # Pre-normalisation logits including this layer's residual term: what the next MoE layer receives. For the
    # etr router, the cosine affinities.
    logits_TE: Tensor
    probs_TE: Tensor
    expert_idx_TK: Tensor
    # Gate weights of the chosen experts, fp32; dropped assignments already have gate 0.
    gates_TK: Tensor
    # False for assignments dropped by the capacity limit (or not taken under the ETR threshold).
    kept_TK: Tensor
    # sum over moe.balance of coeff * term (what goes into the loss).
    aux_loss: Tensor
    # Each term unweighted, for logging.
    aux_terms: dict[str, Tensor] = field(default_factory=dict)


def grap_vectors(num_experts: int, hidden_size: int) -> Tensor:
    """ETR's fixed orthogonal expert vectors [E, D]: expert i is n/d on the i-th of n contiguous groups, 0 elsewhere."""
    w = torch.zeros(num_experts, hidden_size)
    for i, cols in enumerate(torch.tensor_split(torch.arange(hidden_size), num_experts)):
        w[i, cols] = num_experts / hidden_size
    return w


def expert_choice_mask(expert_A: Tensor, score_A: Tensor, capacity: int, num_experts: int) -> Tensor:
    """Each expert keeps the `capacity` assignments with the highest score (ties: lower index first). expert_A ==
    num_experts marks an assignment that was never made. No host sync."""
    by_score = torch.argsort(-score_A, stable=True)
    order = by_score[torch.argsort(expert_A[by_score], stable=True)]
    # scatter_add rather than bincount: CUDA's bincount reads the maximum back to size its output (a host sync).
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=expert_A.device)
    counts.scatter_add_(0, expert_A, torch.ones_like(expert_A))
    group_start = torch.cumsum(counts, 0) - counts
    pos_sorted = torch.arange(order.numel(), device=order.device) - group_start[expert_A[order]]
    position = torch.empty_like(pos_sorted)
    position[order] = pos_sorted
    return (position < capacity) & (expert_A < num_experts)


class Router(nn.Module):
    def __init__(self, hidden_size: int, cfg: MoEConfig, has_residual: bool) -> None:
        super().__init__()
        self.cfg = cfg
        self.kind = cfg.router.kind
        self.hidden_size = hidden_size
        n = cfg.num_total_experts
        self.wg: nn.Module | None
        if self.kind == "etr":
            self.wg = None  # GrAP vectors are fixed, not learned
            self.register_buffer("grap_ED", grap_vectors(n, hidden_size), persistent=False)
        elif cfg.router.two_layer:
            self.wg = nn.Sequential(
                nn.Linear(hidden_size, 8 * n, bias=False), nn.Tanh(), nn.Linear(8 * n, n, bias=False)
            )
        else:
            self.wg = nn.Linear(hidden_size, n, bias=False)
        self.gate_map = nn.Linear(n, n, bias=False) if has_residual else None
        # eta_i of the heterogeneous balance loss: 1 for FFN experts, tau for zero-computation experts.
        eta = torch.ones(n)
        eta[cfg.num_experts :] = cfg.tau
        self.register_buffer("eta_E", eta, persistent=False)
        weights = {t.kind: t.weight for t in cfg.balance}
        self.bias_rate = weights.pop("aux_free_bias", None)
        self.loss_weights = weights
        if self.kind == "etr" and cfg.router.etr.locality_coeff > 0:
            self.loss_weights["locality"] = cfg.router.etr.locality_coeff
        # Experts on this node (ETR locality loss); parallel/ narrows it under expert parallelism across nodes.
        self.register_buffer("local_mask_E", torch.ones(n, dtype=torch.bool), persistent=False)
        if self.bias_rate is not None:
            # Selection-only bias (aux-loss-free balancing): training state, so saved with the checkpoint, but
            # never a parameter; only after_step() changes it.
            self.register_buffer("expert_bias_E", torch.zeros(n))
        self.etr_schedule = self.kind == "etr" and cfg.router.etr.capacity_schedule == "lower_bound"
        if self.etr_schedule:
            assert cfg.capacity_factor is not None
            # [current capacity factor, optimizer steps since the last recomputation]: resumes exactly.
            self.register_buffer("etr_state", torch.tensor([cfg.capacity_factor, 0.0], dtype=torch.float64))
        self._etr_factor: float | None = None
        # Accumulators over the micro-batches of one optimizer step (cleared by after_step):
        # [selection counts E, tokens] summed over data-parallel ranks for global-batch balance, and this rank's
        # selection counts E + [sum of chosen affinities, number of choices] for the between-step updates.
        self.register_buffer("global_counts", torch.zeros(n + 1, dtype=torch.float64), persistent=False)
        self.register_buffer("step_counts", torch.zeros(n + 2, dtype=torch.float64), persistent=False)
        self.stats_reducer: Callable[[Tensor], Tensor] | None = None
        self.dp_reducer: Callable[[Tensor], Tensor] | None = None
        self.step_reducer: Callable[[Tensor], Tensor] | None = None
        self.group_gather: Callable[[Tensor], tuple[Tensor, int]] | None = None

    # -----------------------------------------------------------------------------------------------------------
    # Scores

    def compute_logits(self, x_TD: Tensor, prev_logits_TE: Tensor | None) -> Tensor:
        """G_j = W_j x + Wg_j G_{j-1} in fp32 (no residual term when this layer has no gate_map); for etr the cosine
        affinity between each token and each GrAP vector."""
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            x = x_TD.float()
            if self.wg is None:
                return F.normalize(x, dim=-1) @ F.normalize(self.grap_ED, dim=-1).t()
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

    def forward(self, x_TD: Tensor, prev_logits_TE: Tensor | None, num_sequences: int = 1) -> RouterOutput:
        cfg = self.cfg
        logits = self.compute_logits(x_TD, prev_logits_TE)
        scores = logits
        if cfg.router.logits_std_norm and self.kind != "etr":
            # The residual handed to the next layer stays the un-normalised `logits`.
            scores = logits / (logits.std(dim=-1, keepdim=True) / cfg.router.target_std)
        probs = scores.softmax(dim=-1)
        # The aux-free bias steers the choice only; gates below read the unbiased values.
        choose_by = logits if self.kind == "etr" else probs
        if self.bias_rate is not None:
            choose_by = choose_by + self.expert_bias_E
        expert_idx = choose_by.topk(cfg.top_k, dim=-1).indices
        chosen = torch.ones_like(expert_idx, dtype=torch.bool)
        if self.kind == "etr":
            gates = logits.gather(1, expert_idx)  # the affinity itself weighs the expert's output
            if cfg.router.etr.threshold is not None:
                # Token choice stops at the smallest l whose cumulative affinity reaches the threshold.
                before = torch.cumsum(gates, dim=-1) - gates
                chosen = before < cfg.router.etr.threshold
                chosen[:, 0] = True
                gates = gates * chosen
        elif self.kind == "topk" and cfg.router.mixtral_gating:
            gates = scores.gather(1, expert_idx).softmax(dim=-1)
        else:
            gates = self.apply_gate_convention(probs.gather(1, expert_idx), expert_idx)
        if self.training:
            # once: a recomputed forward (activation checkpointing) must not count this micro-batch twice.
            once(lambda: self.accumulate(expert_idx, chosen, gates))
        # Capacity is a training device (spec §3): evaluation and inference stay dropless and batch-independent.
        kept = chosen
        if cfg.capacity_factor is not None and self.training:
            if self.kind == "etr":
                kept = self.etr_expert_choice(expert_idx, gates.detach(), chosen)
            else:
                kept = self.capacity_mask(expert_idx)
        gates = gates * kept
        aux_loss, terms = self.aux_losses(scores, probs, expert_idx, chosen, num_sequences)
        return RouterOutput(logits, probs, expert_idx, gates, kept, aux_loss, terms)

    def apply_gate_convention(self, top_p_TK: Tensor, expert_idx_TK: Tensor) -> Tensor:
        if self.cfg.router.gate_convention == "paper":
            return top_p_TK
        # release: zero-expert gates are set to 0 and the remaining pair renormalised, so {zero, X} gives X weight 1.
        # A token whose top-k are all zero experts keeps all-zero gates (their output is 0 anyway).
        first_zero = self.cfg.num_total_experts - self.cfg.num_zero_experts
        masked = top_p_TK * (expert_idx_TK < first_zero)
        return masked / masked.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(masked.dtype).tiny)

    # -----------------------------------------------------------------------------------------------------------
    # Capacity

    def capacity_limits(self, num_tokens: int) -> tuple[int, int]:
        """(C_ffn, C_zc): C_ffn = gamma*tau*A/(tau*N_ffn + N_zc), C_zc = gamma*A/(tau*N_ffn + N_zc),
        A = tokens * top_k; rounded up."""
        cfg = self.cfg
        assert cfg.capacity_factor is not None
        a = num_tokens * cfg.top_k
        denom = cfg.tau * cfg.num_experts + cfg.num_zc_experts
        # The 1e-9 keeps float noise (1.1 * 200 / 10 = 22.000000000000004) from adding a slot.
        c_ffn = math.ceil(cfg.capacity_factor * cfg.tau * a / denom - 1e-9)
        c_zc = math.ceil(cfg.capacity_factor * a / denom - 1e-9)
        return c_ffn, c_zc

    def capacities(self, num_tokens: int) -> Tensor:
        """Per-expert capacity [E] (host tensor), from capacity_limits."""
        cfg = self.cfg
        c_ffn, c_zc = self.capacity_limits(num_tokens)
        caps = torch.full((cfg.num_total_experts,), c_zc, dtype=torch.long)
        caps[: cfg.num_experts] = c_ffn
        return caps

    def capacity_mask(self, expert_idx_TK: Tensor) -> Tensor:
        """Keep the first C_i assignments of each expert i. Priority: every token's first choice before any
        second choice (GShard), then token order. No host sync: the position of each assignment inside its
        expert's queue comes from a stable sort."""
        T, K = expert_idx_TK.shape
        E = self.cfg.num_total_experts
        c_ffn, c_zc = self.capacity_limits(T)
        by_priority = expert_idx_TK.t().reshape(-1)  # [K*T]: choice-major order
        order = torch.argsort(by_priority, stable=True)
        # scatter_add rather than bincount: CUDA's bincount reads the maximum back to size its output (a host sync).
        counts = torch.zeros(E, dtype=torch.long, device=by_priority.device)
        counts.scatter_add_(0, by_priority, torch.ones_like(by_priority))
        group_start = torch.cumsum(counts, 0) - counts
        pos_sorted = torch.arange(order.numel(), device=order.device) - group_start[by_priority[order]]
        position = torch.empty_like(pos_sorted)
        position[order] = pos_sorted
        # Capacities picked on the device from two host ints (a [E] tensor built on the host would be a blocking
        # host-to-device copy).
        kept = position < torch.where(by_priority < self.cfg.num_experts, c_ffn, c_zc)
        return kept.view(K, T).t()

    def etr_capacity_factor(self) -> float:
        if not self.etr_schedule:
            assert self.cfg.capacity_factor is not None
            return self.cfg.capacity_factor
        if self._etr_factor is None:
            # host-device sync: once per optimizer step (after_step clears the cached value).
            self._etr_factor = float(self.etr_state[0])
        return self._etr_factor

    def etr_capacity(self, group_tokens: int) -> int:
        """C = ceil(factor * tokens * top_k / E) over the tokens of the whole data-parallel batch."""
        cfg = self.cfg
        return math.ceil(self.etr_capacity_factor() * group_tokens * cfg.top_k / cfg.num_total_experts - 1e-9)

    def etr_expert_choice(self, expert_idx_TK: Tensor, affinity_TK: Tensor, chosen_TK: Tensor) -> Tensor:
        """ETR expert choice: every expert keeps the C highest-affinity tokens among those that chose it, counted
        over the whole data-parallel batch (gathered in rank order, so the result equals the single process on the
        concatenated tokens whatever the layout)."""
        T, K = expert_idx_TK.shape
        E = self.cfg.num_total_experts
        expert_A = torch.where(chosen_TK, expert_idx_TK, E).reshape(-1)
        score_A = affinity_TK.reshape(-1)
        offset = 0
        if self.group_gather is not None:
            pairs = torch.stack([expert_A.to(score_A.dtype), score_A], dim=1)
            # once: a recomputed forward replays the gathered pairs instead of gathering again.
            both, offset = once(lambda: self.group_gather(pairs))
            expert_A, score_A = both[:, 0].long(), both[:, 1]
        keep = expert_choice_mask(expert_A, score_A, self.etr_capacity(expert_A.numel() // K), E)
        return keep[offset : offset + T * K].view(T, K)

    # -----------------------------------------------------------------------------------------------------------
    # Balance losses

    def aux_losses(
        self, scores_TE: Tensor, probs_TE: Tensor, expert_idx_TK: Tensor, chosen_TK: Tensor, num_sequences: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """sum over moe.balance of coeff * term, and the unweighted terms. The statistics are one vector so that a
        single reduction (sequence parallelism) covers them all."""
        T, E = probs_TE.shape
        K = self.cfg.top_k
        weights = self.loss_weights
        if not weights:
            return probs_TE.new_zeros(()), {}
        sel_TE = torch.zeros_like(probs_TE).scatter_add_(1, expert_idx_TK, chosen_TK.to(probs_TE.dtype))
        parts = [sel_TE.sum(dim=0), probs_TE.sum(dim=0), probs_TE.new_full((1,), T)]  # new_full: no host copy
        if "zloss" in weights:
            parts.append(torch.logsumexp(scores_TE, dim=-1).square().sum()[None])
        if "seq" in weights:
            B = num_sequences
            parts += [sel_TE.view(B, -1, E).sum(dim=1).reshape(-1), probs_TE.view(B, -1, E).sum(dim=1).reshape(-1)]
        stats = torch.cat(parts)
        if self.stats_reducer is not None:
            stats = self.stats_reducer(stats)
        counts, P, tokens = stats[:E], stats[E : 2 * E] / stats[2 * E], stats[2 * E]
        f = counts / tokens
        if self.cfg.balance_scope == "global_batch" and self.training:
            # Counts of the step's micro-batches so far on every data-parallel rank (Megatron's global aux loss);
            # the last micro-batch sees the whole global batch. P stays local and carries the gradient.
            mine = torch.cat([counts, tokens[None]]).detach().double()

            def add_to_step_counts() -> Tensor:
                self.global_counts += self.dp_reducer(mine) if self.dp_reducer is not None else mine
                return self.global_counts.clone()

            # once: a recomputed forward (activation checkpointing) sees the counts this forward saw, adds nothing
            # and runs no all-reduce, even when later micro-batches have been added since (pipeline schedules).
            step_counts = once(add_to_step_counts)
            f = (step_counts[:E] / step_counts[E]).to(P.dtype)
        terms: dict[str, Tensor] = {}
        at = 2 * E + 1
        if "heterogeneous" in weights:
            terms["heterogeneous"] = balance.heterogeneous_loss(f, P, self.eta_E)
        if "switch" in weights:
            terms["switch"] = balance.switch_loss(f, P, K)
        if "zloss" in weights:
            terms["zloss"] = balance.z_loss(stats[at], tokens)
            at += 1
        if "seq" in weights:
            B = num_sequences
            seq_counts, seq_psum = stats[at : at + B * E].view(B, E), stats[at + B * E : at + 2 * B * E].view(B, E)
            terms["seq"] = balance.sequence_loss(seq_counts, seq_psum, tokens / B, K)
        if "locality" in weights:
            terms["locality"] = balance.locality_loss(P, self.local_mask_E)
        total = torch.stack([weights[k] * v for k, v in terms.items()]).sum()
        return total, terms

    # -----------------------------------------------------------------------------------------------------------
    # Between optimizer steps

    def accumulate(self, expert_idx_TK: Tensor, chosen_TK: Tensor, gates_TK: Tensor) -> None:
        """Remember what the between-step updates need: selection counts (before any capacity drop) and, for the
        ETR schedule, the sum of the chosen affinities. No host sync."""
        if self.bias_rate is None and not self.etr_schedule:
            return
        E = self.cfg.num_total_experts
        chosen = chosen_TK.reshape(-1).double()
        counts = torch.zeros(E, dtype=torch.float64, device=expert_idx_TK.device)
        counts.scatter_add_(0, expert_idx_TK.reshape(-1), chosen)
        extra = torch.stack([(gates_TK.detach().double().reshape(-1) * chosen).sum(), chosen.sum()])
        self.step_counts += torch.cat([counts, extra])

    @torch.no_grad()
    def after_step(self, stepped: bool) -> None:
        """Called once after every optimizer step on every rank (train/step.py). Moves the aux-free bias towards
        the balanced load of the whole step (all data-parallel ranks), advances the ETR capacity schedule, and
        clears the step accumulators. A skipped (non-finite) step only clears."""
        E = self.cfg.num_total_experts
        if stepped and (self.bias_rate is not None or self.etr_schedule):
            totals = self.step_counts.clone()
            if self.step_reducer is not None:
                totals = self.step_reducer(totals)
            if self.bias_rate is not None:
                target = balance.balanced_load_share(self.cfg.num_experts, E, self.cfg.tau)
                balance.bias_update(self.expert_bias_E, totals[:E], target, self.bias_rate)
            if self.etr_schedule:
                self.advance_etr_schedule(totals[E], totals[E + 1])
        self.step_counts.zero_()
        self.global_counts.zero_()
        self._etr_factor = None

    def advance_etr_schedule(self, affinity_sum: Tensor, num_choices: Tensor) -> None:
        etr = self.cfg.router.etr
        assert self.cfg.capacity_factor is not None
        self.etr_state[1] += 1
        # host-device sync: once per optimizer step (the step counter; the buffer is what a checkpoint restores),
        # and the affinity read below once every recompute_every steps.
        if int(self.etr_state[1]) % etr.recompute_every != 0:
            return
        delta = float(affinity_sum / num_choices.clamp_min(1))
        bound = balance.etr_lower_bound_factor(self.hidden_size, delta)
        self.etr_state[0] = min(max(bound, etr.min_capacity_factor), self.cfg.capacity_factor)
