"""Configurations of the MoE++ models exported by moepp (`tools/convert_to_hf.py`). This file ships inside each
export folder and is loaded with `trust_remote_code=True`; it imports nothing from the moepp repository.

Two layouts share one modeling file (`modeling_moepp.py`):
- `MoEPlusPlusConfig`, model_type "MoE++": the config fields of the public MoE++-7B release (`num_experts` a
  one-element list [N_ffn + 4], `moe_use_logits_norm`, `moe_2layer_gate`, ...). That layout fixes 1 zero, 1 copy
  and 2 constant experts, top-2, release gates and a gating residual in every MoE layer.
- `MoEPPConfig`, model_type "moepp": moepp's own fields, for trained models the release layout cannot express
  (other expert counts, paper gates, dense layers between MoE layers, no gating residual, ...). It uses another
  model_type on purpose: code written for the release must not mistake such a model for a release one.

Both reduce to the same `MoESpec`, which is all the modeling file reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PreTrainedConfig


@dataclass(frozen=True)
class MoESpec:
    """What an MoE(++) layer computes, whatever layout the config was written in."""

    num_ffn_experts: int  # 0: every layer is a dense SwiGLU FFN
    num_constant_experts: int
    num_copy_experts: int
    num_zero_experts: int
    top_k: int
    expert_intermediate_size: int
    # Layer i is an MoE layer when i % every_n_layers == 0; the others are dense SwiGLU FFNs.
    every_n_layers: int
    # G_j = W_j x + Wg_j G_{j-1} for every MoE layer but the first.
    gating_residual: bool
    # "paper": gates are the raw top-k softmax probabilities. "release": zero-expert gates set to 0, then the top-k
    # gates renormalised to sum to 1.
    gate_convention: str
    logits_std_norm: bool
    target_std: float
    two_layer_router: bool
    scale_input_by_topk: bool
    # The release stores a (never used) gate_map in the first MoE layer too.
    gate_map_in_first_layer: bool

    @property
    def num_experts(self) -> int:
        return self.num_ffn_experts + self.num_constant_experts + self.num_copy_experts + self.num_zero_experts

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.num_ffn_experts > 0 and layer_idx % self.every_n_layers == 0


class _DecoderConfig(PreTrainedConfig):
    """The LLaMA-style decoder both layouts share: pre-norm RMSNorm, rotate-half RoPE, GQA, no biases, untied head."""

    vocab_size: int = 65536
    hidden_size: int = 1536
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    num_experts_per_tok: int = 2  # top-k; never `top_k`, which clashes with generation parameters
    use_cache: bool = True
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__(**kwargs)
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; MoE++ experts are SwiGLU (silu)")
        if self.tie_word_embeddings:
            raise ValueError("tie_word_embeddings=true is not supported; MoE++ models have an untied LM head")


class MoEPlusPlusConfig(_DecoderConfig):
    """The release layout (model_type "MoE++", architectures ["MoeForCausalLM"])."""

    model_type = "MoE++"

    # Defaults are those of the release's own config class, so a config.json that omits a field means here what it
    # means there (the released 7B sets every MoE field explicitly).
    # [N_ffn + 4]: FFN experts, then 2 constant, 1 copy and 1 zero expert.
    num_experts: list[int] = field(default_factory=lambda: [32])
    moe_expert_interval: int = 1
    # true: top-k of the logits, softmax over those k, no zero-expert masking (not implemented here).
    moe_use_mixtral_gating: bool = False
    moe_2layer_gate: bool = True
    moe_use_logits_norm: bool = False
    moe_gate_norm_std: float = 1.0
    # false: the expert input is multiplied by top-k.
    moe_feature_no_mul_topk: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    def moe_spec(self) -> MoESpec:
        if len(self.num_experts) != 1:
            raise ValueError(f"num_experts={self.num_experts}: only a one-element list is supported")
        if self.moe_expert_interval != 1:
            raise ValueError(
                f"moe_expert_interval={self.moe_expert_interval}: the release layout of dense layers is not "
                "specified; only 1 (every layer MoE) is supported"
            )
        if self.num_experts_per_tok != 2:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok}: the release layout is always top-2")
        if self.moe_use_mixtral_gating:
            raise ValueError("moe_use_mixtral_gating=true is not supported by this modeling file")
        return MoESpec(
            num_ffn_experts=self.num_experts[0] - 4,
            num_constant_experts=2,
            num_copy_experts=1,
            num_zero_experts=1,
            top_k=2,
            expert_intermediate_size=self.intermediate_size,
            every_n_layers=1,
            gating_residual=True,
            gate_convention="release",
            logits_std_norm=self.moe_use_logits_norm,
            target_std=self.moe_gate_norm_std,
            two_layer_router=self.moe_2layer_gate,
            scale_input_by_topk=not self.moe_feature_no_mul_topk,
            gate_map_in_first_layer=True,
        )


class MoEPPConfig(_DecoderConfig):
    """moepp's own layout (model_type "moepp", architectures ["MoEPPForCausalLM"]). `intermediate_size` is the width
    of the dense layers, `moe_intermediate_size` that of each FFN expert."""

    model_type = "moepp"

    moe_num_ffn_experts: int = 8
    moe_num_constant_experts: int = 2
    moe_num_copy_experts: int = 1
    moe_num_zero_experts: int = 1
    moe_intermediate_size: int = 4096
    moe_every_n_layers: int = 1
    moe_gating_residual: bool = True
    moe_gate_convention: str = "paper"
    moe_logits_std_norm: bool = False
    moe_target_std: float = 1.0
    moe_two_layer_router: bool = False
    moe_scale_input_by_topk: bool = False

    def moe_spec(self) -> MoESpec:
        if self.moe_gate_convention not in ("paper", "release"):
            raise ValueError(f"moe_gate_convention={self.moe_gate_convention!r}: use paper or release")
        if self.moe_every_n_layers < 1:
            raise ValueError(f"moe_every_n_layers={self.moe_every_n_layers}: must be >= 1")
        return MoESpec(
            num_ffn_experts=self.moe_num_ffn_experts,
            num_constant_experts=self.moe_num_constant_experts,
            num_copy_experts=self.moe_num_copy_experts,
            num_zero_experts=self.moe_num_zero_experts,
            top_k=self.num_experts_per_tok,
            expert_intermediate_size=self.moe_intermediate_size,
            every_n_layers=self.moe_every_n_layers,
            gating_residual=self.moe_gating_residual,
            gate_convention=self.moe_gate_convention,
            logits_std_norm=self.moe_logits_std_norm,
            target_std=self.moe_target_std,
            two_layer_router=self.moe_two_layer_router,
            scale_input_by_topk=self.moe_scale_input_by_topk,
            gate_map_in_first_layer=False,
        )


__all__ = ["MoEPPConfig", "MoEPlusPlusConfig", "MoESpec"]
