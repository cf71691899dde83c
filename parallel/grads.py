"""Gradient reduction and global-norm clipping for any (tp, ep, dp) layout; a single process is the trivial case.

Objective: the mean over data-parallel ranks of each rank's loss. Dense gradients are summed over the dp group and
scaled by 1/dp. An expert's gradient already holds the contributions of every rank in its ep group (the
all-to-all's backward brought them home), so it is summed only over the edp group (its replicas) and scaled by
1/dp as well: averaging over edp instead would count it ep times.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard

from model.experts import FFNExperts
from parallel.mesh import ParallelContext

BUCKET_ELEMENTS = 64 * 1024 * 1024  # one flat all-reduce per 256 MB of fp32 gradients


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _is_tp_sharded(p: Tensor) -> bool:
    return isinstance(p, DTensor) and any(isinstance(pl, Shard) for pl in p.placements)


def all_reduce_flat(tensors: list[Tensor], group: dist.ProcessGroup | None, scale: float) -> None:
    """Sum `tensors` over `group` in place through flat buckets, then multiply by `scale`."""
    bucket: list[Tensor] = []
    size = 0

    def flush() -> None:
        nonlocal bucket, size
        if not bucket:
            return
        flat = torch.cat([t.reshape(-1) for t in bucket])
        if group is not None:
            dist.all_reduce(flat, group=group)
        flat.mul_(scale)
        offset = 0
        for t in bucket:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        bucket, size = [], 0

    for t in tensors:
        if bucket and (t.dtype != bucket[0].dtype or size + t.numel() > BUCKET_ELEMENTS):
            flush()
        bucket.append(t)
        size += t.numel()
    flush()


class GradSync:
    def __init__(self, model: nn.Module, ctx: ParallelContext) -> None:
        self.ctx = ctx
        expert_ids = {id(p) for m in model.modules() if isinstance(m, FFNExperts) for p in m.parameters()}
        params = [p for p in model.parameters() if p.requires_grad]
        self.expert = [p for p in params if id(p) in expert_ids]
        self.dense = [p for p in params if id(p) not in expert_ids]

    def reduce(self) -> None:
        """Make every rank's gradients those of the global mean loss."""
        for p in self.dense + self.expert:
            if p.grad is None:  # a parameter this rank did not use still takes part in every collective
                p.grad = torch.zeros_like(p)
            elif isinstance(p.grad, DTensor) and p.grad.placements != p.placements:
                # DTensor's embedding backward yields a Replicate gradient for a vocab-sharded weight; bring it
                # back to the parameter's layout (a local slice, no communication) before anything else.
                p.grad = p.grad.redistribute(p.device_mesh, p.placements)
        dims = self.ctx.dims
        if dims.sp:
            # Sequence parallelism: plain (non-DTensor) parameters, i.e. the MoE layers, saw only this rank's
            # tokens; their gradients are partial sums over tp. (DTensor norms were summed by redistribute.)
            partial = [p.grad for p in self.dense + self.expert if not isinstance(p, DTensor)]
            all_reduce_flat(partial, self.ctx.group("tp"), 1.0)
        if dims.dp == 1:
            return
        all_reduce_flat([_local(p.grad) for p in self.dense], self.ctx.group("dp"), 1.0 / dims.dp)
        edp_group = self.ctx.group("edp") if dims.edp > 1 else None
        all_reduce_flat([_local(p.grad) for p in self.expert], edp_group, 1.0 / dims.dp)

    def clip_(self, max_norm: float) -> Tensor:
        """Global gradient norm over the full (unsharded) model; scales gradients in place when max_norm > 0.
        Same formula as torch.nn.utils.clip_grad_norm_."""
        grads = [p.grad for p in self.dense + self.expert if p.grad is not None]
        device = grads[0].device
        replicated = torch.zeros((), device=device, dtype=torch.float32)
        tp_sharded = torch.zeros((), device=device, dtype=torch.float32)
        expert = torch.zeros((), device=device, dtype=torch.float32)
        for p in self.dense:
            if p.grad is None:
                continue
            sq = _local(p.grad).float().square().sum()
            if _is_tp_sharded(p):
                tp_sharded += sq
            else:
                replicated += sq
        for p in self.expert:
            if p.grad is not None:
                expert += _local(p.grad).float().square().sum()
        if self.ctx.dims.tp > 1:
            dist.all_reduce(tp_sharded, group=self.ctx.group("tp"))
        if self.ctx.dims.ep > 1:
            dist.all_reduce(expert, group=self.ctx.group("ep"))
        total_sq = replicated + tp_sharded + expert
        if self.ctx.dims.pp > 1:  # each stage holds different layers
            dist.all_reduce(total_sq, group=self.ctx.group("pp"))
        total = total_sq.sqrt()
        if max_norm > 0:
            coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_([_local(g) for g in grads], coef)
        return total


def full_tensors(model: nn.Module, ctx: ParallelContext, grads: bool = False) -> dict[str, Tensor]:
    """Every parameter (or gradient) as the full single-process tensor, on every rank. A collective: all ranks
    must call it. For tests and exports, not for the training hot path."""
    expert_ids = {id(p) for m in model.modules() if isinstance(m, FFNExperts) for p in m.parameters()}
    out = {}
    for name, p in model.named_parameters():
        t = p.grad if grads else p.detach()
        if t is None:
            continue
        if isinstance(t, DTensor):
            t = t.full_tensor()
        elif id(p) in expert_ids and ctx.dims.ep > 1:
            parts = [torch.empty_like(t) for _ in range(ctx.dims.ep)]
            dist.all_gather(parts, t.contiguous(), group=ctx.group("ep"))
            t = torch.cat(parts)
        out[name] = t
    return out
