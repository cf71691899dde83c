"""config.json of a Hugging Face folder -> our `model:` and `moe:` sections, or a one-line refusal naming the field
our model cannot reproduce. Reads the release layout ("MoE++", e.g. the public MoE++-7B), our own ("moepp") and
Mixtral."""

from __future__ import annotations

from typing import Any

from model.config import ConfigError, ModelConfig, MoEConfig, RouterConfig
from model.errors import UserError
from tools.hf.layouts import MIXTRAL, OWN, RELEASE, STASH_KEY, hf_config
from train.config_load import build


class HFImportError(UserError):
    """A Hugging Face folder our model cannot represent exactly. One line naming the field."""


def detect_layout(cfg: dict[str, Any]) -> str:
    kind = cfg.get("model_type")
    if kind == "MoE++":
        return RELEASE
    if kind == "moepp":
        return OWN
    if kind == "mixtral":
        return MIXTRAL
    raise HFImportError(f"config.json: model_type {kind!r} is not one of MoE++, moepp, mixtral")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise HFImportError(f"config.json: {message}")


def _decoder(cfg: dict[str, Any], ffn_hidden_size: int) -> ModelConfig:
    _require(cfg.get("hidden_act", "silu") == "silu", f"hidden_act {cfg.get('hidden_act')!r}: our FFNs are SwiGLU")
    _require(not cfg.get("tie_word_embeddings", False), "tie_word_embeddings=true: our LM head is untied")
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim")
    _require(
        head_dim in (None, cfg["hidden_size"] // heads),
        f"head_dim={head_dim} differs from hidden_size/num_attention_heads; ours is always that",
    )
    rope = cfg.get("rope_parameters") or {}
    _require(rope.get("rope_type", "default") == "default", f"rope_type {rope.get('rope_type')!r}: only default RoPE")
    _require(not cfg.get("rope_scaling"), "rope_scaling is set; only plain RoPE is supported")
    return ModelConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        ffn_hidden_size=ffn_hidden_size,
        max_seq_len=cfg.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        init_std=float(cfg.get("initializer_range", 0.02)),
    )


def _from_release(cfg: dict[str, Any]) -> tuple[ModelConfig, MoEConfig]:
    n = cfg["num_experts"]
    _require(isinstance(n, list) and len(n) == 1, f"num_experts={n}: expected a one-element list [N_ffn + 4]")
    _require(n[0] > 4, f"num_experts={n}: needs at least one FFN expert besides the 4 zero-computation experts")
    _require(
        cfg.get("moe_expert_interval", 1) == 1,
        f"moe_expert_interval={cfg.get('moe_expert_interval')}: the release layout of dense layers is not specified",
    )
    # Mixtral gating renormalises the top-2 without masking the zero expert: neither of our gate conventions.
    _require(
        not cfg.get("moe_use_mixtral_gating", False),
        "moe_use_mixtral_gating=true (top-2 renormalised, zero expert not masked) has no equivalent gate convention",
    )
    _require(
        cfg.get("num_experts_per_tok", 2) == 2,
        f"num_experts_per_tok={cfg.get('num_experts_per_tok')}: the release layout is always top-2",
    )
    router = RouterConfig(
        gate_convention="release",
        # Missing fields take the release config class's defaults.
        logits_std_norm=bool(cfg.get("moe_use_logits_norm", False)),
        target_std=float(cfg.get("moe_gate_norm_std", 1.0)),
        two_layer=bool(cfg.get("moe_2layer_gate", True)),
    )
    moe = MoEConfig(
        num_experts=n[0] - 4,
        num_zero_experts=1,
        num_copy_experts=1,
        num_constant_experts=2,
        top_k=2,
        gating_residual=True,
        router=router,
        scale_input_by_topk=not cfg.get("moe_feature_no_mul_topk", False),
    )
    return _decoder(cfg, cfg["intermediate_size"]), moe


def _from_own(cfg: dict[str, Any]) -> tuple[ModelConfig, MoEConfig]:
    model = _decoder(cfg, cfg["intermediate_size"])
    width = cfg.get("moe_intermediate_size", cfg["intermediate_size"])
    moe = MoEConfig(
        num_experts=cfg["moe_num_ffn_experts"],
        num_zero_experts=cfg["moe_num_zero_experts"],
        num_copy_experts=cfg["moe_num_copy_experts"],
        num_constant_experts=cfg["moe_num_constant_experts"],
        top_k=cfg["num_experts_per_tok"],
        expert_ffn_hidden_size=None if width == model.ffn_hidden_size else width,
        every_n_layers=cfg.get("moe_every_n_layers", 1),
        gating_residual=cfg["moe_gating_residual"],
        router=RouterConfig(
            gate_convention=cfg["moe_gate_convention"],
            logits_std_norm=cfg.get("moe_logits_std_norm", False),
            target_std=float(cfg.get("moe_target_std", 1.0)),
            two_layer=cfg.get("moe_two_layer_router", False),
        ),
        scale_input_by_topk=cfg.get("moe_scale_input_by_topk", False),
    )
    return model, moe


def _from_mixtral(cfg: dict[str, Any]) -> tuple[ModelConfig, MoEConfig]:
    window = cfg.get("sliding_window")
    max_pos = cfg.get("max_position_embeddings", 2048)
    _require(
        window is None or window >= max_pos,
        f"sliding_window={window} < max_position_embeddings={max_pos}; our attention is not windowed",
    )
    # Mixtral: softmax over all experts, top-k, renormalised = our release convention without zero experts.
    moe = MoEConfig(
        num_experts=cfg["num_local_experts"],
        num_zero_experts=0,
        num_copy_experts=0,
        num_constant_experts=0,
        top_k=cfg["num_experts_per_tok"],
        gating_residual=False,
        router=RouterConfig(gate_convention="release"),
    )
    return _decoder(cfg, cfg["intermediate_size"]), moe


def _tokens(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: cfg.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}


def our_config(cfg: dict[str, Any]) -> tuple[str, ModelConfig, MoEConfig, list[str]]:
    """(layout, model, moe, notes). The config our export stashed is used when it describes this very folder (the
    HF fields it implies equal the folder's), which keeps training-only fields such as moe.tau; otherwise the
    sections are rebuilt from the HF fields with our defaults for the training-only ones."""
    layout = detect_layout(cfg)
    try:
        model, moe = {RELEASE: _from_release, OWN: _from_own, MIXTRAL: _from_mixtral}[layout](cfg)
    except KeyError as e:
        raise HFImportError(f"config.json: field {e} is missing") from None
    try:
        model.validate()
        moe.validate()
    except ConfigError as e:
        raise HFImportError(f"config.json describes a model our config rejects: {e}") from None
    notes = []
    stash = cfg.get(STASH_KEY)
    if isinstance(stash, dict):
        try:
            s_model, s_moe = build(ModelConfig, stash["model"], "model."), build(MoEConfig, stash["moe"], "moe.")
        except (ConfigError, KeyError, TypeError) as e:
            notes.append(f"ignoring {STASH_KEY} ({e}); config rebuilt from the Hugging Face fields")
        else:
            dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
            want = _semantic_fields(hf_config(s_model, s_moe, layout, _tokens(cfg), str(dtype)), layout)
            have = _semantic_fields(cfg, layout)
            if all(have.get(k) == v for k, v in want.items()):
                return layout, s_model, s_moe, notes
            notes.append(f"{STASH_KEY} does not match the Hugging Face fields; config rebuilt from those fields")
    notes.append("training-only fields (moe.balance, tau, capacity_factor) take our defaults")
    return layout, model, moe, notes


def _semantic_fields(cfg: dict[str, Any], layout: str) -> dict[str, Any]:
    """The fields that decide what the model computes (not dtype, ids, versions or our stash)."""
    ignore = {STASH_KEY, "torch_dtype", "dtype", "transformers_version", "bos_token_id", "eos_token_id"}
    ignore |= {"pad_token_id", "_name_or_path", "architectures", "auto_map", "use_cache", "initializer_range"}
    return {k: v for k, v in cfg.items() if k not in ignore} if layout != MIXTRAL else _mixtral_fields(cfg)


def _mixtral_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "num_local_experts",
        "num_experts_per_tok",
        "max_position_embeddings",
        "rms_norm_eps",
        "sliding_window",
    )
    rope = cfg.get("rope_parameters") or {}
    return {**{k: cfg.get(k) for k in keys}, "rope_theta": rope.get("rope_theta", cfg.get("rope_theta"))}
