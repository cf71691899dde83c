"""The plain single-device decoder: embedding, pre-norm blocks, final norm, untied LM head.

Shape legend used throughout `model/`: B batch, S sequence, T tokens (B*S), D hidden, H query heads, G key/value
heads, Dh head dim, F FFN width, V vocabulary, E experts (FFN + zero-computation), K top-k, A assignments (T*K).

Nothing here imports torch.distributed: `parallel/` rewrites this model for tensor/expert/pipeline parallelism.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ModelConfig, MoEConfig
from model.document_mask import DocumentMask, Kernel, document_attention, document_mask
from model.experts import DenseFFN
from model.moe import MoELayer, RoutingStats


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin tables [S, Dh] in the rotate-half convention (pairs are (i, i + Dh/2), as in HF LLaMA)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x_BHSD: Tensor, cos_SD: Tensor, sin_SD: Tensor) -> Tensor:
    """cos/sin are [S, Dh] (positions 0..S-1 in every row) or [B, 1, S, Dh] (positions per row)."""
    half = x_BHSD.shape[-1] // 2
    rotated = torch.cat([-x_BHSD[..., half:], x_BHSD[..., :half]], dim=-1)
    return (x_BHSD * cos_SD + rotated * sin_SD).to(x_BHSD.dtype)


class Attention(nn.Module):
    """Causal grouped-query attention through scaled_dot_product_attention, no biases; with a DocumentMask,
    block-causal within each document of the window."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.kv_heads
        self.head_dim = cfg.head_dim
        self.wq = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.hidden_size, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x_BSD: Tensor, cos_SD: Tensor, sin_SD: Tensor, mask: DocumentMask | None = None) -> Tensor:
        B, S, _ = x_BSD.shape
        # -1 instead of the configured head counts: tensor parallelism shards the projections, so each rank sees
        # only its own heads.
        q = self.wq(x_BSD).view(B, S, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x_BSD).view(B, S, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x_BSD).view(B, S, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos_SD, sin_SD), apply_rope(k, cos_SD, sin_SD)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
        else:
            out = document_attention(q, k, v, mask)
        return self.wo(out.transpose(1, 2).reshape(B, S, -1))


class Block(nn.Module):
    """h = x + Attn(RMSNorm(x)); out = h + FFN(RMSNorm(h)), where FFN is an MoE(++) layer or a dense SwiGLU."""

    def __init__(self, cfg: ModelConfig, moe_cfg: MoEConfig, layer_idx: int, has_residual: bool) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.is_moe = moe_cfg.is_moe_layer(layer_idx)
        self.ffn: nn.Module
        if self.is_moe:
            self.ffn = MoELayer(
                cfg.hidden_size, moe_cfg, ffn_hidden_size=cfg.ffn_hidden_size, has_residual=has_residual
            )
        else:
            self.ffn = DenseFFN(cfg.hidden_size, cfg.ffn_hidden_size)

    def forward(
        self,
        x_BSD: Tensor,
        router_logits_TE: Tensor | None,
        cos_SD: Tensor,
        sin_SD: Tensor,
        mask: DocumentMask | None = None,
    ) -> tuple[Tensor, Tensor | None, tuple[Tensor, RoutingStats] | None]:
        """Returns (hidden states, router logits for the next MoE layer, (weighted balance loss, routing stats) of
        an MoE block or None). Nothing here reads `layer_idx`: under train.compile every block of a kind shares one
        graph, and a graph that read the index would be recompiled for each layer."""
        # Every argument positionally: tensor parallelism's input plan lists one layout per positional input.
        h = x_BSD + self.attention(self.attention_norm(x_BSD), cos_SD, sin_SD, mask)
        normed = self.ffn_norm(h)
        if not self.is_moe:
            return h + self.ffn(normed), router_logits_TE, None
        B, S, D = normed.shape
        out_TD, logits_TE, aux_loss, stats = self.ffn(normed.reshape(B * S, D), router_logits_TE, num_sequences=B)
        return h + out_TD.view(B, S, D), logits_TE, (aux_loss, stats)


@dataclass
class MoEAux:
    layer_idx: int
    aux_loss: Tensor  # this layer's sum over moe.balance of coeff * term
    stats: RoutingStats


@dataclass
class ModelOutput:
    # None on a pipeline stage without the LM head (it returns hidden_BSD instead).
    logits_BSV: Tensor | None
    # Pre-normalisation router logits of the last MoE layer (fp32): the gating residual a following pipeline
    # stage would consume. None for a model without MoE layers.
    router_logits_TE: Tensor | None
    # Sum over MoE layers of the balance terms, each already multiplied by its moe.balance coefficient: add it to
    # the cross-entropy as it is.
    aux_loss: Tensor
    moe_layers: list[MoEAux] = field(default_factory=list)
    # The residual stream after the last block (what a pipeline stage hands to the next one).
    hidden_BSD: Tensor | None = None


def sum_terms(terms: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    total: dict[str, Tensor] = {}
    for t in terms:
        for k, v in t.items():
            total[k] = total[k] + v if k in total else v
    return total


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, moe_cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg, self.moe_cfg = cfg, moe_cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        # A ModuleDict keyed by the global layer index (as torchtitan does) so a pipeline stage can drop the
        # layers it does not own and keep the names of the rest.
        self.layers = nn.ModuleDict()
        seen_moe = False
        for i in range(cfg.num_layers):
            # The first MoE layer has no previous logits, hence no gating residual (and no gate_map parameter).
            has_residual = moe_cfg.gating_residual and seen_moe
            self.layers[str(i)] = Block(cfg, moe_cfg, i, has_residual)
            seen_moe = seen_moe or moe_cfg.is_moe_layer(i)
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # The kernel behind document masks (model/document_mask.py): auto = flex_attention on CUDA, per-document
        # SDPA calls on CPU.
        self.document_kernel: Kernel = "auto"
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        for name, p in self.named_parameters():
            self.init_parameter(name, p)

    @torch.no_grad()
    def init_parameter(self, name: str, p: Tensor, generator: torch.Generator | None = None) -> None:
        """Initialise parameter `name` (a full, unsharded tensor) in place, drawing from `generator` (default: the
        global RNG). parallel/init.py calls it one parameter at a time with a per-parameter generator."""
        std = self.cfg.init_std
        # Output projections get the GPT-2 depth scaling so the residual stream does not grow with depth.
        out_std = std / math.sqrt(2 * self.cfg.num_layers)
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith("constant.v"):
            p.normal_(0.0, 1.0, generator=generator)  # MoE++ spec: constant vectors v ~ N(0, 1)
        elif name.endswith(("wo.weight", "w_down.weight", "experts.w_down")):
            p.normal_(0.0, out_std, generator=generator)
        else:
            p.normal_(0.0, std, generator=generator)

    def forward(
        self,
        tokens_BS: Tensor | None = None,
        hidden_BSD: Tensor | None = None,
        router_logits_TE: Tensor | None = None,
        doc_ids_BS: Tensor | None = None,
        position_ids_BS: Tensor | None = None,
    ) -> ModelOutput:
        """The whole model takes tokens. A pipeline stage (parallel/pipeline.py deletes the parts it does not own:
        the embedding, the final norm and head, other stages' layers) takes the previous stage's hidden states and
        router logits instead, and returns hidden states when it has no head.

        Packed documents (data/packing.py computes both from the token window; every stage takes the same ones,
        over the full sequence even under sequence parallelism): `doc_ids_BS` makes attention block-causal within
        each document (equal ids = same document, non-decreasing along a row), `position_ids_BS` gives the RoPE
        position of every token (e.g. restarting at each document). Without them: causal over the whole window,
        positions 0..S-1."""
        h = self.tok_embeddings(tokens_BS) if self.tok_embeddings is not None else hidden_BSD
        # The full sequence length: under sequence parallelism h holds only this rank's slice of it.
        S = tokens_BS.shape[1] if tokens_BS is not None else h.shape[1]
        if position_ids_BS is None:
            cos, sin = self.rope_cos[:S], self.rope_sin[:S]
        else:
            cos, sin = self.rope_cos[position_ids_BS].unsqueeze(1), self.rope_sin[position_ids_BS].unsqueeze(1)
        mask = document_mask(doc_ids_BS, self.document_kernel) if doc_ids_BS is not None else None
        router_logits = router_logits_TE
        aux: list[MoEAux] = []
        for block in self.layers.values():
            h, router_logits, moe_out = block(h, router_logits, cos, sin, mask)
            if moe_out is not None:
                aux.append(MoEAux(block.layer_idx, *moe_out))
        logits = self.output(self.norm(h)) if self.output is not None else None
        zero = torch.zeros((), dtype=torch.float32, device=h.device)
        aux_loss = torch.stack([a.aux_loss for a in aux]).sum() if aux else zero
        return ModelOutput(logits, router_logits, aux_loss, aux, h)

    def aux_terms(self, output: ModelOutput) -> dict[str, Tensor]:
        """Each balance term (unweighted, detached) summed over the MoE layers of one forward."""
        return sum_terms([a.stats.aux_terms for a in output.moe_layers])

    def num_params(self, active_only: bool = False) -> int:
        """Parameter count; with active_only, FFN experts count as top_k / N_ffn of their size (an upper bound
        for MoE++, whose tokens use fewer than top_k FFN experts)."""
        total = 0
        for name, p in self.named_parameters():
            n = p.numel()
            if active_only and ".experts." in name and self.moe_cfg.enabled:
                n = n * min(self.moe_cfg.top_k, self.moe_cfg.num_experts) // self.moe_cfg.num_experts
            total += n
        return total
