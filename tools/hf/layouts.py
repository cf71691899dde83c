"""Which Hugging Face layout can express a trained model, and its config.json.

Three layouts:
- RELEASE ("MoE++"): the public MoE++-7B release's config fields and keys; our remote code.
- OWN ("moepp"): the same keys, our own config fields; our remote code. For MoE++ models the release cannot express.
- MIXTRAL: transformers' native `MixtralForCausalLM`, no remote code. For vanilla top-k MoE with Mixtral's gates.

A layout is used only if it reproduces exactly what was trained; otherwise the reasons are reported and the next
layout that can is used. Nothing here changes a model's semantics to make it fit.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from model.config import ModelConfig, MoEConfig

RELEASE = "release"
OWN = "moepp"
MIXTRAL = "mixtral"

# The field under which an export keeps our own model/moe config sections, so an import gets back exactly the
# config that was trained (training-only fields such as moe.tau included).
STASH_KEY = "moepp_training_config"

_MIXTRAL_RENAMED = ("rope_theta", "torch_dtype")
_RELEASE_AUTO_MAP = {
    "AutoConfig": "configuration_moepp.MoEPlusPlusConfig",
    "AutoModelForCausalLM": "modeling_moepp.MoeForCausalLM",
}
_OWN_AUTO_MAP = {
    "AutoConfig": "configuration_moepp.MoEPPConfig",
    "AutoModelForCausalLM": "modeling_moepp.MoEPPForCausalLM",
}


def export_blockers(moe: MoEConfig) -> list[str]:
    """Router-family features no exported layout (ours, the release's, Mixtral's) can express yet."""
    if not moe.enabled:
        return []
    out = []
    if moe.router.kind == "etr":
        out.append("moe.router.kind=etr (fixed GrAP vectors and cosine gates)")
    if any(t.kind == "aux_free_bias" for t in moe.balance):
        out.append("an aux_free_bias term (the selection bias changes routing)")
    if moe.shared_experts:
        out.append(f"moe.shared_experts={moe.shared_experts}")
    if moe.router.kind == "topk" and moe.router.mixtral_gating and mixtral_blockers(moe):
        out.append(
            "moe.router.mixtral_gating outside a model Mixtral expresses (" + "; ".join(mixtral_blockers(moe)) + ")"
        )
    return out


def release_blockers(moe: MoEConfig) -> list[str]:
    """Why the release layout cannot express this model (empty: it can)."""
    if not moe.enabled:
        return ["moe.num_experts=0 (a dense model)"]
    out = []
    if moe.router.kind != "moepp":
        out.append(f"moe.router.kind={moe.router.kind}; the release router is moepp")
    counts = (moe.num_zero_experts, moe.num_copy_experts, moe.num_constant_experts)
    if counts != (1, 1, 2):
        out.append(f"zero/copy/constant experts are {counts[0]}/{counts[1]}/{counts[2]}; the release fixes 1/1/2")
    if moe.top_k != 2:
        out.append(f"moe.top_k={moe.top_k}; the release fixes top-2")
    if moe.router.gate_convention != "release":
        out.append(
            f"moe.router.gate_convention={moe.router.gate_convention} (raw top-k probabilities, not renormalised); "
            "the release can only say release gates (zero expert masked, renormalised) or Mixtral gating "
            "(renormalised, zero expert not masked)"
        )
    if not moe.gating_residual:
        out.append("moe.gating_residual=false; the release has a gating residual in every MoE layer but the first")
    if moe.every_n_layers != 1:
        out.append(
            f"moe.every_n_layers={moe.every_n_layers} (dense layers between MoE layers); the release layout does "
            "not specify dense layers (moe_expert_interval is always 1)"
        )
    return out


def mixtral_blockers(moe: MoEConfig) -> list[str]:
    """Why Mixtral cannot express this model (empty: it can). Mixtral routes softmax over all experts -> top-k ->
    renormalise, in every layer, from a single linear router."""
    if not moe.enabled:
        return ["moe.num_experts=0 (a dense model)"]
    out = []
    if moe.num_zc_experts:
        out.append(f"{moe.num_zc_experts} zero-computation experts; Mixtral has FFN experts only")
    if moe.gating_residual:
        out.append("moe.gating_residual=true; Mixtral routers have no residual")
    if moe.every_n_layers != 1:
        out.append(f"moe.every_n_layers={moe.every_n_layers}; every Mixtral layer is an MoE layer")
    mixtral_gates = moe.router.kind == "topk" and moe.router.mixtral_gating
    if moe.router.gate_convention == "paper" and moe.top_k < moe.num_total_experts and not mixtral_gates:
        out.append(
            "moe.router.gate_convention=paper (top-k probabilities not renormalised); Mixtral renormalises them "
            "(our release convention does the same)"
        )
    if moe.router.two_layer:
        out.append("moe.router.two_layer=true; Mixtral's router is one linear layer")
    if moe.router.logits_std_norm:
        out.append("moe.router.logits_std_norm=true; Mixtral does not normalise router logits")
    if moe.scale_input_by_topk:
        out.append("moe.scale_input_by_topk=true; Mixtral does not scale expert inputs")
    return out


def training_only_notes(moe: MoEConfig) -> list[str]:
    """Differences between training and the export that do not change the trained weights' meaning."""
    if moe.enabled and moe.capacity_factor is not None:
        return [
            f"moe.capacity_factor={moe.capacity_factor} drops tokens over capacity during training; the export "
            "routes dropless (capacity depends on the whole batch and cannot work token by token with a KV cache), "
            "so its logits equal our model's with moe.capacity_factor=null"
        ]
    return []


def _decoder_fields(model: ModelConfig, tokens: dict[str, int | None], dtype: str) -> dict[str, Any]:
    return {
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_heads,
        "num_key_value_heads": model.kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": model.max_seq_len,
        "rope_theta": model.rope_theta,
        "rms_norm_eps": model.norm_eps,
        "initializer_range": model.init_std,
        "tie_word_embeddings": False,
        "use_cache": True,
        **tokens,
        "torch_dtype": dtype,
    }


def hf_config(model: ModelConfig, moe: MoEConfig, layout: str, tokens: dict[str, int | None], dtype: str) -> dict:
    """config.json of an export (dtype: "float32" or "bfloat16"). Our own sections ride along under STASH_KEY."""
    stash = {STASH_KEY: {"model": dataclasses.asdict(model), "moe": dataclasses.asdict(moe)}}
    expert_width = moe.expert_ffn_hidden_size or model.ffn_hidden_size
    if layout == MIXTRAL:
        from transformers import MixtralConfig  # optional: needed by this layout only

        # Mixtral takes the RoPE base inside rope_parameters and the dtype as `dtype`.
        fields = {k: v for k, v in _decoder_fields(model, tokens, dtype).items() if k not in _MIXTRAL_RENAMED}
        cfg = MixtralConfig(
            **fields,
            intermediate_size=expert_width,
            num_local_experts=moe.num_experts,
            num_experts_per_tok=moe.top_k,
            rope_parameters={"rope_type": "default", "rope_theta": model.rope_theta},
            sliding_window=None,
            dtype=dtype,
            architectures=["MixtralForCausalLM"],
        )
        return {**cfg.to_dict(), **stash}
    if layout == RELEASE:
        return {
            "architectures": ["MoeForCausalLM"],
            "model_type": "MoE++",
            "auto_map": _RELEASE_AUTO_MAP,
            **_decoder_fields(model, tokens, dtype),
            "intermediate_size": expert_width,
            "num_experts": [moe.num_total_experts],
            "num_experts_per_tok": moe.top_k,
            "moe_expert_interval": 1,
            "moe_use_mixtral_gating": False,
            "moe_2layer_gate": moe.router.two_layer,
            "moe_use_logits_norm": moe.router.logits_std_norm,
            "moe_gate_norm_std": moe.router.target_std,
            "moe_feature_no_mul_topk": not moe.scale_input_by_topk,
            **stash,
        }
    return {
        "architectures": ["MoEPPForCausalLM"],
        "model_type": "moepp",
        "auto_map": _OWN_AUTO_MAP,
        **_decoder_fields(model, tokens, dtype),
        "intermediate_size": model.ffn_hidden_size,
        "num_experts_per_tok": moe.top_k,
        "moe_num_ffn_experts": moe.num_experts,
        "moe_num_constant_experts": moe.num_constant_experts,
        "moe_num_copy_experts": moe.num_copy_experts,
        "moe_num_zero_experts": moe.num_zero_experts,
        "moe_intermediate_size": expert_width,
        "moe_every_n_layers": moe.every_n_layers,
        "moe_gating_residual": moe.gating_residual,
        "moe_gate_convention": moe.router.gate_convention,
        "moe_logits_std_norm": moe.router.logits_std_norm,
        "moe_target_std": moe.router.target_std,
        "moe_two_layer_router": moe.router.two_layer,
        "moe_scale_input_by_topk": moe.scale_input_by_topk,
        **stash,
    }
