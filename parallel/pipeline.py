"""Pipeline parallelism: decoder blocks split into stages, run with a 1F1B schedule over micro-batches.

What travels between stages is (hidden states, router logits): MoE++'s gating residual of the last MoE layer of
one stage feeds the first MoE layer of the next, and its gradient flows back. A boundary before which no MoE layer
has run (or a model without gating residuals) carries the hidden states only.

Why our own schedule rather than torch.distributed.pipelining: every stage also owns a loss term (the balance loss
of its MoE layers) that must enter its own backward, stages contain expert-parallel all-to-alls and DTensor
modules, and the payload shape changes with the boundary; the non-interleaved 1F1B below is ~100 lines, runs on
gloo and NCCL alike, and keeps each stage's backward explicit: autograd.backward([outputs..., balance term],
[received grads..., 1]).

Every stage holds the token windows of its micro-batches, so document masks and per-document positions
(data/packing.py) are computed from them on each stage and never travel.

Schedule (Megatron's non-interleaved 1F1B): stage s of P runs min(P-s-1, n) warm-up forwards, then alternates one
forward and one backward, then drains the remaining backwards; paired send/recv go through batch_isend_irecv.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from data.packing import window_inputs
from model.config import ConfigError, MoEConfig
from model.moe import RoutingStats
from model.transformer import Decoder, ModelOutput
from parallel.data_parallel import reduce_across_replicas
from parallel.loss import ce_scale, lm_loss, loss_context


def stage_layer_counts(num_layers: int, pp: int, layers_per_stage: list[int] | None) -> list[int]:
    """Blocks per stage: as configured (parallel.pp_layers), or balanced with the first stages taking the extra
    layers (the last stage also runs the LM head and the loss)."""
    if layers_per_stage:
        if len(layers_per_stage) != pp or sum(layers_per_stage) != num_layers or min(layers_per_stage) < 1:
            raise ConfigError(
                f"parallel.pp_layers: {layers_per_stage} must list {pp} positive counts summing to "
                f"model.num_layers={num_layers}"
            )
        return list(layers_per_stage)
    if num_layers < pp:
        raise ConfigError(
            f"parallel.pp: {pp} stages for model.num_layers={num_layers}; use at most one stage per layer"
        )
    base, extra = divmod(num_layers, pp)
    return [base + (1 if s < extra else 0) for s in range(pp)]


def build_stage(model: Decoder, stage: int, counts: list[int]) -> Decoder:
    """Keep this stage's blocks (their global names stay), the embedding on the first stage and the final norm and
    head on the last. In place."""
    start = sum(counts[:stage])
    keep = {str(i) for i in range(start, start + counts[stage])}
    for key in list(model.layers.keys()):
        if key not in keep:
            del model.layers[key]
    if stage > 0:
        model.tok_embeddings = None
    if stage < len(counts) - 1:
        model.norm = None
        model.output = None
    return model


def residual_crosses(moe: MoEConfig, first_layer: int) -> bool:
    """Whether router logits cross the boundary in front of global layer `first_layer`."""
    return moe.gating_residual and any(moe.is_moe_layer(i) for i in range(first_layer))


@dataclass
class _InFlight:
    inputs: list[Tensor]  # received tensors (requires_grad) whose gradients go back upstream
    outputs: list[Tensor]  # tensors sent downstream, or [loss] on the last stage
    aux_term: Tensor | None  # this stage's aux loss / n, backpropagated with the outputs (not on the last stage)
    out: ModelOutput
    ce: Tensor | None = None  # detached scaled CE (last stage)


@dataclass
class StageResult:
    # Sum over micro-batches of the summed CE times the step's scale (parallel.loss.ce_scale: this rank's share of the
    # step's mean CE); last stage, zero elsewhere.
    ce_sum: Tensor
    aux_sum: Tensor  # sum over micro-batches of this stage's aux loss (weighted balance terms)
    routing: list[list[RoutingStats]] = field(default_factory=list)  # per micro-batch, this stage's MoE layers


class PipelineSchedule:
    def __init__(
        self, model: Decoder, group: dist.ProcessGroup, counts: list[int], moe: MoEConfig, hidden_size: int
    ) -> None:
        self.model = model
        self.group = group
        self.stage = dist.get_rank(group)
        self.num_stages = dist.get_world_size(group)
        self.is_first, self.is_last = self.stage == 0, self.stage == self.num_stages - 1
        self.prev = None if self.is_first else dist.get_global_rank(group, self.stage - 1)
        self.next = None if self.is_last else dist.get_global_rank(group, self.stage + 1)
        first_layer = sum(counts[: self.stage])
        self.residual_in = not self.is_first and residual_crosses(moe, first_layer)
        self.residual_out = not self.is_last and residual_crosses(moe, first_layer + counts[self.stage])
        self.hidden_size = hidden_size
        self.num_experts = moe.num_total_experts

    # -- communication ------------------------------------------------------------------------------------------

    def _shapes(self, tokens: Tensor, with_residual: bool) -> list[tuple[int, ...]]:
        b, s = tokens.shape[0], tokens.shape[1] - 1
        shapes = [(b, s, self.hidden_size)]
        if with_residual:
            shapes.append((b * s, self.num_experts))
        return shapes

    def _p2p(
        self,
        send: list[Tensor] | None,
        send_to: int | None,
        recv_shapes: list[tuple[int, ...]] | None,
        recv_from: int | None,
        device: torch.device,
    ) -> list[Tensor] | None:
        ops = []
        if send is not None and send_to is not None:
            ops += [dist.P2POp(dist.isend, t.detach().float().contiguous(), send_to) for t in send]
        received = None
        if recv_shapes is not None and recv_from is not None:
            received = [torch.empty(shape, dtype=torch.float32, device=device) for shape in recv_shapes]
            ops += [dist.P2POp(dist.irecv, t, recv_from) for t in received]
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        return received

    # -- one micro-batch ------------------------------------------------------------------------------------------

    def _forward(
        self,
        tokens: Tensor,
        received: list[Tensor] | None,
        n_micro: int,
        amp: contextlib.AbstractContextManager,
        documents: Any,
        scale: Tensor | float,
    ) -> _InFlight:

        token_inputs, targets, doc_inputs = window_inputs(tokens, documents)
        inputs: list[Tensor] = []
        with amp:
            if self.is_first:
                out = self.model(tokens_BS=token_inputs, **doc_inputs)
            else:
                assert received is not None
                inputs = [t.requires_grad_() for t in received]
                residual = inputs[1] if self.residual_in else None
                out = self.model(hidden_BSD=inputs[0], router_logits_TE=residual, **doc_inputs)
        if self.is_last:
            ce = lm_loss(out, targets, reduction="sum") * scale
            loss = ce + out.aux_loss / n_micro
            return _InFlight(inputs, [loss], None, out, ce.detach())
        outputs = [out.hidden_BSD]
        if self.residual_out:
            outputs.append(out.router_logits_TE)
        return _InFlight(inputs, outputs, out.aux_loss / n_micro, out)

    def _backward(self, job: _InFlight, grads: list[Tensor] | None, last: bool) -> list[Tensor] | None:

        reduce_across_replicas(self.model, now=last)
        if self.is_last:
            with loss_context(job.out):
                job.outputs[0].backward()
        else:
            assert grads is not None
            tensors, grad_tensors = list(job.outputs), list(grads)
            if job.aux_term is not None and job.aux_term.requires_grad:  # this stage's own loss term
                tensors.append(job.aux_term)
                grad_tensors.append(torch.ones_like(job.aux_term))
            torch.autograd.backward(tensors, grad_tensors)
        if self.is_first:
            return None
        return [t.grad if t.grad is not None else torch.zeros_like(t) for t in job.inputs]

    # -- schedules ------------------------------------------------------------------------------------------------

    def forward_backward(
        self,
        micro_batches: list[Tensor],
        amp: contextlib.AbstractContextManager,
        documents: Any = None,
        scale: Tensor | float | None = None,
    ) -> StageResult:
        """One step's forwards and backwards on this stage. documents: a data.packing.DocumentPacking or None;
        scale: the factor of each micro-batch's summed CE (parallel.loss.ce_scale; default: the mean over these
        micro-batches' positions)."""

        n = len(micro_batches)
        scale = ce_scale(micro_batches, documents) if scale is None else scale
        device = micro_batches[0].device
        recv_fwd_shapes = None if self.is_first else self._shapes(micro_batches[0], self.residual_in)
        recv_bwd_shapes = None if self.is_last else self._shapes(micro_batches[0], self.residual_out)
        ce_sum = torch.zeros((), device=device)
        aux_sum = torch.zeros((), device=device)
        routing: list[list[RoutingStats]] = []
        in_flight: list[_InFlight] = []

        def forward(i: int, received: list[Tensor] | None) -> _InFlight:
            nonlocal ce_sum, aux_sum
            job = self._forward(micro_batches[i], received, n, amp, documents, scale)
            if job.ce is not None:
                ce_sum = ce_sum + job.ce
            aux_sum = aux_sum + job.out.aux_loss.detach()
            routing.append([a.stats for a in job.out.moe_layers])
            in_flight.append(job)
            return job

        warmup = min(self.num_stages - self.stage - 1, n)
        for i in range(warmup):
            received = self._p2p(None, None, recv_fwd_shapes, self.prev, device)
            job = forward(i, received)
            self._p2p(job.outputs, self.next, None, None, device)
        received = self._p2p(None, None, recv_fwd_shapes, self.prev, device) if warmup < n else None
        for i in range(n - warmup):
            job = forward(warmup + i, received)
            grads = self._p2p(None if self.is_last else job.outputs, self.next, recv_bwd_shapes, self.next, device)
            input_grads = self._backward(in_flight.pop(0), grads, last=warmup == 0 and i == n - 1)
            if i == n - warmup - 1:
                self._p2p(input_grads, self.prev, None, None, device)
            else:
                received = self._p2p(input_grads, self.prev, recv_fwd_shapes, self.prev, device)
        for i in range(warmup):
            grads = self._p2p(None, None, recv_bwd_shapes, self.next, device)
            input_grads = self._backward(in_flight.pop(0), grads, last=i == warmup - 1)
            self._p2p(input_grads, self.prev, None, None, device)
        return StageResult(ce_sum, aux_sum, routing)

    @torch.no_grad()
    def forward_only(
        self, tokens: Tensor, amp: contextlib.AbstractContextManager, documents: Any = None
    ) -> ModelOutput:
        """One batch through the stages (evaluation); the last stage's output has the logits."""

        token_inputs, _, doc_inputs = window_inputs(tokens, documents)
        device = tokens.device
        received = self._p2p(
            None, None, None if self.is_first else self._shapes(tokens, self.residual_in), self.prev, device
        )
        with amp:
            if self.is_first:
                out = self.model(tokens_BS=token_inputs, **doc_inputs)
            else:
                residual = received[1] if self.residual_in else None
                out = self.model(hidden_BSD=received[0], router_logits_TE=residual, **doc_inputs)
        if not self.is_last:
            payload = [out.hidden_BSD] + ([out.router_logits_TE] if self.residual_out else [])
            self._p2p(payload, self.next, None, None, device)
        return out
