"""The language-model loss under every layout, below both the train step and the pipeline schedule.

`lm_loss` is the token cross-entropy (vocabulary-parallel when tensor parallelism left the logits sharded over the
vocabulary); `ce_scale` is the factor that makes gradient accumulation and data parallelism give the single
process's loss (train/step.py explains the normalisation).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from data.packing import IGNORE_INDEX, DocumentPacking
from model.transformer import ModelOutput
from parallel.grads import GradSync


def loss_context(output: ModelOutput) -> contextlib.AbstractContextManager:
    """Vocabulary-parallel cross-entropy when tensor parallelism left the logits sharded over the vocabulary
    (forward and backward must both run inside it)."""
    return loss_parallel() if isinstance(output.logits_BSV, DTensor) else contextlib.nullcontext()


def lm_loss(output: ModelOutput, targets_BS: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy over the positions whose target is not IGNORE_INDEX: their mean, or with reduction="sum" their
    sum."""
    logits = output.logits_BSV
    with loss_context(output):
        loss = F.cross_entropy(
            logits.float().flatten(0, 1), targets_BS.reshape(-1), ignore_index=IGNORE_INDEX, reduction=reduction
        )
    # loss_parallel returns a replicated DTensor; its local value is the full loss on every tp rank.
    return loss.to_local() if isinstance(loss, DTensor) else loss


def ce_scale(
    micro_batches: list[Tensor], documents: DocumentPacking | None = None, grad_sync: GradSync | None = None
) -> Tensor | float:
    """dp / N: the factor of each micro-batch's summed CE (N = positions with a loss in the global batch)."""
    if documents is None or not documents.mask_loss:
        # Every micro-batch of every rank holds this many positions, all with a loss: dp / N = 1 / local count.
        return 1.0 / sum(window[:, 1:].numel() for window in micro_batches)
    count = torch.stack([(documents.targets(w) != IGNORE_INDEX).sum() for w in micro_batches]).sum()
    dp = grad_sync.ctx.dims.dp if grad_sync is not None else 1
    if dp > 1:  # one all-reduce of one number per step; the count stays on the device (no host sync)
        dist.all_reduce(count, group=grad_sync.ctx.group("dp"))
    return dp / count.clamp(min=1)
