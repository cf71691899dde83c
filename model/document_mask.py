"""Block-causal attention within the documents of a packed window.

`doc_ids_BS` gives every position its document (equal ids = same document, non-decreasing along a row): position q
attends to the positions k <= q of its own document only. `document_mask` prepares the mask once per forward (every
layer reuses it) and `document_attention` applies it. Three kernels compute the same thing:

- `segments` (the CPU default): the rows are cut at their starts and at every document boundary, and each
  document is its own causal SDPA call on [1, H, L, Dh]. Work across documents is never done, so this costs less
  than plain causal attention over the window. Documents shorter than `GROUP_TOKENS` are grouped into one call
  with a small block-diagonal causal mask, which bounds the number of calls whatever the document lengths.
- `flex` (the CUDA default): `flex_attention` with a document BlockMask, the kernel compiled with torch.compile
  (only the attention call is compiled); blocks outside every document are skipped.
- `dense`: SDPA with a [B, 1, S, S] boolean mask (any device; the reference the others are tested against).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Kernel = Literal["auto", "segments", "flex", "dense"]
# Consecutive documents are packed into one SDPA call until the call would exceed this many tokens.
GROUP_TOKENS = 256


@dataclass
class DocumentMask:
    kernel: Literal["segments", "flex", "dense"]
    dense_B1SS: Tensor | None = None
    block_mask: Any = None  # flex_attention's BlockMask
    # segments: the length of each call along the flattened B*S positions, and its mask (None = one document,
    # plain causal).
    group_lengths: list[int] = field(default_factory=list)
    group_masks: list[Tensor | None] = field(default_factory=list)


def resolve_kernel(kernel: Kernel, device: torch.device) -> Literal["segments", "flex", "dense"]:
    if kernel != "auto":
        return kernel
    if device.type == "cuda":
        return "flex"
    # flex_attention has no backward on CPU, and the segment kernel beats its compiled forward there.
    return "segments" if device.type == "cpu" else "dense"


def document_mask(doc_ids_BS: Tensor, kernel: Kernel = "auto") -> DocumentMask:
    """The block-causal mask of a batch of packed windows, in the form `kernel` consumes."""
    chosen = resolve_kernel(kernel, doc_ids_BS.device)
    if chosen == "dense":
        return DocumentMask("dense", dense_B1SS=_dense_mask(doc_ids_BS))
    if chosen == "flex":
        return DocumentMask("flex", block_mask=_block_mask(doc_ids_BS))
    lengths, masks = _segment_groups(doc_ids_BS)
    return DocumentMask("segments", group_lengths=lengths, group_masks=masks)


def document_attention(q_BHSD: Tensor, k_BGSD: Tensor, v_BGSD: Tensor, mask: DocumentMask) -> Tensor:
    """Attention of q over k/v restricted by `mask`; [B, H, S, Dh] (GQA when G < H)."""
    gqa = q_BHSD.shape[1] != k_BGSD.shape[1]
    if mask.kernel == "dense":
        return F.scaled_dot_product_attention(q_BHSD, k_BGSD, v_BGSD, attn_mask=mask.dense_B1SS, enable_gqa=gqa)
    if mask.kernel == "flex":
        flex = _compiled_flex_attention() if q_BHSD.is_cuda else _flex_attention()
        return flex(q_BHSD, k_BGSD, v_BGSD, block_mask=mask.block_mask, enable_gqa=gqa)
    return _segment_attention(q_BHSD, k_BGSD, v_BGSD, mask, gqa)


# Under train.compile the attention's graph breaks here: the number and the lengths of the calls come from the
# host-read document lengths, so a compiled version would be recompiled for every new packing of documents (and
# after dynamo's recompile limit, the whole block would fall back to eager).
@torch.compiler.disable
def _segment_attention(q_BHSD: Tensor, k_BGSD: Tensor, v_BGSD: Tensor, mask: DocumentMask, gqa: bool) -> Tensor:
    B, H, S, Dh = q_BHSD.shape

    def packed(x: Tensor) -> tuple[Tensor, ...]:
        # [B, h, S, Dh] -> [1, h, B*S, Dh], cut into the calls. SDPA takes 4-D inputs: 3-D ones fall back to its
        # slow math path on CPU.
        return x.transpose(0, 1).reshape(1, x.shape[1], B * S, Dh).split(mask.group_lengths, dim=2)

    outs = [
        F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=m is None, enable_gqa=gqa)
        for q, k, v, m in zip(packed(q_BHSD), packed(k_BGSD), packed(v_BGSD), mask.group_masks, strict=True)
    ]
    return torch.cat(outs, dim=2).view(H, B, S, Dh).transpose(0, 1)


def _dense_mask(doc_ids_BS: Tensor) -> Tensor:
    S = doc_ids_BS.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool, device=doc_ids_BS.device).tril()
    return ((doc_ids_BS[:, :, None] == doc_ids_BS[:, None, :]) & causal).unsqueeze(1)


def _segment_groups(doc_ids_BS: Tensor) -> tuple[list[int], list[Tensor | None]]:
    B, S = doc_ids_BS.shape
    # Ids unique over the batch (a row holds at most S documents), so every row start is a boundary too.
    row_offset = torch.arange(B, device=doc_ids_BS.device).unsqueeze(1) * S
    counts = torch.unique_consecutive((doc_ids_BS + row_offset).reshape(-1), return_counts=True)[1]
    lengths = counts.tolist()  # host-device sync: once per forward, shared by every layer
    groups: list[list[int]] = []
    size = 0
    for n in lengths:
        if not groups or size + n > GROUP_TOKENS:
            groups.append([])
            size = 0
        groups[-1].append(n)
        size += n
    masks: list[Tensor | None] = []
    for group in groups:
        if len(group) == 1:
            masks.append(None)
            continue
        doc = torch.repeat_interleave(torch.arange(len(group)), torch.tensor(group)).to(doc_ids_BS.device)
        masks.append(_dense_mask(doc.unsqueeze(0)))
    return [sum(g) for g in groups], masks


def _block_mask(doc_ids_BS: Tensor) -> Any:
    from torch.nn.attention.flex_attention import create_block_mask

    B, S = doc_ids_BS.shape

    def same_document_causal(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return (doc_ids_BS[b, q] == doc_ids_BS[b, kv]) & (q >= kv)

    # Heads share the mask (H=None broadcasts), so a tensor-parallel rank's local heads need nothing else.
    return create_block_mask(same_document_causal, B, None, S, S, device=doc_ids_BS.device, _compile=doc_ids_BS.is_cuda)


def _flex_attention() -> Any:
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


@functools.cache
def _compiled_flex_attention() -> Any:
    # Uncompiled, flex_attention runs an unfused reference implementation; compiling it gives the fused kernel.
    return torch.compile(_flex_attention(), dynamic=False)
