"""What a router needs from the ranks that route the other tokens of its batch.

A router never calls `torch.distributed`. Every reduction or gather it needs goes through its `comm`, a
`RouterComm`. This default one is for a single process: every method returns its input unchanged.
`parallel/routing.py` gives each router of a distributed model the implementation over the process groups
(`router.comm = ...`, one assignment per router), so the policies read the same whatever the layout.
"""

from __future__ import annotations

from torch import Tensor


class RouterComm:
    """The four exchanges a router makes with other ranks; here, in one process, the identity."""

    def sum_statistics(self, stats: Tensor) -> Tensor:
        """Balance statistics of one micro-batch summed over the ranks holding other tokens of the same sequences
        (sequence parallelism). Differentiable, with an identity backward: each rank keeps the gradient of its own
        contribution."""
        return stats

    def sum_over_data_parallel(self, counts: Tensor) -> Tensor:
        """Counts summed over the data-parallel ranks (global-batch balance), outside autograd."""
        return counts

    def sum_step_load(self, totals: Tensor) -> Tensor:
        """A step's routing totals summed over every rank that routed other tokens (data-parallel ranks, and the
        tensor-parallel ones under sequence parallelism), outside autograd."""
        return totals

    def gather_assignments(self, expert_A: Tensor, score_A: Tensor) -> tuple[Tensor, Tensor, int]:
        """Every data-parallel rank's (expert, score) assignments concatenated in rank order, and the index of this
        rank's first one in the result. Every rank routes the same number of assignments."""
        return expert_A, score_A, 0
