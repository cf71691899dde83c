"""Tensor, expert and data parallelism applied to the plain model from `model/`."""

from __future__ import annotations

from model.transformer import Decoder
from parallel.mesh import ParallelContext


def parallelize(model: Decoder, ctx: ParallelContext) -> Decoder:
    """Rewrite the plain model in place for ctx's layout: tensor parallel first, then expert parallel."""
    from parallel.expert_parallel import apply_expert_parallel
    from parallel.tensor_parallel import apply_tensor_parallel

    if ctx.dims.tp > 1:
        apply_tensor_parallel(model, ctx.tp_mesh, sequence_parallel=ctx.dims.sp)
    if ctx.dims.ep > 1:
        apply_expert_parallel(model, ctx.group("ep"))
    return model
