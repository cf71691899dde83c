"""One optimizer step: forward/backward over the micro-batches, gradient clipping, AdamW update.

Loss = mean token cross-entropy + the model's aux loss (every moe.balance term times its coefficient, summed over
MoE layers). Nothing here syncs with the host: losses and routing counters stay device tensors until the logger
reads them. After the optimizer step every router gets its between-step update (aux-free bias, ETR capacity).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from model.moe import RoutingStats
from model.router import Router
from model.transformer import ModelOutput, sum_terms
from parallel.data_parallel import reduce_across_replicas
from parallel.grads import GradSync
from parallel.pipeline import PipelineSchedule


@dataclass
class StepResult:
    loss: Tensor  # mean cross-entropy over the step's tokens (detached)
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


def loss_context(output: ModelOutput) -> contextlib.AbstractContextManager:
    """Vocabulary-parallel cross-entropy when tensor parallelism left the logits sharded over the vocabulary
    (forward and backward must both run inside it)."""
    return loss_parallel() if isinstance(output.logits_BSV, DTensor) else contextlib.nullcontext()


def lm_loss(output: ModelOutput, targets_BS: Tensor) -> Tensor:
    logits = output.logits_BSV
    with loss_context(output):
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets_BS.reshape(-1))
    # loss_parallel returns a replicated DTensor; its local value is the full loss on every tp rank.
    return loss.to_local() if isinstance(loss, DTensor) else loss


def merge_routing(total: list[RoutingStats] | None, new: list[RoutingStats]) -> list[RoutingStats]:
    if total is None:
        return list(new)
    return [
        RoutingStats(
            a.expert_counts_E + b.expert_counts_E,
            a.dropped + b.dropped,
            a.num_tokens + b.num_tokens,
            a.bytes_sent + b.bytes_sent,
            a.bytes_received + b.bytes_received,
            sum_terms([a.aux_terms, b.aux_terms]),
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
) -> StepResult:
    """micro_batches: token windows [b, S+1]; inputs are [:, :-1], targets [:, 1:]. With a pipeline schedule this
    rank runs its stage's share (1F1B); its loss is then the last stage's CE and its balance loss its own layers'."""
    amp = amp or contextlib.nullcontext()
    n = len(micro_batches)
    if pipeline is not None:
        stage = pipeline.forward_backward(micro_batches, amp)
        ce_sum, aux_sum, routing = stage.ce_sum, stage.aux_sum, None
        for stats in stage.routing:
            routing = merge_routing(routing, stats)
    else:
        ce_sum, aux_sum, routing = local_forward_backward(model, micro_batches, amp)
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
    return StepResult(ce_sum / n, aux_sum / n, grad_norm.detach(), routing or [], skipped=not finite)


def after_optimizer_step(model: nn.Module, stepped: bool) -> None:
    """Between-step router updates (aux-free bias, ETR capacity schedule) and clearing the step accumulators."""
    for module in model.modules():
        if isinstance(module, Router):
            module.after_step(stepped)


def local_forward_backward(
    model: nn.Module, micro_batches: list[Tensor], amp: contextlib.AbstractContextManager
) -> tuple[Tensor, Tensor, list[RoutingStats] | None]:
    """Gradient accumulation over micro-batches on one pipeline stage holding the whole model."""
    n = len(micro_batches)
    ce_sum = torch.zeros((), device=micro_batches[0].device)
    aux_sum = torch.zeros((), device=micro_batches[0].device)
    routing: list[RoutingStats] | None = None
    for i, tokens in enumerate(micro_batches):
        with amp:
            out = model(tokens[:, :-1])
        ce = lm_loss(out, tokens[:, 1:])
        reduce_across_replicas(model, now=i == n - 1)
        # Every micro-batch has the same token count, so dividing by n makes the gradient that of the step mean.
        with loss_context(out):
            ((ce + out.aux_loss) / n).backward()
        ce_sum += ce.detach()
        aux_sum += out.aux_loss.detach()
        routing = merge_routing(routing, [a.stats for a in out.moe_layers])
    return ce_sum, aux_sum, routing
