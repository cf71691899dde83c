"""Megatron-style tensor parallelism for the plain decoder, with PyTorch's DTensor parallel styles.

Column-parallel q/k/v and FFN gate/up, row-parallel attention output and FFN down, a vocabulary-parallel embedding
and a vocabulary-parallel LM head whose logits stay sharded for `loss_parallel` cross-entropy. The MoE router and
the zero-computation experts stay replicated (plain tensors); FFN experts are not tensor-parallel (expert
parallelism shards them instead); shared experts are tensor-parallel like a dense FFN.

Without sequence parallelism every tp rank of a data-parallel replica routes all of its tokens (the MoE layer is
replicated over tp). With sequence parallelism the residual stream, the norms and the MoE layers work on this rank's
slice of the sequence: attention and dense FFNs all-gather it on the way in and reduce-scatter on the way out, an
MoE layer simply routes only its local tokens, and its router's balance statistics are summed over tp
(parallel/routing.py) so the loss equals the single-process one. Gradients of parameters that saw only local tokens
are summed over tp by GradSync.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from model.experts import DenseFFN
from model.transformer import Decoder


def apply_tensor_parallel(model: Decoder, tp_mesh: DeviceMesh, sequence_parallel: bool = False) -> None:
    seq = Shard(1) if sequence_parallel else Replicate()
    top: dict[str, nn.Module] = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq),
        "output": ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1), use_local_output=False),
    }
    if sequence_parallel:
        top["norm"] = SequenceParallel()
    # A pipeline stage may lack the embedding or the head.
    top = {name: style for name, style in top.items() if getattr(model, name) is not None}
    if top:
        parallelize_module(model, tp_mesh, top)
    for block in model.layers.values():
        plan: dict[str, nn.Module] = {
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=seq),
        }
        dense = isinstance(block.ffn, DenseFFN)
        if dense:
            plan.update(
                {
                    "ffn.w_gate": ColwiseParallel(),
                    "ffn.w_up": ColwiseParallel(),
                    "ffn.w_down": RowwiseParallel(output_layouts=seq),
                }
            )
        if not dense and block.ffn.shared is not None:
            # Shared experts are a dense FFN inside the MoE layer, which holds its tokens as a flat [T, D] plain
            # tensor (under sequence parallelism, only this rank's tokens: gathered over dim 0 and scattered back).
            plan.update(
                {
                    "ffn.shared.w_gate": ColwiseParallel(),
                    "ffn.shared.w_up": ColwiseParallel(),
                    "ffn.shared.w_down": RowwiseParallel(output_layouts=Shard(0) if sequence_parallel else Replicate()),
                }
            )
            if sequence_parallel:
                plan["ffn.shared"] = PrepareModuleInput(input_layouts=(Shard(0),), desired_input_layouts=(Replicate(),))
        if sequence_parallel:
            plan["attention_norm"] = SequenceParallel()
            plan["attention"] = PrepareModuleInput(
                input_layouts=(Shard(1), None, None, None), desired_input_layouts=(Replicate(), None, None, None)
            )
            if dense:
                plan["ffn_norm"] = SequenceParallel()
                plan["ffn"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
            else:
                # The MoE layer takes the local slice of tokens as a plain tensor.
                plan["ffn_norm"] = SequenceParallel(use_local_output=True)
        parallelize_module(block, tp_mesh, plan)
