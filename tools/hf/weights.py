"""One table maps every tensor of a Hugging Face export to a slice of one of our parameters, and both directions
read it: export copies `ours[our_key][index]` to `hf_key`, import copies `hf_key` back into that slice. So export
then import is the identity by construction, and a key missing on either side is found by the same table.

Our names: `tok_embeddings`, `layers.{i}.attention.w{q,k,v,o}`, `attention_norm`, `ffn_norm`, MoE layers
`ffn.router.wg` (or `wg.0`/`wg.2`), `ffn.router.gate_map`, stacked `ffn.experts.w_up [E, 2F, D]` (gate half first)
and `w_down [E, D, F]`, `ffn.constant.w_c [C, 2, D]` and `v [C, D]`; dense layers `ffn.w_gate/w_up/w_down`; `norm`,
`output`.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.config import ModelConfig, MoEConfig
from tools.hf.layouts import MIXTRAL, RELEASE

# An index into one of our tensors: () is the whole tensor, (e,) one expert of a stack, (e, slice) half of it.
Index = tuple[int | slice, ...]


@dataclass(frozen=True)
class Rule:
    hf_key: str
    our_key: str | None  # None: the tensor has no counterpart in our model and is written as zeros
    index: Index = ()
    zeros_shape: tuple[int, ...] = ()


def _first_moe_layer(model: ModelConfig, moe: MoEConfig) -> int | None:
    return next((i for i in range(model.num_layers) if moe.is_moe_layer(i)), None)


def _moe_layer_rules(p: str, o: str, layer: int, model: ModelConfig, moe: MoEConfig, layout: str) -> list[Rule]:
    """p: the HF prefix of this layer, o: ours."""
    n_ffn, n_const = moe.num_experts, moe.num_constant_experts
    F = moe.expert_ffn_hidden_size or model.ffn_hidden_size
    if layout == MIXTRAL:
        m = f"{p}block_sparse_moe."
        rules = [Rule(f"{m}gate.weight", f"{o}ffn.router.wg.weight")]
        for e in range(n_ffn):
            rules += [
                Rule(f"{m}experts.{e}.w1.weight", f"{o}ffn.experts.w_up", (e, slice(0, F))),
                Rule(f"{m}experts.{e}.w3.weight", f"{o}ffn.experts.w_up", (e, slice(F, 2 * F))),
                Rule(f"{m}experts.{e}.w2.weight", f"{o}ffn.experts.w_down", (e,)),
            ]
        return rules
    m = f"{p}mlp.moe."
    if moe.router.two_layer:
        rules = [Rule(f"{m}gate.wg.{i}.weight", f"{o}ffn.router.wg.{i}.weight") for i in (0, 2)]
    else:
        rules = [Rule(f"{m}gate.wg.weight", f"{o}ffn.router.wg.weight")]
    if moe.gating_residual:
        if layer != _first_moe_layer(model, moe):
            rules.append(Rule(f"{m}gate.gate_map.weight", f"{o}ffn.router.gate_map.weight"))
        elif layout == RELEASE:
            # The release keeps a gate_map in the first MoE layer too and never uses it; we have none.
            n = moe.num_total_experts
            rules.append(Rule(f"{m}gate.gate_map.weight", None, zeros_shape=(n, n)))
    x = f"{m}experts.experts."
    for e in range(n_ffn):
        rules += [
            Rule(f"{x}{e}.up_proj.weight", f"{o}ffn.experts.w_up", (e,)),
            Rule(f"{x}{e}.down_proj.weight", f"{o}ffn.experts.w_down", (e,)),
        ]
    for c in range(n_const):
        rules += [
            Rule(f"{x}{n_ffn + c}.constant", f"{o}ffn.constant.v", (c,)),
            Rule(f"{x}{n_ffn + c}.wg.weight", f"{o}ffn.constant.w_c", (c,)),
        ]
    return rules


def weight_rules(model: ModelConfig, moe: MoEConfig, layout: str) -> list[Rule]:
    """Every tensor of the export, in file order."""
    rules = [Rule("model.embed_tokens.weight", "tok_embeddings.weight")]
    for i in range(model.num_layers):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        rules += [
            Rule(f"{p}input_layernorm.weight", f"{o}attention_norm.weight"),
            *(Rule(f"{p}self_attn.{x}_proj.weight", f"{o}attention.w{x}.weight") for x in "qkvo"),
            Rule(f"{p}post_attention_layernorm.weight", f"{o}ffn_norm.weight"),
        ]
        if moe.is_moe_layer(i):
            rules += _moe_layer_rules(p, o, i, model, moe, layout)
        else:
            rules += [Rule(f"{p}mlp.{x}_proj.weight", f"{o}ffn.w_{x}.weight") for x in ("gate", "up", "down")]
    return [*rules, Rule("model.norm.weight", "norm.weight"), Rule("lm_head.weight", "output.weight")]
