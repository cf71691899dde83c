"""Tensor, expert and data parallelism applied to the plain model from `model/`."""

from __future__ import annotations

from model.transformer import Decoder
from parallel.mesh import ParallelContext


def parallelize(model: Decoder, ctx: ParallelContext, *, compile_backend: str | None = None) -> Decoder:
    """Rewrite the plain model in place for ctx's layout: pipeline stage, tensor parallel, expert parallel, the
    routers' communication; with a `compile_backend` ("inductor", what train.compile uses) each remaining block is
    then compiled by it (parallel/compile.py); data parallel (FSDP2) wraps the result last."""
    from parallel.expert_parallel import apply_expert_parallel
    from parallel.tensor_parallel import apply_tensor_parallel

    if ctx.dims.pp > 1:
        from parallel.pipeline import build_stage, stage_layer_counts

        counts = stage_layer_counts(model.cfg.num_layers, ctx.dims.pp, ctx.dims.pp_layers)
        build_stage(model, ctx.pp_rank, counts)
    if ctx.dims.tp > 1:
        apply_tensor_parallel(model, ctx.tp_mesh, sequence_parallel=ctx.dims.sp)
    if ctx.dims.ep > 1:
        apply_expert_parallel(model, ctx.mesh["ep"])
    if ctx.distributed:
        from parallel.routing import install_router_comm

        install_router_comm(model, ctx)
    if compile_backend is not None:
        from parallel.compile import apply_compile

        apply_compile(model, compile_backend)
    if ctx.dims.sharded:
        from parallel.data_parallel import apply_data_parallel

        apply_data_parallel(model, ctx)
    return model


def pipeline_schedule(model: Decoder, ctx: ParallelContext):
    """The 1F1B schedule for this rank's stage, or None without pipeline parallelism."""
    if ctx.dims.pp == 1:
        return None
    from parallel.pipeline import PipelineSchedule, stage_layer_counts

    counts = stage_layer_counts(model.cfg.num_layers, ctx.dims.pp, ctx.dims.pp_layers)
    return PipelineSchedule(model, ctx.group("pp"), counts, model.moe_cfg, model.cfg.hidden_size)
