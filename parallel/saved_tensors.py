"""Exact count of the activation bytes autograd keeps for the backward pass (torch.autograd.graph.saved_tensors_hooks),
per decoder block: what activation checkpointing trades for recomputation. For tests and benchmarks.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from model.transformer import Block


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _storage(t: Tensor) -> tuple[int, int]:
    """(address, bytes) of the whole storage behind t: a saved view keeps all of it alive."""
    s = _local(t).untyped_storage()
    return s.data_ptr(), s.nbytes()


class SavedActivationBytes:
    """Within the context, every forward's saved tensors are counted once per storage, leaving out the model's
    parameters and buffers (state, not activations). `per_block[name]` holds the bytes saved while block `name`
    ran, `block_inputs[name]` the bytes of its tensor inputs (the residual stream and router logits), `other`
    what was saved outside the blocks (embedding, head, loss), `total` the sum.

        with SavedActivationBytes(model) as saved:
            loss = model(tokens).logits_BSV.sum()
        print(saved.total, saved.per_block)
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.per_block: dict[str, int] = {}
        self.block_inputs: dict[str, int] = {}
        self.other = 0
        self._state: set[int] = set()
        self._seen: set[int] = set()
        self._current: str | None = None
        self._handles: list[Any] = []
        self._hooks: Any = None

    @property
    def total(self) -> int:
        return self.other + sum(self.per_block.values())

    def _pack(self, t: Tensor) -> Tensor:
        with torch.no_grad():
            ptr, nbytes = _storage(t)
        if ptr not in self._state and ptr not in self._seen and nbytes:
            self._seen.add(ptr)
            if self._current is None:
                self.other += nbytes
            else:
                self.per_block[self._current] = self.per_block.get(self._current, 0) + nbytes
        return t

    def _enter_block(self, name: str, args: tuple) -> None:
        self._current = name
        inputs = 0
        with torch.no_grad():
            for a in args:
                if isinstance(a, Tensor):
                    ptr, nbytes = _storage(a)
                    inputs += 0 if ptr in self._state else nbytes
        self.block_inputs[name] = self.block_inputs.get(name, 0) + inputs
        self.per_block.setdefault(name, 0)

    def __enter__(self) -> SavedActivationBytes:
        with torch.no_grad():
            for t in itertools.chain(self.model.parameters(), self.model.buffers()):
                self._state.add(_storage(t)[0])
        for name, module in self.model.named_modules():
            if isinstance(module, Block):
                pre = module.register_forward_pre_hook(lambda m, args, n=name: self._enter_block(n, args))
                post = module.register_forward_hook(lambda m, args, out: setattr(self, "_current", None))
                self._handles += [pre, post]
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles = []
