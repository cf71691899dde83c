"""MoE++ decoder for Hugging Face transformers (>= 5.0), written for moepp's exports. It ships inside each export
folder next to `configuration_moepp.py` and is loaded with `trust_remote_code=True`; it imports nothing from the
moepp repository.

Block: h = x + Attn(RMSNorm(x)); out = h + FFN(RMSNorm(h)), where FFN is an MoE++ layer (FFN experts plus zero,
copy and constant experts, routed top-k over all of them jointly) or, between MoE layers, a dense SwiGLU.
The router of MoE layer j computes G_j = W_j x + Wg_j G_{j-1} (gating residual): the pre-normalisation logits of
each MoE layer flow to the next one *per token*, so decoding with a KV cache needs nothing cached for them.

Expert order: [FFN x N_ffn, constant x n_const, copy x n_copy, zero x n_zero]. The arithmetic follows moepp's
training model (fp32 router, fp32 accumulation of expert outputs, RoPE tables computed in float64) so that fp32
logits agree with it to rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel

from .configuration_moepp import MoEPlusPlusConfig, MoEPPConfig, MoESpec


class MoEPPRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_cos_sin(position_ids: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin [B, S, Dh] in the rotate-half convention (pairs (i, i + Dh/2)); angles in float64, then fp32."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64, device=position_ids.device) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    angles = position_ids.to(torch.float64)[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x_BHSD: Tensor, cos_BSD: Tensor, sin_BSD: Tensor) -> Tensor:
    half = x_BHSD.shape[-1] // 2
    rotated = torch.cat([-x_BHSD[..., half:], x_BHSD[..., :half]], dim=-1)
    # fp32 tables against bf16 activations: computed in fp32 and rounded once.
    return (x_BHSD * cos_BSD[:, None] + rotated * sin_BSD[:, None]).to(x_BHSD.dtype)


def eager_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, Tensor]:
    """Plain softmax attention; attention_mask is the additive (float) or boolean mask from create_causal_mask."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    elif query.shape[2] > 1:
        q, k = query.shape[2], key.shape[2]
        causal = torch.ones(q, k, dtype=torch.bool, device=query.device).tril(k - q)
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


class MoEPPAttention(nn.Module):
    def __init__(self, config: MoEPlusPlusConfig | MoEPPConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        d, h, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.q_proj = nn.Linear(d, h * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(h * self.head_dim, d, bias=False)

    def forward(
        self,
        x_BSD: Tensor,
        rope: tuple[Tensor, Tensor],
        attention_mask: Tensor | None,
        past_key_values: Cache | None,
        **kwargs,
    ) -> Tensor:
        B, S, _ = x_BSD.shape
        q = self.q_proj(x_BSD).view(B, S, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x_BSD).view(B, S, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x_BSD).view(B, S, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        attend: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention)
        out, _ = attend(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
        return self.o_proj(out.reshape(B, S, -1))


class MoEPPDenseMLP(nn.Module):
    """SwiGLU of the dense (non-MoE) layers: down(silu(gate x) * up x)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEPPGate(nn.Module):
    """Router logits G_j = W_j x + Wg_j G_{j-1}, in fp32."""

    def __init__(self, hidden_size: int, spec: MoESpec, has_gate_map: bool, uses_residual: bool) -> None:
        super().__init__()
        n = spec.num_experts
        if spec.two_layer_router:
            self.wg: nn.Module = nn.Sequential(
                nn.Linear(hidden_size, 8 * n, bias=False), nn.Tanh(), nn.Linear(8 * n, n, bias=False)
            )
        else:
            self.wg = nn.Linear(hidden_size, n, bias=False)
        self.gate_map = nn.Linear(n, n, bias=False) if has_gate_map else None
        self.uses_residual = uses_residual

    def forward(self, x_TD: Tensor, prev_logits_TE: Tensor | None) -> Tensor:
        x = x_TD.float()
        if isinstance(self.wg, nn.Linear):
            logits = F.linear(x, self.wg.weight.float())
        else:
            logits = F.linear(torch.tanh(F.linear(x, self.wg[0].weight.float())), self.wg[2].weight.float())
        if self.uses_residual:
            logits = logits + F.linear(prev_logits_TE.float(), self.gate_map.weight.float())
        return logits


class MoEPPExpert(nn.Module):
    """SwiGLU FFN expert with the fused up projection [2F, D], gate half first."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class MoEPPConstantExpert(nn.Module):
    """E(x) = a1 x + a2 v with [a1, a2] = softmax(W_c x)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.constant = nn.Parameter(torch.empty(hidden_size))
        self.wg = nn.Linear(hidden_size, 2, bias=False)


class MoEPPParameterFreeExpert(nn.Module):
    """Copy (E(x) = x) or zero (E(x) = 0) expert: no parameters, evaluated inside the MoE layer."""


class MoEPPExperts(nn.Module):
    def __init__(self, hidden_size: int, spec: MoESpec) -> None:
        super().__init__()
        experts: list[nn.Module] = [
            MoEPPExpert(hidden_size, spec.expert_intermediate_size) for _ in range(spec.num_ffn_experts)
        ]
        experts += [MoEPPConstantExpert(hidden_size) for _ in range(spec.num_constant_experts)]
        experts += [MoEPPParameterFreeExpert() for _ in range(spec.num_copy_experts + spec.num_zero_experts)]
        self.experts = nn.ModuleList(experts)


class MoEPPMoE(nn.Module):
    def __init__(self, hidden_size: int, spec: MoESpec, has_gate_map: bool, uses_residual: bool) -> None:
        super().__init__()
        self.spec = spec
        self.gate = MoEPPGate(hidden_size, spec, has_gate_map, uses_residual)
        self.experts = MoEPPExperts(hidden_size, spec)
        self.first_constant = spec.num_ffn_experts
        self.first_copy = self.first_constant + spec.num_constant_experts
        self.first_zero = self.first_copy + spec.num_copy_experts

    def route(self, logits_TE: Tensor) -> tuple[Tensor, Tensor]:
        """(expert index [T, K], gate [T, K] fp32) from the residual-augmented logits."""
        spec = self.spec
        scores = logits_TE
        if spec.logits_std_norm:
            # Only the softmax sees the normalised logits; the residual passed on is the raw one.
            scores = logits_TE / (logits_TE.std(dim=-1, keepdim=True) / spec.target_std)
        top_p, idx = scores.softmax(dim=-1).topk(spec.top_k, dim=-1)
        if spec.gate_convention == "paper":
            return idx, top_p
        masked = top_p * (idx < self.first_zero)
        return idx, masked / masked.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(masked.dtype).tiny)

    def zero_computation(self, x_TD: Tensor, idx_TK: Tensor, gate_TK: Tensor) -> Tensor:
        """Copy and constant experts as per-token coefficients, fp32 [T, D]: c_x * x + sum_c g_c a2_c v_c."""
        is_copy = (idx_TK >= self.first_copy) & (idx_TK < self.first_zero)
        x_coef_T = (gate_TK * is_copy).sum(dim=-1)
        constants = self.experts.experts[self.first_constant : self.first_copy]
        if len(constants) == 0:
            return x_coef_T[:, None] * x_TD.float()
        w_c = torch.stack([c.wg.weight for c in constants])  # [C, 2, D]
        v_CD = torch.stack([c.constant for c in constants])
        is_const = (idx_TK >= self.first_constant) & (idx_TK < self.first_copy)
        slot_TK = (idx_TK - self.first_constant).clamp(0, len(constants) - 1)
        gate_TC = gate_TK.new_zeros(gate_TK.shape[0], len(constants)).scatter_add(1, slot_TK, gate_TK * is_const)
        a_TC2 = torch.einsum("td,cjd->tcj", x_TD, w_c).float().softmax(dim=-1)
        x_coef_T = x_coef_T + (gate_TC * a_TC2[..., 0]).sum(dim=-1)
        return x_coef_T[:, None] * x_TD.float() + (gate_TC * a_TC2[..., 1]) @ v_CD.float()

    def forward(self, x_TD: Tensor, prev_logits_TE: Tensor | None) -> tuple[Tensor, Tensor]:
        logits = self.gate(x_TD, prev_logits_TE)
        idx, gates = self.route(logits)
        x_in = x_TD * self.spec.top_k if self.spec.scale_input_by_topk else x_TD
        out = self.zero_computation(x_in, idx, gates)
        # Experts in index order, each over its tokens in token order: the same accumulation order as training.
        for e in range(self.spec.num_ffn_experts):
            token, slot = torch.where(idx == e)
            if token.numel():
                y = self.experts.experts[e](x_in[token])
                out = out.index_add(0, token, y.float() * gates[token, slot, None])
        return out.to(x_TD.dtype), logits


class MoEPPSparseBlock(nn.Module):
    """Holds the MoE layer as `moe` (the release's key names: mlp.moe.gate..., mlp.moe.experts.experts.{e}...)."""

    def __init__(self, hidden_size: int, spec: MoESpec, has_gate_map: bool, uses_residual: bool) -> None:
        super().__init__()
        self.moe = MoEPPMoE(hidden_size, spec, has_gate_map, uses_residual)

    def forward(self, x_TD: Tensor, prev_logits_TE: Tensor | None) -> tuple[Tensor, Tensor]:
        return self.moe(x_TD, prev_logits_TE)


class MoEPPDecoderLayer(nn.Module):
    def __init__(self, config: MoEPlusPlusConfig | MoEPPConfig, spec: MoESpec, layer_idx: int, first_moe: int) -> None:
        super().__init__()
        d = config.hidden_size
        self.self_attn = MoEPPAttention(config, layer_idx)
        self.input_layernorm = MoEPPRMSNorm(d, config.rms_norm_eps)
        self.post_attention_layernorm = MoEPPRMSNorm(d, config.rms_norm_eps)
        self.is_moe = spec.is_moe_layer(layer_idx)
        self.mlp: nn.Module
        if self.is_moe:
            uses_residual = spec.gating_residual and layer_idx > first_moe
            has_gate_map = uses_residual or (spec.gate_map_in_first_layer and spec.gating_residual)
            self.mlp = MoEPPSparseBlock(d, spec, has_gate_map, uses_residual)
        else:
            self.mlp = MoEPPDenseMLP(d, config.intermediate_size)

    def forward(
        self,
        x_BSD: Tensor,
        router_logits_TE: Tensor | None,
        rope: tuple[Tensor, Tensor],
        attention_mask: Tensor | None,
        past_key_values: Cache | None,
        **kwargs,
    ) -> tuple[Tensor, Tensor | None]:
        h = x_BSD + self.self_attn(self.input_layernorm(x_BSD), rope, attention_mask, past_key_values, **kwargs)
        normed = self.post_attention_layernorm(h)
        if not self.is_moe:
            return h + self.mlp(normed), router_logits_TE
        B, S, D = normed.shape
        out_TD, router_logits_TE = self.mlp(normed.reshape(B * S, D), router_logits_TE)
        return h + out_TD.view(B, S, D), router_logits_TE


class MoEPPPreTrainedModel(PreTrainedModel):
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules: ClassVar[list[str]] = ["MoEPPDecoderLayer"]
    _skip_keys_device_placement: ClassVar[list[str]] = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, MoEPPConstantExpert):
            init.normal_(module.constant, mean=0.0, std=1.0)  # MoE++: constant vectors v ~ N(0, 1)


class MoEPPModel(MoEPPPreTrainedModel):
    def __init__(self, config: MoEPlusPlusConfig | MoEPPConfig) -> None:
        super().__init__(config)
        spec = config.moe_spec()
        moe_layers = [i for i in range(config.num_hidden_layers) if spec.is_moe_layer(i)]
        first_moe = moe_layers[0] if moe_layers else -1
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [MoEPPDecoderLayer(config, spec, i, first_moe) for i in range(config.num_hidden_layers)]
        )
        self.norm = MoEPPRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)[None] + past
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        rope = rope_cos_sin(position_ids, head_dim, self.config.rope_theta)
        h = inputs_embeds
        router_logits: Tensor | None = None
        for layer in self.layers:
            h, router_logits = layer(h, router_logits, rope, mask, past_key_values, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(h), past_key_values=past_key_values)


class _MoEPPCausalLM(MoEPPPreTrainedModel, GenerationMixin):
    def __init__(self, config: MoEPlusPlusConfig | MoEPPConfig) -> None:
        super().__init__(config)
        self.model = MoEPPModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        h = out.last_hidden_state
        # generate() asks only for the last position's logits.
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(h[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)


class MoeForCausalLM(_MoEPPCausalLM):
    """The release layout (config model_type "MoE++")."""

    config_class = MoEPlusPlusConfig


class MoEPPForCausalLM(_MoEPPCausalLM):
    """moepp's own layout (config model_type "moepp")."""

    config_class = MoEPPConfig


__all__ = ["MoEPPForCausalLM", "MoEPPModel", "MoeForCausalLM"]
