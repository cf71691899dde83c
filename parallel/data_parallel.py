"""Data parallelism on FSDP2 (`torch.distributed.fsdp.fully_shard`) for every `parallel.data_parallel` mode.

The three modes are one mechanism on different meshes (parallel/mesh.py): `fsdp` shards each parameter over the
1-D dp mesh (ZeRO-3), `hsdp` over the shard dimension of a (dp_replicate, dp_shard) mesh and replicates across its
first dimension, and `replicate` is hsdp with shard groups of one rank (FSDP2 then gathers nothing and reduces
with one all-reduce per group). Tensor-parallel DTensors become 2-D (dp, tp) DTensors.

FSDP groups, each one parameter all-gather and one gradient reduction issued as the forward and the backward reach
it (so the reduction of a block overlaps the backward of the blocks before it): every decoder block, inside an MoE
block its FFN experts on the expert mesh, the embedding, the final norm, the head, and the root.

FFN experts are DTensors sharded over ep (parallel/expert_parallel.py); fully_shard on the expert mesh shards them
again over their expert-data-parallel ranks, so no expert's parameters or AdamW state are held twice. Their
gradient already carries the contributions of the whole ep group (the all-to-all's backward), so it is summed
over the expert mesh and divided by dp, not averaged over edp (which would count it ep times). Router, constant and
shared experts are plain parameters of the block: averaged over dp like every dense parameter.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from model.config import ConfigError
from model.moe import MoELayer
from model.transformer import Decoder
from parallel.mesh import ParallelContext


def param_dtype(setting: str, device_type: str) -> torch.dtype:
    """parallel.mixed_precision resolved: auto is bf16 on CUDA and fp32 elsewhere."""
    if setting == "auto":
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    return torch.bfloat16 if setting == "bf16" else torch.float32


def check_mixed_precision(setting: str, device_type: str, autocast_bf16: bool) -> None:
    """bf16 parameters need bf16 autocast: block inputs stay fp32 (the router logits that flow between layers
    keep their precision), so a matmul would meet an fp32 input and a bf16 weight."""
    if param_dtype(setting, device_type) == torch.bfloat16 and not autocast_bf16:
        raise ConfigError(
            f"parallel.mixed_precision: {setting} computes with bf16 parameters under bf16 autocast, but "
            f"train.dtype gives fp32 on {device_type}; set train.dtype=bf16 or parallel.mixed_precision=fp32"
        )


def _policy(dtype: torch.dtype) -> MixedPrecisionPolicy:
    if dtype == torch.float32:
        return MixedPrecisionPolicy()
    # fp32 master weights and AdamW state (the sharded parameters), bf16 copies for compute, fp32 reduction.
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)


class _BroadcastAllGather:
    """FSDP2's all-gather as one broadcast per rank. gloo's allgather and reduce-scatter are 2-3x slower than its
    broadcast and all-reduce on one host (180 MB shards over 2 ranks: allgather 1.9 s, broadcasts 0.65 s;
    reduce-scatter 2.5 s, all-reduce of the whole buffer 0.87 s), which made fsdp a third slower than replicate on
    CPU. NCCL keeps FSDP's own collectives. (Duck-typed to FSDP2's AllGather: allocate + call.)"""

    def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: Tensor, input_tensor: Tensor, group: dist.ProcessGroup, async_op: bool = False):
        chunks = output_tensor.chunk(group.size())
        mine = chunks[group.rank()]
        if mine.data_ptr() != input_tensor.data_ptr():  # FSDP gathers in place: the input is already its slot
            mine.copy_(input_tensor)
        for src, chunk in enumerate(chunks):
            dist.broadcast(chunk, group_src=src, group=group)
        return None


class _AllReduceReduceScatter(_BroadcastAllGather):
    """FSDP2's reduce-scatter as an all-reduce of the whole (temporary) input buffer that keeps this rank's chunk
    (see _BroadcastAllGather for why, on gloo)."""

    def __call__(  # type: ignore[override]
        self, output_tensor: Tensor, input_tensor: Tensor, group: dist.ProcessGroup, op, async_op: bool = False
    ):
        dist.all_reduce(input_tensor, op=op, group=group)
        output_tensor.copy_(input_tensor.chunk(group.size())[group.rank()])
        return None


def apply_data_parallel(model: nn.Module, ctx: ParallelContext) -> None:
    """fully_shard the model in place for ctx's data-parallel mode (after tensor and expert parallelism)."""
    dims = ctx.dims
    policy = _policy(param_dtype(dims.mixed_precision, ctx.device.type))
    # A shard group of one has nothing to free after the forward pass.
    free_after_forward = dims.reshard_after_forward and dims.dp_shard > 1
    dense, expert_mesh = ctx.meshes["dense"], ctx.meshes["expert"]
    expert_shards = dims.edp_shard

    def expert_placement(p: nn.Parameter) -> Shard:
        # Shard the local experts (dim 0) when they split evenly over the expert shard group, else a weight dim.
        local = p.to_local() if isinstance(p, DTensor) else p
        if local.shape[0] % expert_shards == 0 or local.shape[1] % expert_shards:
            return Shard(0)
        return Shard(1)

    for layer in model.modules():
        if isinstance(layer, MoELayer) and isinstance(layer.experts.w_up, DTensor):
            experts = fully_shard(
                layer.experts,
                mesh=expert_mesh,
                reshard_after_forward=free_after_forward,
                mp_policy=policy,
                shard_placement_fn=expert_placement,
            )
            experts.set_gradient_divide_factor(float(dims.dp))
            if expert_shards > 1:
                # Sum, then divide: gloo has no pre-multiplied sum. (A shard group of one reduces nothing, and
                # there FSDP already divides while copying; forcing sums would divide twice.)
                experts.set_force_sum_reduction_for_comms(True)
    if isinstance(model, Decoder):
        for block in model.layers.values():
            fully_shard(block, mesh=dense, reshard_after_forward=free_after_forward, mp_policy=policy)
        # The final norm and the head are the first the backward pass needs: freeing them after the forward pass
        # would only gather them again right away.
        for part in (model.norm, model.output):
            if part is not None:  # a pipeline stage lacks some of them
                fully_shard(part, mesh=dense, reshard_after_forward=False, mp_policy=policy)
        if model.tok_embeddings is not None:
            embedding = fully_shard(
                model.tok_embeddings, mesh=dense, reshard_after_forward=free_after_forward, mp_policy=policy
            )
            embedding.set_unshard_in_backward(False)  # its gradient needs the token ids only, not the weights
    fully_shard(model, mesh=dense, reshard_after_forward=free_after_forward, mp_policy=policy)
    # Groups that keep their gathered parameters after the forward pass free them in the backward pass; a forward
    # without one (evaluation) frees them here, so the optimizer's (sharded) parameters are always the registered
    # ones between steps.
    model.register_forward_hook(lambda module, args, output: None if torch.is_grad_enabled() else reshard(module))
    if ctx.device.type == "cpu":  # gloo
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_custom_all_gather(_BroadcastAllGather())
                module.set_custom_reduce_scatter(_AllReduceReduceScatter())
    # A dense block hands the previous router logits through unchanged, and FSDP's input hook made them a view;
    # nothing modifies a block's outputs in place, which is what the warning is about. (Checkpointed: the same
    # block under activation checkpointing, parallel/activation_checkpoint.py.)
    warnings.filterwarnings(
        "ignore", message=r"FSDP2-wrapped module \((Checkpointed)?(FSDPBlock|FSDPEmbedding)\) returned a view"
    )


def reshard(model: nn.Module) -> None:
    """Register the sharded parameters everywhere (free gathered copies); a no-op without data parallelism."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def reduce_across_replicas(model: nn.Module, now: bool) -> None:
    """Gradient accumulation over micro-batches: the all-reduce across replicas (replicate, hsdp) runs in the last
    micro-batch's backward only; earlier ones accumulate locally (hsdp still reduce-scatters within its shard
    group every time, so gradients stay sharded). Call before each backward; a no-op without data parallelism."""
    if isinstance(model, FSDPModule):
        model.set_requires_all_reduce(now)
