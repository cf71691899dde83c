"""Model-side configuration: the decoder shape (`model:`) and the MoE / MoE++ layer (`moe:`).

Both are plain dataclasses. `validate()` checks one section on its own and raises `ConfigError` with the dotted
key and the fix; cross-section checks live in `train/config.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


class ConfigError(ValueError):
    """A configuration value that cannot work. The message is one line: `dotted.key: reason; fix`."""


def require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


@dataclass
class ModelConfig:
    vocab_size: int = 512
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    # Grouped-query attention: null means as many key/value heads as query heads.
    num_kv_heads: int | None = None
    # Width of the dense SwiGLU FFN (layers that are not MoE) and the default width of each FFN expert.
    ffn_hidden_size: int = 256
    max_seq_len: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02

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
class RouterConfig:
    # `paper`: gates are the raw top-k softmax probabilities. `release` (public MoE++-7B): top-k of the softmax over
    # all experts, zero-expert gates set to 0, then the k gates renormalised to sum to 1.
    gate_convention: Literal["paper", "release"] = "paper"
    # Divide logits by std(logits)/target_std before the softmax (release option `moe_use_logits_norm`).
    logits_std_norm: bool = False
    target_std: float = 1.0
    # Linear(d, 8N) -> tanh -> Linear(8N, N) instead of Linear(d, N) (release option `moe_2layer_gate`).
    two_layer: bool = False


@dataclass
class MoEConfig:
    # Number of FFN experts (N_ffn). 0 turns every layer into a dense SwiGLU FFN.
    num_experts: int = 8
    # Zero-computation experts (MoE++). All three 0 (and gating_residual false) is a vanilla top-k MoE.
    num_zero_experts: int = 1
    num_copy_experts: int = 1
    num_constant_experts: int = 2
    top_k: int = 2
    # Width of each FFN expert; null means model.ffn_hidden_size.
    expert_ffn_hidden_size: int | None = None
    # Layer i is an MoE layer when i % every_n_layers == 0 (Megatron's moe_layer_freq); the others are dense.
    every_n_layers: int = 1
    # Router logits of MoE layer j-1 feed layer j through a learned [N, N] map (MoE++ gating residual).
    gating_residual: bool = True
    router: RouterConfig = field(default_factory=RouterConfig)
    # Multiply the expert input by top_k after routing (release option `moe_feature_no_mul_topk: false`).
    scale_input_by_topk: bool = False
    # Heterogeneous balance loss: L = L_ce + balance_coeff * sum_layers sum_i eta_i f_i P_i, eta = tau for
    # zero-computation experts and 1 for FFN experts.
    balance_coeff: float = 0.01
    tau: float = 0.75
    # Heterogeneous capacity (gamma). null: dropless.
    capacity_factor: float | None = None

    @property
    def num_zc_experts(self) -> int:
        return self.num_zero_experts + self.num_copy_experts + self.num_constant_experts

    @property
    def num_total_experts(self) -> int:
        return self.num_experts + self.num_zc_experts

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0

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
        require(self.balance_coeff >= 0, "moe.balance_coeff", f"must be >= 0, got {self.balance_coeff}")
        require(0 < self.tau <= 10, "moe.tau", f"must be in (0, 10], got {self.tau}")
        if self.capacity_factor is not None:
            require(self.capacity_factor > 0, "moe.capacity_factor", "must be positive, or null for dropless")
        require(self.router.target_std > 0, "moe.router.target_std", "must be positive")
        require(
            self.router.gate_convention in ("paper", "release"),
            "moe.router.gate_convention",
            f"unknown value {self.router.gate_convention!r}; use paper or release",
        )
