"""One optimizer step: forward/backward over the micro-batches, gradient clipping, AdamW update.

Loss = mean token cross-entropy + the model's aux loss (every moe.balance term times its coefficient, summed over
MoE layers). Nothing here syncs with the host: losses and routing counters stay device tensors until the logger
reads them. After the optimizer step every router gets its between-step update (aux-free bias, ETR capacity).
Whether the resulting state may be saved (state_is_finite) is asked at save time, not per step.

Normalisation of the cross-entropy: the step's CE is the mean over every position with a loss in the whole global
batch (all micro-batches, all data-parallel ranks), N of them. Each micro-batch contributes its *summed* CE times
`dp / N`, so a rank's CE is dp x (its share of the sum) / N and the mean over dp ranks, which data parallelism's 1/dp
gradient averaging and the logger both take, is sum / N: gradient accumulation and data parallelism give the single
process's loss and gradients whatever the micro-batch split. Without `data.eod_mask_loss` every micro-batch holds
the same number of positions and N is known; with it, the masked positions vary, so N is counted from the step's
windows before the forward and summed over dp ranks (one all-reduce of one number per step). The balance loss stays
a mean over micro-batches of per-micro-batch terms (`/ n`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from data.packing import DocumentPacking, window_inputs
from model.moe import RoutingStats
from model.routers import Router
from model.transformer import sum_terms
from parallel.data_parallel import reduce_across_replicas, reshard
from parallel.grads import GradSync
from parallel.loss import ce_scale, lm_loss, loss_context
from parallel.pipeline import PipelineSchedule


@dataclass
class StepResult:
    # This rank's share of the step's mean cross-entropy (detached): its mean over data-parallel ranks is the mean
    # over every position with a loss in the global batch.
    loss: Tensor
    aux_loss: Tensor  # mean over micro-batches of the weighted balance terms summed over layers (detached)
    grad_norm: Tensor
    routing: list[RoutingStats]  # one per MoE layer, counters summed over micro-batches
    skipped: bool = False  # non-finite loss or gradient: the optimizer did not step


def use_bf16_autocast(device: torch.device, dtype: str) -> bool:
    """train.dtype resolved: bf16 autocast on CUDA by default; fp32 (no autocast) on CPU unless it says bf16."""
    return dtype == "bf16" or (dtype == "auto" and device.type == "cuda")


def autocast_context(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA by default; fp32 (no autocast) on CPU unless train.dtype says bf16."""
    if not use_bf16_autocast(device, dtype):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def merge_routing(total: list[RoutingStats] | None, new: list[RoutingStats]) -> list[RoutingStats]:
    if total is None:
        return list(new)
    return [
        RoutingStats(
            a.expert_counts_E + b.expert_counts_E,
            a.dropped + b.dropped,
            a.num_tokens + b.num_tokens,
            a2a=a.a2a + b.a2a,
            aux_terms=sum_terms([a.aux_terms, b.aux_terms]),
        )
        for a, b in zip(total, new, strict=True)
    ]


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[Tensor],
    clip_grad: float,
    amp: contextlib.AbstractContextManager | None = None,
    grad_sync: GradSync | None = None,
    pipeline: PipelineSchedule | None = None,
    documents: DocumentPacking | None = None,
) -> StepResult:
    """micro_batches: token windows [b, S+1]; inputs are [:, :-1], targets [:, 1:]. With a pipeline schedule this
    rank runs its stage's share (1F1B); its loss is then the last stage's CE and its balance loss its own layers'.
    `documents`: document masking, per-document positions and the EOD loss mask (data/packing.py)."""
    amp = amp or contextlib.nullcontext()
    n = len(micro_batches)
    scale = ce_scale(micro_batches, documents, grad_sync)
    if pipeline is not None:
        stage = pipeline.forward_backward(micro_batches, amp, documents, scale)
        ce_sum, aux_sum, routing = stage.ce_sum, stage.aux_sum, None
        for stats in stage.routing:
            routing = merge_routing(routing, stats)
    else:
        ce_sum, aux_sum, routing = local_forward_backward(model, micro_batches, amp, documents, scale)
    if grad_sync is not None:
        grad_sync.reduce()
        grad_norm = grad_sync.clip_(clip_grad)
    else:
        params = [p for p in model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad if clip_grad > 0 else float("inf"), foreach=True)
    # host-device sync: one per step. The norm is global (reduced over every rank), so all ranks agree to skip a
    # step whose loss or gradients are NaN/inf, and none of them updates.
    finite = bool(torch.isfinite(grad_norm))
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    after_optimizer_step(model, stepped=finite)
    return StepResult(ce_sum, aux_sum / n, grad_norm.detach(), routing or [], skipped=not finite)


def state_is_finite(
    model: nn.Module, optimizer: torch.optim.Optimizer, last_step: StepResult | None, distributed: bool
) -> bool:
    """Whether the training state may be saved, the same answer on every rank: the last step had a finite loss and
    gradient norm and was applied, and every parameter, floating-point buffer and optimizer state tensor on every
    rank has a finite norm (a NaN/inf element fails, and so do values whose squares overflow, such as the weights a
    huge learning rate leaves). One read of the whole state, one all-reduce and one host-device sync: save time
    only, never per step."""
    reshard(model)  # the optimizer's sharded parameters, not gathered copies
    # Each rank checks its own shards (the local part of every DTensor); the all-reduce below covers the rest.
    local = [t.to_local() if isinstance(t, DTensor) else t for t in _state_tensors(model, optimizer)]
    finite = torch.isfinite(torch.nn.utils.get_total_norm(local, foreach=True))
    if last_step is not None:
        finite &= torch.isfinite(last_step.loss) & torch.isfinite(last_step.aux_loss) & (not last_step.skipped)
    flag = finite.float()
    if distributed:  # parameters are sharded over tp/ep/pp and losses differ over dp: every rank must agree
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _state_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[Tensor]:
    tensors = [p.detach() for p in model.parameters()]
    tensors += [b for b in model.buffers() if b.is_floating_point()]
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, Tensor) and v.is_floating_point()]
    return tensors


def after_optimizer_step(model: nn.Module, stepped: bool) -> None:
    """Between-step router updates (aux-free bias, ETR capacity schedule) and clearing the step accumulators."""
    for module in model.modules():
        if isinstance(module, Router):
            module.after_step(stepped)


def local_forward_backward(
    model: nn.Module,
    micro_batches: list[Tensor],
    amp: contextlib.AbstractContextManager,
    documents: DocumentPacking | None = None,
    scale: Tensor | float | None = None,
) -> tuple[Tensor, Tensor, list[RoutingStats] | None]:
    """Gradient accumulation over micro-batches on one pipeline stage holding the whole model. Returns the summed
    CE times `scale` (default: the mean over these micro-batches' positions), the summed aux loss and the routing."""
    n = len(micro_batches)
    scale = ce_scale(micro_batches, documents) if scale is None else scale
    ce_sum = torch.zeros((), device=micro_batches[0].device)
    aux_sum = torch.zeros((), device=micro_batches[0].device)
    routing: list[RoutingStats] | None = None
    for i, tokens in enumerate(micro_batches):
        inputs, targets, doc_inputs = window_inputs(tokens, documents)
        with amp:
            out = model(inputs, **doc_inputs)
        ce = lm_loss(out, targets, reduction="sum") * scale
        reduce_across_replicas(model, now=i == n - 1)
        with loss_context(out):
            (ce + out.aux_loss / n).backward()
        ce_sum += ce.detach()
        aux_sum += out.aux_loss.detach()
        routing = merge_routing(routing, [a.stats for a in out.moe_layers])
    return ce_sum, aux_sum, routing
