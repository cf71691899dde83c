"""Model-side configuration: the decoder shape (`model:`) and the MoE / MoE++ layer (`moe:`).

Both are plain dataclasses. `validate()` checks one section on its own and raises `ConfigError` with the dotted
key and the fix; cross-section checks live in `train/config.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from model.errors import UserError


class ConfigError(UserError):
    """A configuration value that cannot work. The message is one line: `dotted.key: reason; fix`."""


def require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


@dataclass
class ModelConfig:
    """`model:` the decoder: embedding, attention with RoPE, SwiGLU FFNs, RMSNorm, untied output head."""

    vocab_size: int = 512  # token ids 0..vocab_size-1; must cover the data's tokenizer
    hidden_size: int = 128  # width of the residual stream (d)
    num_layers: int = 4  # decoder blocks
    num_heads: int = 4  # query heads; hidden_size / num_heads is the head width (even, for RoPE)
    # Grouped-query attention: null means as many key/value heads as query heads.
    num_kv_heads: int | None = None
    # Width of the dense SwiGLU FFN (layers that are not MoE) and the default width of each FFN expert.
    ffn_hidden_size: int = 256
    max_seq_len: int = 128  # longest sequence the RoPE tables cover; >= data.seq_len
    rope_theta: float = 10000.0  # RoPE base frequency
    norm_eps: float = 1e-6  # RMSNorm epsilon
    init_std: float = 0.02  # standard deviation of the normal initialisation of every weight matrix

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_hidden_size", "max_seq_len"):
            require(getattr(self, name) > 0, f"model.{name}", f"must be positive, got {getattr(self, name)}")
        require(
            self.hidden_size % self.num_heads == 0,
            "model.hidden_size",
            f"{self.hidden_size} is not divisible by model.num_heads={self.num_heads}; pick a multiple",
        )
        require(self.head_dim % 2 == 0, "model.hidden_size", f"head_dim {self.head_dim} must be even for RoPE")
        require(self.kv_heads > 0, "model.num_kv_heads", f"must be positive, got {self.num_kv_heads}")
        require(
            self.num_heads % self.kv_heads == 0,
            "model.num_kv_heads",
            f"model.num_heads={self.num_heads} is not divisible by num_kv_heads={self.kv_heads}",
        )
        require(self.norm_eps > 0, "model.norm_eps", "must be positive")
        require(self.init_std > 0, "model.init_std", "must be positive")
        require(self.rope_theta > 0, "model.rope_theta", "must be positive")


@dataclass
class EtrConfig:
    """Expert-Token Resonance (arXiv 2406.00023): fixed orthogonal GrAP expert vectors, cosine affinity, token choice
    then expert choice with capacity. Formulas: docs/architecture.md, "Router family"."""

    # Token choice: each token takes up to moe.top_k experts by affinity (the paper runs top_k 1). With a threshold,
    # it stops at the smallest l whose cumulative affinity (sum of the l best cosines) reaches it.
    threshold: float | None = None
    # Expert choice keeps the top-C tokens of each expert by affinity, C = ceil(factor * tokens * top_k / E) over the
    # tokens of the whole data-parallel batch (the same decisions for every parallel layout).
    # `fixed`: factor = moe.capacity_factor. `lower_bound`: every `recompute_every` steps
    # factor = clamp(exp(d delta^2 / (2 - delta^2)), min_capacity_factor, moe.capacity_factor), delta = mean affinity
    # of the token choices since the last update (the paper's bound C_min = (1/E) exp(...) as a share of the tokens;
    # the paper gives no schedule, this one is ours).
    capacity_schedule: Literal["fixed", "lower_bound"] = "fixed"
    min_capacity_factor: float = 0.5  # lower_bound schedule: the smallest expert-choice capacity factor
    recompute_every: int = 100  # lower_bound schedule: steps between capacity factor updates
    # Locality loss weight mu: mu * KL(P || U_local), U_local uniform over the experts on this node (0 = off).
    locality_coeff: float = 0.0


@dataclass
class RouterConfig:
    """`moe.router:` the routing policy and its options."""

    # `moepp`: softmax over FFN + zero-computation experts with the gating residual and the gate conventions below.
    # `topk`: Mixtral-style top-k softmax (no gating residual). `etr`: Expert-Token Resonance (see EtrConfig).
    kind: Literal["moepp", "topk", "etr"] = "moepp"
    # topk only: gates are the softmax over the k chosen logits (Mixtral) instead of the raw top-k probabilities.
    mixtral_gating: bool = False
    # `paper`: gates are the raw top-k softmax probabilities. `release` (public MoE++-7B): top-k of the softmax over
    # all experts, zero-expert gates set to 0, then the k gates renormalised to sum to 1.
    gate_convention: Literal["paper", "release"] = "paper"
    # Divide logits by std(logits)/target_std before the softmax (release option `moe_use_logits_norm`).
    logits_std_norm: bool = False
    target_std: float = 1.0  # logits_std_norm only: the standard deviation the logits are scaled to
    # Linear(d, 8N) -> tanh -> Linear(8N, N) instead of Linear(d, N) (release option `moe_2layer_gate`).
    two_layer: bool = False
    etr: EtrConfig = field(default_factory=EtrConfig)


BALANCE_KINDS = ("heterogeneous", "switch", "zloss", "seq", "aux_free_bias")
# Default coefficient of each kind (aux_free_bias: the bias update rate u).
BALANCE_DEFAULT_COEFF = {"heterogeneous": 0.01, "switch": 0.01, "zloss": 1e-3, "seq": 1e-4, "aux_free_bias": 1e-3}


@dataclass
class BalanceTerm:
    """One entry of `moe.balance`. heterogeneous: sum_i eta_i f_i P_i (MoE++; eta = tau for zero-computation
    experts). switch: E * sum_i f_i P_i. zloss: mean_t logsumexp(logits_t)^2. seq: DeepSeek-V3 sequence-wise
    E/K * sum_i f_i P_i per sequence, averaged. aux_free_bias: not a loss; per-expert selection bias moved by
    `coeff` after every optimizer step towards the balanced load. null coeff: the kind's default."""

    kind: Literal["heterogeneous", "switch", "zloss", "seq", "aux_free_bias"] = "heterogeneous"
    coeff: float | None = None

    @property
    def weight(self) -> float:
        return BALANCE_DEFAULT_COEFF[self.kind] if self.coeff is None else self.coeff


@dataclass
class MoEConfig:
    """`moe:` the MoE / MoE++ layers: FFN experts, zero-computation experts, routing and balance."""

    # Number of FFN experts (N_ffn). 0 turns every layer into a dense SwiGLU FFN.
    num_experts: int = 8
    # Zero-computation experts (MoE++). All three 0 (and gating_residual false) is a vanilla top-k MoE.
    num_zero_experts: int = 1
    num_copy_experts: int = 1  # copy experts: the token passes through unchanged (MoE++)
    num_constant_experts: int = 2  # constant experts: a learned vector mixed into the token (MoE++)
    top_k: int = 2  # experts (FFN or zero-computation) each token is routed to
    # Width of each FFN expert; null means model.ffn_hidden_size.
    expert_ffn_hidden_size: int | None = None
    # Layer i is an MoE layer when i % every_n_layers == 0 (Megatron's moe_layer_freq); the others are dense.
    every_n_layers: int = 1
    # Router logits of MoE layer j-1 feed layer j through a learned [N, N] map (MoE++ gating residual).
    gating_residual: bool = True
    router: RouterConfig = field(default_factory=RouterConfig)
    # Multiply the expert input by top_k after routing (release option `moe_feature_no_mul_topk: false`).
    scale_input_by_topk: bool = False
    # Balance losses and the aux-free bias: L = L_ce + sum_terms coeff * sum_layers term.
    balance: list[BalanceTerm] = field(default_factory=lambda: [BalanceTerm("heterogeneous", 0.01)])
    # Where f_i (the selection counts) comes from: this micro-batch, or the global batch (counts all-reduced over
    # data-parallel ranks and summed over the step's micro-batches so far, as Megatron's global aux loss does).
    balance_scope: Literal["micro_batch", "global_batch"] = "micro_batch"
    # MoE++ tau: eta_i of the heterogeneous loss, the heterogeneous capacity and the aux-free bias target.
    tau: float = 0.75
    # Capacity factor (gamma; for the etr router the expert-choice factor). null: dropless.
    capacity_factor: float | None = None
    # Dense SwiGLU experts every token uses (DeepSeekMoE), width shared_experts * expert FFN width; 0 = none.
    shared_experts: int = 0

    @property
    def num_zc_experts(self) -> int:
        return self.num_zero_experts + self.num_copy_experts + self.num_constant_experts

    @property
    def num_total_experts(self) -> int:
        return self.num_experts + self.num_zc_experts

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0

    def shared_ffn_hidden_size(self, ffn_hidden_size: int) -> int:
        """Width of the shared-experts FFN (0 without shared experts)."""
        return self.shared_experts * (self.expert_ffn_hidden_size or ffn_hidden_size)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.enabled and layer_idx % self.every_n_layers == 0

    def validate(self) -> None:
        for name in ("num_experts", "num_zero_experts", "num_copy_experts", "num_constant_experts"):
            require(getattr(self, name) >= 0, f"moe.{name}", f"must be >= 0, got {getattr(self, name)}")
        if not self.enabled:
            return
        require(self.top_k >= 1, "moe.top_k", f"must be >= 1, got {self.top_k}")
        require(
            self.top_k <= self.num_total_experts,
            "moe.top_k",
            f"{self.top_k} > number of experts {self.num_total_experts} "
            f"({self.num_experts} FFN + {self.num_zc_experts} zero-computation); lower top_k or add experts",
        )
        require(self.every_n_layers >= 1, "moe.every_n_layers", f"must be >= 1, got {self.every_n_layers}")
        if self.expert_ffn_hidden_size is not None:
            require(self.expert_ffn_hidden_size > 0, "moe.expert_ffn_hidden_size", "must be positive or null")
        for i, term in enumerate(self.balance):
            key = f"moe.balance[{i}]"
            require(
                term.kind in BALANCE_KINDS,
                f"{key}.kind",
                f"unknown {term.kind!r}; use one of {', '.join(BALANCE_KINDS)}",
            )
            require(term.weight >= 0, f"{key}.coeff", f"must be >= 0, got {term.coeff}")
        kinds = [t.kind for t in self.balance]
        dup = sorted({k for k in kinds if kinds.count(k) > 1})
        require(not dup, "moe.balance", f"{', '.join(dup)} listed twice; keep one entry per kind")
        require(self.shared_experts >= 0, "moe.shared_experts", f"must be >= 0, got {self.shared_experts}")
        r = self.router
        require(
            r.kind in ("moepp", "topk", "etr"), "moe.router.kind", f"unknown value {r.kind!r}; use moepp, topk or etr"
        )
        if r.kind != "moepp":
            require(
                not self.gating_residual,
                "moe.gating_residual",
                f"the gating residual is part of the moepp router; set it false for router.kind {r.kind}",
            )
        require(
            not r.mixtral_gating or r.kind == "topk",
            "moe.router.mixtral_gating",
            "only the topk router has Mixtral gating; set router.kind: topk or drop it",
        )
        if r.kind == "etr":
            require(not r.two_layer, "moe.router.two_layer", "the etr router has no learned gate; set it false")
            e = r.etr
            if e.threshold is not None:
                require(e.threshold > 0, "moe.router.etr.threshold", "must be positive, or null for l = top_k")
            require(e.min_capacity_factor > 0, "moe.router.etr.min_capacity_factor", "must be positive")
            require(e.recompute_every >= 1, "moe.router.etr.recompute_every", "must be >= 1")
            require(e.locality_coeff >= 0, "moe.router.etr.locality_coeff", "must be >= 0")
            if e.capacity_schedule == "lower_bound":
                require(
                    self.capacity_factor is not None and self.capacity_factor >= e.min_capacity_factor,
                    "moe.capacity_factor",
                    "the lower_bound schedule clamps to [router.etr.min_capacity_factor, capacity_factor]; set "
                    "capacity_factor >= min_capacity_factor",
                )
        require(0 < self.tau <= 10, "moe.tau", f"must be in (0, 10], got {self.tau}")
        if self.capacity_factor is not None:
            require(self.capacity_factor > 0, "moe.capacity_factor", "must be positive, or null for dropless")
        require(self.router.target_std > 0, "moe.router.target_std", "must be positive")
        require(
            self.router.gate_convention in ("paper", "release"),
            "moe.router.gate_convention",
            f"unknown value {self.router.gate_convention!r}; use paper or release",
        )
