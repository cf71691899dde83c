"""The router interface every policy implements, what a router returns, and what all policies share.

A router sends each of T tokens to K of E experts, with a gate weight each. Expert order (as in the released
checkpoint): [FFN x N_ffn, constant x n_const, copy x n_copy, zero x n_zero]. All router arithmetic is fp32 whatever
the autocast state, because top-k decisions are sensitive to rounding.

One forward, the same for every policy (the steps marked * are the policy's):

    G        = logits*(x, G_prev)                    handed on to the next MoE layer (the gating residual's input)
    S        = scores*(G)                            what the softmax reads
    p        = softmax(S)
    idx      = top-k(selection_scores*(G, p) + b)    b: the aux-loss-free bias, which steers the choice only
    g, taken = gates*(G, S, p, idx)                  gate per chosen expert; taken False: not used (ETR threshold)
    kept     = keep_within_capacity*(idx, g, taken)  training with moe.capacity_factor only; else kept = taken
    aux      = sum over moe.balance of coeff * term(statistics of idx and p)

and after every optimizer step `after_step`: the bias moves towards the balanced load of the whole step, and a
policy may update its own state (ETR's capacity schedule). A router never communicates itself: what it needs
from other ranks goes through `self.comm` (model/routers/comm.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from model import balance
from model.config import MoEConfig
from model.recompute import once
from model.routers.comm import RouterComm
from model.routers.statistics import BalanceLoss, StepLoad, StepTotals


@dataclass
class RouterOutput:
    """A router's decisions for T tokens (K choices each, E experts)."""

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


class Router(nn.Module, ABC):
    """A routing policy. Subclasses define logits, gates and capacity (and may change scores and selection).

    extra_terms: balance terms the policy adds to moe.balance (name -> coefficient). step_updates: the policy has
    between-step state of its own, so the step's totals are counted even without the aux-free bias.
    """

    def __init__(
        self, hidden_size: int, cfg: MoEConfig, extra_terms: dict[str, float] | None = None, step_updates: bool = False
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.hidden_size = hidden_size
        n = cfg.num_total_experts
        weights = {t.kind: t.weight for t in cfg.balance}
        self.bias_rate = weights.pop("aux_free_bias", None)
        if self.bias_rate is not None:
            # Selection-only bias (aux-loss-free balancing): training state, so saved with the checkpoint, but
            # never a parameter; only after_step() changes it.
            self.register_buffer("expert_bias_E", torch.zeros(n))
        self.balance = BalanceLoss(cfg, {**weights, **(extra_terms or {})})
        self.step_load = StepLoad(n, enabled=self.bias_rate is not None or step_updates)
        self.comm = RouterComm()

    # -----------------------------------------------------------------------------------------------------------
    # The policy

    @abstractmethod
    def logits(self, x_TD: Tensor, prev_logits_TE: Tensor | None) -> Tensor:
        """[T, E] fp32 pre-normalisation logits (what the next MoE layer receives as prev_logits_TE)."""

    def scores(self, logits_TE: Tensor) -> Tensor:
        """What the softmax reads; by default the logits."""
        return logits_TE

    def selection_scores(self, logits_TE: Tensor, probs_TE: Tensor) -> Tensor:
        """What top-k picks the largest of (before the aux-free bias); by default the probabilities."""
        return probs_TE

    @abstractmethod
    def gates(
        self, logits_TE: Tensor, scores_TE: Tensor, probs_TE: Tensor, expert_idx_TK: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(fp32 gate weights [T, K] of the chosen experts, [T, K] bool: the choice is taken)."""

    @abstractmethod
    def keep_within_capacity(self, expert_idx_TK: Tensor, gates_TK: Tensor, taken_TK: Tensor) -> Tensor:
        """[T, K] bool: the taken assignments the capacity limit keeps (training, moe.capacity_factor set)."""

    def update_between_steps(self, load: StepTotals) -> None:
        """Between-step update from the load of the whole step (all micro-batches and ranks): the aux-free bias
        moves towards the balanced share. Policies with state of their own extend it."""
        if self.bias_rate is not None:
            E = self.cfg.num_total_experts
            target = balance.balanced_load_share(self.cfg.num_experts, E, self.cfg.tau)
            balance.bias_update(self.expert_bias_E, load.counts_E, target, self.bias_rate)

    # -----------------------------------------------------------------------------------------------------------
    # Shared by every policy

    def forward(self, x_TD: Tensor, prev_logits_TE: Tensor | None, num_sequences: int = 1) -> RouterOutput:
        """Route T tokens (num_sequences sequences of equal length, flattened): x_TD [T, D] and the previous MoE
        layer's logits (None for the first MoE layer) -> RouterOutput."""
        logits = self.logits(x_TD, prev_logits_TE)
        scores = self.scores(logits)
        probs = scores.softmax(dim=-1)
        expert_idx = self.select(logits, probs)
        gates, taken = self.gates(logits, scores, probs, expert_idx)
        if self.training:
            # once: a recomputed forward (activation checkpointing) must not count this micro-batch twice.
            once(lambda: self.step_load.add(expert_idx, taken, gates))
        # Capacity is a training device (spec §3): evaluation and inference stay dropless and batch-independent.
        kept = taken
        if self.cfg.capacity_factor is not None and self.training:
            kept = self.keep_within_capacity(expert_idx, gates.detach(), taken)
        gates = gates * kept
        aux_loss, terms = self.balance(scores, probs, expert_idx, taken, num_sequences, self.comm)
        return RouterOutput(logits, probs, expert_idx, gates, kept, aux_loss, terms)

    def select(self, logits_TE: Tensor, probs_TE: Tensor) -> Tensor:
        """[T, K] expert indices: top-k of the selection scores plus the aux-free bias."""
        choose_by = self.selection_scores(logits_TE, probs_TE)
        if self.bias_rate is not None:
            # The bias steers the choice only; gates read the unbiased values.
            choose_by = choose_by + self.expert_bias_E
        return choose_by.topk(self.cfg.top_k, dim=-1).indices

    @torch.no_grad()
    def after_step(self, stepped: bool) -> None:
        """Called once after every optimizer step on every rank (train/step.py): the between-step updates from the
        step's totals, then the step accumulators are cleared. A skipped (non-finite) step only clears."""
        if stepped and self.step_load.enabled:
            self.update_between_steps(self.step_load.summed(self.comm))
        self.step_load.clear_step()
        self.balance.clear_step()
