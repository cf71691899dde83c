"""Peak bytes of the storages that operators allocate off the meta device while a block of code runs: a storage
counts from the operator that creates it until its last tensor dies (StorageWeakRef), so the peak is what was
really held at once. For the initialisation tests."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode


class LiveStorage(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def _track(self, t: torch.Tensor) -> None:
        if isinstance(t, DTensor):
            t = t._local_tensor  # the storage behind the wrapper
        if t.device.type == "meta":
            return
        storage = t.untyped_storage()
        if storage.nbytes() and storage.data_ptr() not in self.live:
            self.live[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())

    @property
    def current(self) -> int:
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        return sum(n for _, n in self.live.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        self.peak = max(self.peak, self.current)
        return out
