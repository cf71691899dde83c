"""An all-to-all through autograd that is launched at one point and waited for at another, in the forward and in
the backward alike, so work placed between the two overlaps the transfer.

    flight = AsyncAllToAll(x, out_splits, in_splits, group)   # the rows start moving
    ...independent work...                                    # runs while they move
    y = flight.wait()                                         # blocks until they have arrived

Backward: the gradient's reverse all-to-all is launched when autograd reaches `wait()`'s node and waited for when it
reaches the launch's node. Autograd runs the ready node created last first, so the backward of the work done
between launch and wait in the forward runs while the gradient moves (its gradient is ready by then: it does not
depend on the transfer). On gloo the transfer runs on the process group's own thread; on NCCL on its own stream,
and `wait()` makes the compute stream wait for it without blocking the host.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class AsyncAllToAll:
    """all_to_all_single(x, out_splits, in_splits) started now. overlap=False waits at once in both directions (the
    serial reference for measuring what the overlap hides)."""

    def __init__(
        self, x: Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup, overlap: bool = True
    ) -> None:
        self.group, self.out_splits, self.in_splits, self.overlap = group, out_splits, in_splits, overlap
        self.work: dist.Work | None = None
        self.received: Tensor | None = None
        self.grad_work: dist.Work | None = None
        self.grad_received: Tensor | None = None
        self._sent: Tensor | None = None
        self._grad_sent: Tensor | None = None
        # Autograd's edge from the launch to the wait: an empty tensor (the data goes through `received`).
        self._link: Tensor | None = _Launch.apply(x, self)
        if not overlap:
            self.work.wait()

    def wait(self) -> Tensor:
        """The received rows, [sum(out_splits), ...]; call once."""
        link, self._link = self._link, None  # drop the reference: the flight and its graph must not form a cycle
        return _Wait.apply(link, self)

    def start(self, x: Tensor) -> None:
        # The input is held until the wait: nothing may reuse its memory while the collective reads it.
        self._sent = x.contiguous()
        self.received = x.new_empty(sum(self.out_splits), *x.shape[1:])
        self.work = all_to_all(self.received, self._sent, self.out_splits, self.in_splits, self.group)

    def finish(self) -> Tensor:
        self.work.wait()
        received, self.received, self.work, self._sent = self.received, None, None, None
        return received

    def start_grad(self, grad: Tensor) -> None:
        self._grad_sent = grad.contiguous()
        self.grad_received = grad.new_empty(sum(self.in_splits), *grad.shape[1:])
        self.grad_work = all_to_all(self.grad_received, self._grad_sent, self.in_splits, self.out_splits, self.group)
        if not self.overlap:
            self.grad_work.wait()

    def finish_grad(self) -> Tensor:
        self.grad_work.wait()
        grad, self.grad_received, self.grad_work, self._grad_sent = self.grad_received, None, None, None
        return grad


def all_to_all(out: Tensor, x: Tensor, out_splits: list[int], in_splits: list[int], group) -> dist.Work:
    """Launch one all_to_all_single without waiting for it."""
    return dist.all_to_all_single(out, x, out_splits, in_splits, group=group, async_op=True)


class _Launch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, flight: AsyncAllToAll) -> Tensor:
        flight.start(x)
        ctx.flight = flight
        return x.new_empty(0)

    @staticmethod
    def backward(ctx, _grad_link: Tensor) -> tuple[Tensor, None]:
        return ctx.flight.finish_grad(), None


class _Wait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, link: Tensor, flight: AsyncAllToAll) -> Tensor:
        ctx.flight = flight
        ctx.link_like = (link.dtype, link.device)
        return flight.finish()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        ctx.flight.start_grad(grad)
        dtype, device = ctx.link_like
        return torch.empty(0, dtype=dtype, device=device), None
