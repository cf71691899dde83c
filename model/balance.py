"""Load-balancing terms a router adds to the loss, and the between-step updates of the aux-loss-free bias and the
ETR capacity schedule. Formulas: arXiv 2410.07348 §3 and docs/architecture.md, "Router family".

Every loss here is a function of per-expert statistics (selection counts f, mean probabilities P, ...) that the
router has already summed over whatever ranks share its micro-batch; nothing here communicates.
Shape legend as in model/transformer.py, plus B sequences in the micro-batch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def heterogeneous_loss(f_E: Tensor, P_E: Tensor, eta_E: Tensor) -> Tensor:
    """MoE++: sum_i eta_i f_i P_i, f_i = share of tokens whose top-k holds i (sum f = K), no N factor."""
    return (eta_E * f_E * P_E).sum()


def switch_loss(f_E: Tensor, P_E: Tensor, top_k: int) -> Tensor:
    """Switch: E * sum_i f_i P_i with f_i the share of assignments to i (sum f = 1; for top-1 the share of tokens
    whose top choice is i, as in the paper)."""
    return f_E.numel() * (f_E / top_k * P_E).sum()


def z_loss(zsq_sum: Tensor, num_tokens: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2, from the summed squares."""
    return zsq_sum / num_tokens


def sequence_loss(counts_BE: Tensor, psum_BE: Tensor, tokens_per_seq: Tensor, top_k: int) -> Tensor:
    """DeepSeek-V3 sequence-wise balance: per sequence f_i = E/(K S) * count_i, P_i = mean probability over the
    sequence; L = mean over sequences of sum_i f_i P_i."""
    E = counts_BE.shape[1]
    f = counts_BE * (E / (top_k * tokens_per_seq))
    P = psum_BE / tokens_per_seq
    return (f * P).sum(dim=1).mean()


def locality_loss(P_E: Tensor, local_mask_E: Tensor, eps: float = 1e-2) -> Tensor:
    """ETR locality: KL(P || U_local), U_local uniform over the experts on this node with a small eps of mass on
    the others (a KL against a distribution with zeros would be infinite)."""
    E = P_E.numel()
    # On the device (no host read of m): every expert local gives the uniform 1/E; float64 as Python would.
    m = local_mask_E.sum().double().clamp_min(1)
    local_mass = 1 - eps * (m < E)
    u = torch.where(local_mask_E, local_mass / m, eps / (E - m).clamp_min(1)).to(P_E.dtype)
    p = P_E.clamp_min(torch.finfo(P_E.dtype).tiny)
    return (p * (p / u).log()).sum()


def balanced_load_share(num_ffn: int, num_total: int, tau: float) -> Tensor:
    """The share of assignments each expert gets at balance (spec §4): tau/(tau N_ffn + N_zc) for an FFN expert,
    1/(tau N_ffn + N_zc) for a zero-computation expert; uniform for a vanilla MoE."""
    w = torch.ones(num_total, dtype=torch.float64)
    if num_total > num_ffn:
        w[:num_ffn] = tau
    return w / w.sum()


def bias_update(bias_E: Tensor, load_E: Tensor, target_share_E: Tensor, rate: float) -> None:
    """DeepSeek-V3 aux-loss-free step, in place: b_i -= u for an over-loaded expert, += u for an under-loaded one,
    loads compared with the balanced share of the whole step's assignments."""
    target = target_share_E.to(load_E) * load_E.sum()
    bias_E.add_(torch.sign(target - load_E).to(bias_E.dtype), alpha=rate)


def etr_lower_bound_factor(hidden_size: int, delta: float) -> float:
    """The ETR capacity lower bound as a factor of the uniform share: C_min / (tokens / E) = exp(d δ² / (2 - δ²))."""
    delta = min(abs(delta), 1.0)
    exponent = hidden_size * delta * delta / (2 - delta * delta)
    return math.exp(min(exponent, 50.0))  # the clamp only keeps exp finite; the caller clamps far lower
