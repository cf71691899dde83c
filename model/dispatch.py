"""Token dispatcher seam: moves FFN-expert assignments to the experts that own them and back.

`MoELayer` hands the dispatcher only FFN assignments, already sorted by expert; zero-computation experts are
computed by the layer itself and never reach a dispatcher. `parallel/expert_parallel.py` provides a drop-in
all-to-all version with the same two methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class DispatchResult:
    # Rows for the local experts, grouped by local expert (expert 0's rows first).
    x_AD: Tensor
    tokens_per_expert: list[int]
    # Whatever combine() needs to undo the move; opaque to the layer.
    state: dict = field(default_factory=dict)
    # Bytes this rank sent and received to dispatch (0 on a single device); combine moves the same amount back.
    bytes_sent: int = 0
    bytes_received: int = 0


class LocalDispatcher:
    """Single device: every FFN expert is local, so dispatch is a gather and combine the identity."""

    def dispatch(self, x_TD: Tensor, token_idx_A: Tensor, tokens_per_expert_E: Tensor) -> DispatchResult:
        """token_idx_A: token of each assignment, sorted by expert then by assignment order; its length may exceed
        the number of FFN assignments (the tail holds other assignments and is ignored).
        tokens_per_expert_E: FFN assignments per expert (device tensor)."""
        counts = tokens_per_expert_E.tolist()  # host-device sync: the one per layer, sizes the expert groups
        n = sum(counts)
        return DispatchResult(x_TD[token_idx_A[:n]], counts)

    def combine(self, y_AD: Tensor, dispatched: DispatchResult) -> Tensor:
        """Expert outputs back in the order of the dispatch input's first rows."""
        return y_AD
