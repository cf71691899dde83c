"""Megatron-style tensor parallelism for the plain decoder, with PyTorch's DTensor parallel styles.

Column-parallel q/k/v and FFN gate/up, row-parallel attention output and FFN down, a vocabulary-parallel embedding
and a vocabulary-parallel LM head whose logits stay sharded for `loss_parallel` cross-entropy. The MoE router and
the zero-computation experts stay replicated (plain tensors); FFN experts are not tensor-parallel (they are sharded
by expert parallelism instead), so every tp rank of a data-parallel replica routes the same tokens.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from model.transformer import Decoder, DenseFFN


def apply_tensor_parallel(model: Decoder, tp_mesh: DeviceMesh) -> None:
    parallelize_module(
        model,
        tp_mesh,
        {
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate()),
            "output": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False),
        },
    )
    for block in model.layers.values():
        plan: dict[str, nn.Module] = {
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(),
        }
        if isinstance(block.ffn, DenseFFN):
            plan.update(
                {"ffn.w_gate": ColwiseParallel(), "ffn.w_up": ColwiseParallel(), "ffn.w_down": RowwiseParallel()}
            )
        parallelize_module(block, tp_mesh, plan)
