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
are in flight. Dense blocks compile whole, without a break.
"""

from __future__ import annotations

from torch import nn


def apply_compile(model: nn.Module, backend: str = "inductor") -> None:
    """Compile every block of `model.layers` in place (each one its own graph, so compile time grows with the number
    of distinct blocks, not with depth beyond them). Static shapes: every block sees the same [B, S, D] each step."""
    # Module.compile rather than wrapping in torch.compile's OptimizedModule: parameter names (and so checkpoints,
    # optimizer state and the HF export) stay those of the eager model.
    for block in model.layers.values():
        block.compile(backend=backend, dynamic=False)
