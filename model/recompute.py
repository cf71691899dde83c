"""Forward side effects that happen once per forward, also when activation checkpointing recomputes the forward.

A checkpointed region (parallel/activation_checkpoint.py) runs its forward twice: in the forward pass, and again
in the backward pass to rebuild what it did not save. Code with a side effect whose result is not differentiated
(the router's step accumulators, the all-reduce of the global-batch counts, ETR's all-gather) wraps it in `once`:
the forward pass runs it and records the result on the region's `Tape`; the recomputation replays that result
without running it again, so nothing is counted twice, no extra collective runs, and the recomputed values equal
the forward's even when later micro-batches have moved the accumulators in between (pipeline schedules).

Outside a checkpointed region `once(fn)` is just `fn()`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any, TypeVar

T = TypeVar("T")


class Tape:
    """The results of one region's side effects, in the order its forward produced them."""

    def __init__(self) -> None:
        self.values: list[Any] = []
        self.position: int | None = None  # None while recording; the next value to replay while replaying

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        token = _ACTIVE.set(self)
        try:
            yield
        finally:
            _ACTIVE.reset(token)

    @contextlib.contextmanager
    def replaying(self) -> Iterator[None]:
        self.position = 0
        token = _ACTIVE.set(self)
        try:
            yield
        finally:
            _ACTIVE.reset(token)
            self.position = None


_ACTIVE: ContextVar[Tape | None] = ContextVar("recompute_tape", default=None)


def once(fn: Callable[[], T]) -> T:
    """fn() in a forward pass (recorded on the active tape, if any); its recorded result in a recomputation."""
    tape = _ACTIVE.get()
    if tape is None:
        return fn()
    if tape.position is None:
        value = fn()
        tape.values.append(value)
        return value
    if tape.position >= len(tape.values):
        raise RuntimeError("activation checkpointing: the recomputed forward has more side effects than the forward")
    value = tape.values[tape.position]
    tape.position += 1
    return value
