"""The Expert-Token Resonance router (moe.router.kind: etr; Li et al., arXiv 2406.00023).

- GrAP vectors: expert i's gate vector w_i is fixed, not learned: n/d on the i-th of n contiguous groups of the
  hidden vector (n = E experts, d = hidden size), 0 elsewhere, so the w_i are mutually orthogonal.
- Affinity: delta_ti = cos(x_t, w_i). It is the logits (handed on, and what top-k reads) and the gate itself.
- Token choice: each token takes its top-k experts by affinity; with etr.threshold it stops at the smallest l whose
  cumulative affinity reaches the threshold (the rest are not taken).
- Expert choice (training, moe.capacity_factor = factor): every expert keeps its C = ceil(factor * tokens * top_k / E)
  highest-affinity tokens among those that chose it, counted over the whole data-parallel batch (gathered in rank
  order, so every layout decides as one process does on the concatenated tokens).
- Capacity schedule etr.capacity_schedule: fixed keeps the factor; lower_bound recomputes it every
  etr.recompute_every steps as clamp(exp(d delta^2 / (2 - delta^2)), etr.min_capacity_factor, capacity_factor),
  delta the mean chosen affinity since the last update (the paper gives the bound, not a schedule: ours).
- Locality loss (etr.locality_coeff > 0): KL(P || uniform over the experts on this node).
Spec: ../shared/spec/routers.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from model import balance
from model.config import MoEConfig
from model.recompute import once
from model.routers.base import Router
from model.routers.capacity import expert_choice_mask
from model.routers.statistics import StepTotals


def grap_vectors(num_experts: int, hidden_size: int) -> Tensor:
    """ETR's fixed orthogonal expert vectors [E, D]: expert i is n/d on the i-th of n contiguous groups, 0 elsewhere."""
    w = torch.zeros(num_experts, hidden_size)
    for i, cols in enumerate(torch.tensor_split(torch.arange(hidden_size), num_experts)):
        w[i, cols] = num_experts / hidden_size
    return w


class EtrRouter(Router):
    """No parameters: the GrAP vectors are a fixed buffer. `etr_state` (lower_bound schedule) is saved."""

    def __init__(self, hidden_size: int, cfg: MoEConfig) -> None:
        etr = cfg.router.etr
        schedule = etr.capacity_schedule == "lower_bound"
        locality = {"locality": etr.locality_coeff} if etr.locality_coeff > 0 else {}
        super().__init__(hidden_size, cfg, extra_terms=locality, step_updates=schedule)
        self.schedule = schedule
        self.register_buffer("grap_ED", grap_vectors(cfg.num_total_experts, hidden_size), persistent=False)
        if self.schedule:
            assert cfg.capacity_factor is not None
            # [current capacity factor, optimizer steps since the last recomputation]: resumes exactly.
            self.register_buffer("etr_state", torch.tensor([cfg.capacity_factor, 0.0], dtype=torch.float64))
        self._factor: float | None = None

    def logits(self, x_TD: Tensor, prev_logits_TE: Tensor | None) -> Tensor:
        """The cosine affinity [T, E] between each token and each GrAP vector, fp32. ETR has no residual."""
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return F.normalize(x_TD.float(), dim=-1) @ F.normalize(self.grap_ED, dim=-1).t()

    def selection_scores(self, logits_TE: Tensor, probs_TE: Tensor) -> Tensor:
        return logits_TE

    def gates(
        self, logits_TE: Tensor, scores_TE: Tensor, probs_TE: Tensor, expert_idx_TK: Tensor
    ) -> tuple[Tensor, Tensor]:
        gates = logits_TE.gather(1, expert_idx_TK)  # the affinity itself weighs the expert's output
        taken = torch.ones_like(expert_idx_TK, dtype=torch.bool)
        threshold = self.cfg.router.etr.threshold
        if threshold is not None:
            # Token choice stops at the smallest l whose cumulative affinity reaches the threshold.
            before = torch.cumsum(gates, dim=-1) - gates
            taken = before < threshold
            taken[:, 0] = True
            gates = gates * taken
        return gates, taken

    def keep_within_capacity(self, expert_idx_TK: Tensor, gates_TK: Tensor, taken_TK: Tensor) -> Tensor:
        """Expert choice over the whole data-parallel batch, by affinity (the gates)."""
        T, K = expert_idx_TK.shape
        E = self.cfg.num_total_experts
        expert_A = torch.where(taken_TK, expert_idx_TK, E).reshape(-1)
        score_A = gates_TK.reshape(-1)
        # once: a recomputed forward replays the gathered pairs instead of gathering again.
        all_expert_A, all_score_A, first = once(lambda: self.comm.gather_assignments(expert_A, score_A))
        keep = expert_choice_mask(all_expert_A, all_score_A, self.capacity(all_expert_A.numel() // K), E)
        return keep[first : first + T * K].view(T, K)

    def capacity_factor(self) -> float:
        """The expert-choice capacity factor in force this step."""
        if not self.schedule:
            assert self.cfg.capacity_factor is not None
            return self.cfg.capacity_factor
        if self._factor is None:
            # host-device sync: once per optimizer step (after_step clears the cached value).
            self._factor = float(self.etr_state[0])
        return self._factor

    def capacity(self, group_tokens: int) -> int:
        """C = ceil(factor * tokens * top_k / E) over the tokens of the whole data-parallel batch."""
        cfg = self.cfg
        return math.ceil(self.capacity_factor() * group_tokens * cfg.top_k / cfg.num_total_experts - 1e-9)

    def update_between_steps(self, load: StepTotals) -> None:
        super().update_between_steps(load)
        if self.schedule:
            self.advance_schedule(load.gate_sum, load.num_choices)

    def advance_schedule(self, affinity_sum: Tensor, num_choices: Tensor) -> None:
        """One optimizer step of the lower_bound schedule."""
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

    @torch.no_grad()
    def after_step(self, stepped: bool) -> None:
        super().after_step(stepped)
        self._factor = None  # the schedule may have moved: read it again at the next forward
