"""Regional compilation: `torch.compile` of each transformer block, applied after tensor, expert and pipeline
parallelism have rewritten the model (so the compiled code sees the DTensor parameters, the all-to-all dispatcher
and only this stage's layers).

Where each MoE block's graph breaks: `MoELayer.routed_experts` (model/moe.py) runs eagerly under
`torch.compiler.disable`. From the dispatch to the combine every shape depends on the routing (the dispatcher reads
the rows per expert back to the host and sizes the gathered rows, the expert GEMMs and the all-to-all buffers from
them), so compiling that section would recompile for every new routing or trace data-dependent shapes. The rest of
the block is compiled with static shapes: norms, attention, the router (top-k, gates, balance terms), the sort by
expert and the counts before the break; the dtype cast, the shared-expert add and the residual after it. The
zero-computation experts and the shared experts stay in the eager section because they run while the all-to-alls
are in flight. With document masking on CPU the attention breaks too (`model/document_mask.py`,
`_segment_attention`: its calls are sized by the host-read document lengths). Dense blocks compile whole.

Eager code that hands a tensor to compiled code hands it over waited: a tensor-parallel module's output is an
`AsyncCollectiveTensor` (its collective still in flight), and a compiled graph that takes one as an input returns a
plain gradient where DTensor's backward expects a DTensor.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor

from model.moe import MoELayer


def apply_compile(model: nn.Module, backend: str = "inductor") -> None:
    """Compile every block of `model.layers` in place with `backend` (each one its own graph, so compile time grows
    with the number of distinct blocks, not with depth beyond them). Static shapes: every block sees the same
    [B, S, D] each step."""
    # The eager modules whose outputs enter compiled code: the embedding (the first block's input) and the shared
    # experts (computed in the eager section of an MoE block, added after it).
    feeders = [getattr(model, "tok_embeddings", None)]
    feeders += [m.shared for m in model.modules() if isinstance(m, MoELayer)]
    for module in feeders:
        if module is not None:
            module.register_forward_hook(_waited_output)
    # Module.compile rather than wrapping in torch.compile's OptimizedModule: parameter names (and so checkpoints,
    # optimizer state and the HF export) stay those of the eager model.
    for block in model.layers.values():
        block.compile(backend=backend, dynamic=False)


def _waited_output(module: nn.Module, args: Any, output: Any) -> Any:
    # clone() is an ordinary op on the wrapper, so it waits for the collective and keeps the autograd edge (the
    # wrapper's own wait() does not); it copies only this one tensor, and only under tensor parallelism.
    return output.clone() if isinstance(output, AsyncCollectiveTensor) else output
