"""Token dispatcher seam: moves FFN-expert assignments to the experts that own them and back.

`MoELayer` hands the dispatcher only FFN assignments, already sorted by expert; zero-computation experts are
computed by the layer itself and never reach a dispatcher. `parallel/expert_parallel.py` provides a drop-in
all-to-all version with the same two methods.

Both methods return `Pending` tensors: an asynchronous dispatcher starts moving the rows and returns at once, and
`wait()` blocks until they have arrived. The layer computes what needs no other rank (zero-computation and shared
experts) between a call and its `wait()`, so under expert parallelism that work overlaps the transfer, forward and
backward; on one device the tensors are ready and nothing changes.

Payload precision: a dispatcher gathers the rows from `x_TD` in its own dtype (the fp32 residual stream's norm)
and casts the gathered rows to the layer's compute dtype (bf16 under bf16 autocast) before they move, so the
wire carries the compute dtype in both directions and in the backward. The gradient of `x_TD` is still
accumulated over a token's assignments in `x_TD`'s dtype (the gather's backward runs after the cast's).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import astuple, dataclass, field

import torch
from torch import Tensor


@dataclass
class AllToAllBytes:
    """Bytes one rank moves through the all-to-alls of one MoE layer's forward, each collective apart. `sent`: what
    the rank hands to the collective, `received`: what it gets from it; `_remote`: the part to or from other ranks,
    without the chunk a rank keeps for its own experts. The backward moves the same amounts again the other way
    (a rank sends its `dispatch_received` bytes of gradient back and receives its `dispatch_sent`). All 0 on a
    single device."""

    dispatch_sent: int = 0
    dispatch_received: int = 0
    dispatch_sent_remote: int = 0
    dispatch_received_remote: int = 0
    combine_sent: int = 0
    combine_received: int = 0
    combine_sent_remote: int = 0
    combine_received_remote: int = 0

    def __add__(self, other: AllToAllBytes) -> AllToAllBytes:
        return AllToAllBytes(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    @property
    def sent(self) -> int:
        """Dispatch + combine, own chunk included."""
        return self.dispatch_sent + self.combine_sent

    @property
    def received(self) -> int:
        return self.dispatch_received + self.combine_received


class Pending:
    """A tensor a dispatcher may still be moving. `wait()` returns it, blocking only until it has arrived (at once
    for a tensor that is already there); the first call does the work, later calls return the same tensor."""

    def __init__(self, wait: Callable[[], Tensor]) -> None:
        self._wait: Callable[[], Tensor] | None = wait
        self._value: Tensor | None = None

    @classmethod
    def ready(cls, value: Tensor) -> Pending:
        pending = cls(lambda: value)
        pending.wait()
        return pending

    def wait(self) -> Tensor:
        if self._wait is not None:
            self._value, self._wait = self._wait(), None
        assert self._value is not None
        return self._value


@dataclass
class DispatchResult:
    # Rows for the local experts, grouped by local expert (expert 0's rows first), in the payload dtype.
    x_AD: Pending
    tokens_per_expert: list[int]
    # The same counts on the device (what a grouped GEMM's offsets are built from without a host copy).
    counts_E: Tensor | None = None
    # Whatever combine() needs to undo the move; opaque to the layer.
    state: dict = field(default_factory=dict)
    # What the all-to-alls moved; dispatch fills the dispatch fields, combine the combine ones.
    traffic: AllToAllBytes = field(default_factory=AllToAllBytes)


class LocalDispatcher:
    """Single device: every FFN expert is local, so dispatch is a gather and combine the identity."""

    def dispatch(
        self, x_TD: Tensor, token_idx_A: Tensor, tokens_per_expert_E: Tensor, payload_dtype: torch.dtype
    ) -> DispatchResult:
        """token_idx_A: token of each assignment, sorted by expert then by assignment order; its length may exceed
        the number of FFN assignments (the tail holds other assignments and is ignored).
        tokens_per_expert_E: FFN assignments per expert (device tensor). payload_dtype: the experts' compute dtype,
        what the gathered rows are cast to."""
        counts = tokens_per_expert_E.tolist()  # host-device sync: the one per layer, sizes the expert groups
        n = sum(counts)
        return DispatchResult(Pending.ready(x_TD[token_idx_A[:n]].to(payload_dtype)), counts, tokens_per_expert_E)

    def combine(self, y_AD: Tensor, dispatched: DispatchResult) -> Pending:
        """Expert outputs back in the order of the dispatch input's first rows."""
        return Pending.ready(y_AD)
