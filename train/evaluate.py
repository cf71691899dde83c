"""Validation loss and, on the synthetic corpus, how many FFN experts easy and hard positions use."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

from data.packing import DocumentPacking, window_inputs
from data.synthetic import SyntheticCorpus
from model.moe import MoELayer
from model.routers import RouterOutput
from parallel.loss import lm_loss


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: list[Tensor],
    amp: contextlib.AbstractContextManager,
    corpus: SyntheticCorpus | None = None,
    seq_shard: tuple[int, int] | None = None,
    documents: DocumentPacking | None = None,
) -> dict[str, Any]:
    """Validation loss (and FFN experts per easy/hard position on the synthetic corpus). seq_shard (index, count):
    under sequence parallelism this rank's MoE layers see only that slice of each sequence, so the easy/hard
    statistics cover that slice. documents: the same document masking and EOD loss mask as training."""
    was_training = model.training
    model.eval()
    routes: list[RouterOutput] = []
    moe_layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    # Forward hooks on the routers see each layer's choices without the model keeping any per-token state.
    hooks = [m.router.register_forward_hook(lambda _m, _i, out: routes.append(out)) for m in moe_layers]
    try:
        losses, easy_ffn, hard_ffn = [], [], []
        for tokens in batches:
            routes.clear()
            inputs, targets, doc_inputs = window_inputs(tokens, documents)
            with amp:
                out = model(inputs, **doc_inputs)
            losses.append(lm_loss(out, targets))
            if corpus is not None and routes:
                # A position is easy when the token it predicts is a tail token (fully determined by context).
                easy = torch.from_numpy(~corpus.is_head(tokens[:, 1:].cpu().numpy()))
                if seq_shard is not None:
                    easy = easy.chunk(seq_shard[1], dim=1)[seq_shard[0]]
                easy = easy.reshape(-1).to(tokens.device)
                n_ffn = moe_layers[0].num_ffn
                ffn_T = torch.stack([((r.expert_idx_TK < n_ffn) & r.kept_TK).sum(-1).float() for r in routes]).mean(0)
                easy_ffn.append(ffn_T[easy])
                hard_ffn.append(ffn_T[~easy])
        result: dict[str, Any] = {"val_loss": torch.stack(losses).mean().item()}  # host sync, eval only
        if easy_ffn:
            result["ffn_per_token_easy"] = torch.cat(easy_ffn).mean().item()
            result["ffn_per_token_hard"] = torch.cat(hard_ffn).mean().item()
        return result
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)


@torch.no_grad()
def evaluate_pipeline(
    pipeline,
    batches: list[Tensor],
    amp: contextlib.AbstractContextManager,
    pp_group,
    documents: DocumentPacking | None = None,
) -> dict[str, Any]:
    """Validation loss through pipeline stages: the last stage computes it, every stage gets it. (The per-position
    easy/hard routing statistics need all layers in one place and are not computed under pipeline parallelism.)"""
    import torch.distributed as dist

    model = pipeline.model
    was_training = model.training
    model.eval()
    try:
        total = torch.zeros((), device=batches[0].device)
        for tokens in batches:
            out = pipeline.forward_only(tokens, amp, documents)
            if pipeline.is_last:
                total += lm_loss(out, window_inputs(tokens, documents)[1])
        dist.all_reduce(total, group=pp_group)
        return {"val_loss": (total / len(batches)).item()}  # host sync, eval only
    finally:
        model.train(was_training)
