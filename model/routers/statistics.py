"""What a router counts: the balance statistics of a micro-batch and the balance terms computed from them, and the
routing totals of an optimizer step that the between-step updates read.

Every balance term (model/balance.py has the formulas) is a function of a few per-expert sums over the tokens of a
micro-batch: `BalanceStatistics`. They travel as one flat vector (`pack` / `unpack`), so a single reduction sums
them all over the ranks that share the micro-batch. The step accumulators are buffers that are not saved:
`clear_step` empties them after every optimizer step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from model import balance
from model.config import MoEConfig
from model.recompute import once
from model.routers.comm import RouterComm


@dataclass
class BalanceStatistics:
    """Per-expert sums over the tokens of one micro-batch (B sequences, T tokens, E experts)."""

    counts_E: Tensor  # assignments made to each expert (before any capacity drop)
    prob_sum_E: Tensor  # sum over tokens of each expert's probability
    tokens: Tensor  # T, as a 0-dim float tensor
    zsq_sum: Tensor | None = None  # sum over tokens of logsumexp(scores)^2 (z-loss)
    seq_counts_BE: Tensor | None = None  # counts_E per sequence (sequence-wise loss)
    seq_prob_sum_BE: Tensor | None = None  # prob_sum_E per sequence

    @classmethod
    def measure(
        cls,
        scores_TE: Tensor,
        probs_TE: Tensor,
        expert_idx_TK: Tensor,
        chosen_TK: Tensor,
        num_sequences: int,
        zloss: bool,
        per_sequence: bool,
    ) -> BalanceStatistics:
        T, E = probs_TE.shape
        sel_TE = torch.zeros_like(probs_TE).scatter_add_(1, expert_idx_TK, chosen_TK.to(probs_TE.dtype))
        stats = cls(sel_TE.sum(dim=0), probs_TE.sum(dim=0), probs_TE.new_full((), T))  # new_full: no host copy
        if zloss:
            stats.zsq_sum = torch.logsumexp(scores_TE, dim=-1).square().sum()
        if per_sequence:
            B = num_sequences
            stats.seq_counts_BE = sel_TE.view(B, -1, E).sum(dim=1)
            stats.seq_prob_sum_BE = probs_TE.view(B, -1, E).sum(dim=1)
        return stats

    def _present(self) -> list[Tensor]:
        values = (getattr(self, f.name) for f in dataclasses.fields(self))
        return [v for v in values if v is not None]

    def pack(self) -> Tensor:
        """Every statistic in one flat vector (differentiable)."""
        return torch.cat([t.reshape(-1) for t in self._present()])

    def unpack(self, flat: Tensor) -> BalanceStatistics:
        """The statistics of a vector laid out as `pack` lays out these."""
        present = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]
        shapes = [getattr(self, name).shape for name in present]
        parts = flat.split([s.numel() for s in shapes])
        return dataclasses.replace(self, **{n: p.view(s) for n, p, s in zip(present, parts, shapes, strict=True)})


class BalanceLoss(nn.Module):
    """sum over moe.balance of coeff * term, from the statistics of one micro-batch.

    Terms: `heterogeneous` sum_i eta_i f_i P_i (MoE++: eta_i = 1 for FFN experts, tau for zero-computation ones,
    f_i the share of tokens whose top-k holds i), `switch` E sum_i (f_i / K) P_i, `zloss` mean logsumexp^2, `seq`
    DeepSeek-V3's per-sequence f.P, `locality` (ETR) KL(P || uniform over this node's experts). With
    `balance_scope: global_batch`, f comes from the counts of the step's micro-batches so far on every
    data-parallel rank (Megatron's global aux loss): the last micro-batch sees the whole global batch. P always
    stays local and carries the gradient.
    """

    def __init__(self, cfg: MoEConfig, weights: dict[str, float]) -> None:
        super().__init__()
        self.cfg = cfg
        self.weights = weights
        n = cfg.num_total_experts
        eta = torch.ones(n)
        eta[cfg.num_experts :] = cfg.tau
        self.register_buffer("eta_E", eta, persistent=False)
        # Experts on this node (locality loss); parallel/routing.py narrows it under expert parallelism across nodes.
        self.register_buffer("local_mask_E", torch.ones(n, dtype=torch.bool), persistent=False)
        # Global-batch scope: [selection counts E, tokens] of the step so far, summed over data-parallel ranks.
        self.register_buffer("global_counts", torch.zeros(n + 1, dtype=torch.float64), persistent=False)

    def forward(
        self,
        scores_TE: Tensor,
        probs_TE: Tensor,
        expert_idx_TK: Tensor,
        chosen_TK: Tensor,
        num_sequences: int,
        comm: RouterComm,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(the weighted sum, each term unweighted)."""
        weights = self.weights
        if not weights:
            return probs_TE.new_zeros(()), {}
        mine = BalanceStatistics.measure(
            scores_TE, probs_TE, expert_idx_TK, chosen_TK, num_sequences, "zloss" in weights, "seq" in weights
        )
        stats = mine.unpack(comm.sum_statistics(mine.pack()))
        K = self.cfg.top_k
        P = stats.prob_sum_E / stats.tokens
        f = stats.counts_E / stats.tokens
        if self.cfg.balance_scope == "global_batch" and self.training:
            f = self.global_shares(torch.cat([stats.counts_E, stats.tokens[None]]).detach().double(), comm).to(P.dtype)
        terms: dict[str, Tensor] = {}
        if "heterogeneous" in weights:
            terms["heterogeneous"] = balance.heterogeneous_loss(f, P, self.eta_E)
        if "switch" in weights:
            terms["switch"] = balance.switch_loss(f, P, K)
        if "zloss" in weights:
            assert stats.zsq_sum is not None
            terms["zloss"] = balance.z_loss(stats.zsq_sum, stats.tokens)
        if "seq" in weights:
            assert stats.seq_counts_BE is not None and stats.seq_prob_sum_BE is not None
            tokens_per_seq = stats.tokens / num_sequences
            terms["seq"] = balance.sequence_loss(stats.seq_counts_BE, stats.seq_prob_sum_BE, tokens_per_seq, K)
        if "locality" in weights:
            terms["locality"] = balance.locality_loss(P, self.local_mask_E)
        total = torch.stack([weights[k] * v for k, v in terms.items()]).sum()
        return total, terms

    def global_shares(self, counts_and_tokens: Tensor, comm: RouterComm) -> Tensor:
        """f_i from the counts of every micro-batch of the step so far on every data-parallel rank, this one's added."""
        E = self.cfg.num_total_experts

        def add_to_step_counts() -> Tensor:
            self.global_counts += comm.sum_over_data_parallel(counts_and_tokens)
            return self.global_counts.clone()

        # once: a recomputed forward (activation checkpointing) sees the counts this forward saw, adds nothing
        # and runs no all-reduce, even when later micro-batches have been added since (pipeline schedules).
        step_counts = once(add_to_step_counts)
        return step_counts[:E] / step_counts[E]

    def clear_step(self) -> None:
        self.global_counts.zero_()


@dataclass
class StepTotals:
    """A step's routing, summed over its micro-batches (and, once reduced, over the ranks)."""

    counts_E: Tensor  # assignments made to each expert, before any capacity drop
    gate_sum: Tensor  # sum of the gates of those assignments (ETR: of their affinities)
    num_choices: Tensor  # number of those assignments


class StepLoad(nn.Module):
    """This rank's routing decisions summed over the micro-batches of one optimizer step, for the between-step
    updates (aux-free bias, ETR capacity schedule). Counts nothing unless one of them is on. No host sync."""

    def __init__(self, num_experts: int, enabled: bool) -> None:
        super().__init__()
        self.enabled = enabled
        # [counts E, gate sum, number of choices]: one vector, so that one reduction sums it over the ranks.
        self.register_buffer("totals", torch.zeros(num_experts + 2, dtype=torch.float64), persistent=False)

    def add(self, expert_idx_TK: Tensor, chosen_TK: Tensor, gates_TK: Tensor) -> None:
        if not self.enabled:
            return
        E = self.totals.numel() - 2
        chosen = chosen_TK.reshape(-1).double()
        counts = torch.zeros(E, dtype=torch.float64, device=expert_idx_TK.device)
        counts.scatter_add_(0, expert_idx_TK.reshape(-1), chosen)
        extra = torch.stack([(gates_TK.detach().double().reshape(-1) * chosen).sum(), chosen.sum()])
        self.totals += torch.cat([counts, extra])

    def summed(self, comm: RouterComm) -> StepTotals:
        """The step's totals summed over every rank that routed other tokens."""
        t = comm.sum_step_load(self.totals.clone())
        E = t.numel() - 2
        return StepTotals(t[:E], t[E], t[E + 1])

    def clear_step(self) -> None:
        self.totals.zero_()
