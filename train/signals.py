"""SIGTERM/SIGINT -> save a checkpoint at the current step and exit cleanly (torchrun sends SIGTERM on shutdown)."""

from __future__ import annotations

import signal
from types import FrameType

import torch
import torch.distributed as dist


class ShutdownRequest:
    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only note it: the loop saves at the end of the current step, when the state is consistent.
        self.signal_name = signal.Signals(signum).name

    def requested(self, distributed: bool, device: torch.device) -> bool:
        """Whether any rank got a signal. Ranks can receive it at different steps, so they agree through an
        all-reduce: a one-element collective and a host-device sync per step, only in a distributed run."""
        flag = self.signal_name is not None
        if not distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
