"""What remains of gradient reduction after the backward pass, and global-norm clipping, for any layout.

Data-parallel reduction happens during the backward pass (parallel/data_parallel.py: FSDP2 averages dense
gradients over dp and sums expert gradients over their expert-data-parallel ranks, divided by dp). Left for after
it: under sequence parallelism the parameters outside tensor parallelism (the MoE layers) saw only this rank's
tokens, so their gradients are partial sums over tp; and without data parallelism a vocabulary-sharded embedding
gets DTensor's Replicate gradient, which goes back to the parameter's layout.

Every sharded parameter is a DTensor (tensor parallel, expert parallel, data parallel), so the global norm is
torch's per-mesh norm of the DTensor gradients, summed over meshes and pipeline stages.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from parallel.mesh import ParallelContext

BUCKET_ELEMENTS = 64 * 1024 * 1024  # one flat all-reduce per 256 MB of fp32 gradients


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _mesh_names(p: Tensor) -> tuple[str, ...]:
    return tuple(p.device_mesh.mesh_dim_names or ()) if isinstance(p, DTensor) else ()


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
        self.params = [p for p in model.parameters() if p.requires_grad]
        # Under sequence parallelism: the parameters whose gradients are partial sums over tp.
        self.tp_partial = [p for p in self.params if "tp" not in _mesh_names(p)] if ctx.dims.sp else []

    def reduce(self) -> None:
        """Make every rank's gradients those of the global mean loss (data parallelism already reduced them)."""
        for p in self.params:
            if p.grad is None:  # a parameter this rank did not use still takes part in every collective
                p.grad = torch.zeros_like(p)
            elif isinstance(p.grad, DTensor) and p.grad.placements != p.placements:
                # DTensor's embedding backward yields a Replicate gradient for a vocab-sharded weight; bring it
                # back to the parameter's layout (a local slice, no communication).
                p.grad = p.grad.redistribute(p.device_mesh, p.placements)
        if self.tp_partial:
            all_reduce_flat([_local(p.grad) for p in self.tp_partial], self.ctx.group("tp"), 1.0)

    def clip_(self, max_norm: float) -> Tensor:
        """Global gradient norm over the full (unsharded) model; scales gradients in place when max_norm > 0.
        Same formula as torch.nn.utils.clip_grad_norm_."""
        grads = [p.grad for p in self.params if p.grad is not None]
        by_mesh: dict[tuple[str, ...], list[Tensor]] = {}
        for g in grads:  # torch's norm works within one mesh; sum the squares across meshes
            by_mesh.setdefault(_mesh_names(g), []).append(g)
        total_sq = torch.zeros((), device=grads[0].device, dtype=torch.float32)
        for group in by_mesh.values():
            norm = torch.nn.utils.get_total_norm(group, foreach=True)
            norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
            total_sq = total_sq + norm.float().square()
        if self.ctx.dims.pp > 1:  # each stage holds different layers
            dist.all_reduce(total_sq, group=self.ctx.group("pp"))
        total = total_sq.sqrt()
        if max_norm > 0:
            coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_([_local(g) for g in grads], coef)
        return total


def full_tensors(model: nn.Module, grads: bool = False) -> dict[str, Tensor]:
    """Every parameter (or gradient) as the full single-process tensor, on every rank. A collective: all ranks
    must call it. For tests and exports, not for the training hot path."""
    out = {}
    for name, p in model.named_parameters():
        t = p.grad if grads else p.detach()
        if t is not None:
            out[name] = t.full_tensor() if isinstance(t, DTensor) else t
    return out
