"""Counting the calls that make the host wait for a CUDA device, on any device (CPU tests included).

On CUDA these read a device value back (a scalar, a list, an output size that depends on the data): the host
blocks until the device has caught up. `HostSyncCounter` sees them at two levels, so it also sees the backward
(which runs aten ops directly): aten ops through a TorchDispatchMode (`_local_scalar_dense` behind item(), bool(),
int() and float(), `nonzero`, `bincount`, `unique`, boolean-mask indexing, `masked_select`, `repeat_interleave`
without `output_size`, ...), and, through a TorchFunctionMode, `Tensor.tolist` / `numpy` / `cpu` (which reach no
aten op on a CPU tensor) and tensors built from host data or moved to a device (`torch.tensor`, `new_tensor`,
`Tensor.to(device)`: on CUDA a blocking host-to-device copy).
"""

from __future__ import annotations

import sys
import traceback
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops whose output (or output size) is read back to the host on CUDA, whatever their arguments.
ALWAYS_SYNC = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.argwhere.default,
    aten.bincount.default,
    aten.masked_select.default,
    aten.equal.default,
    aten.is_nonzero.default,
    aten._unique.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.histc.default,
}
INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
HOST_METHODS = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu}
# Tensors built from host data: on CUDA a blocking host-to-device copy (it waits for the stream).
FROM_HOST = {torch.tensor, torch.as_tensor, torch.Tensor.new_tensor}


def _is_mask(t: object) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)


def _syncs(func, args, kwargs) -> bool:
    if func in ALWAYS_SYNC:
        return True
    if func in INDEX_OPS:  # a boolean mask index becomes nonzero() inside the kernel
        return any(_is_mask(i) for i in args[1] if i is not None)
    if func is aten.repeat_interleave.Tensor:  # sized from the data unless output_size is given
        return kwargs.get("output_size") is None
    return False


def _where() -> str:
    """The innermost frame of this repository's code (not torch's, not this file's)."""
    for frame in reversed(traceback.extract_stack()):
        if "/torch/" not in frame.filename and not frame.filename.endswith("host_syncs.py"):
            return f"{frame.filename.rsplit('/', 2)[-2]}/{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"
    return "?"


class _Dispatch(TorchDispatchMode):
    def __init__(self, record) -> None:
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _syncs(func, args, kwargs):
            self.record(str(func.overloadpacket.__name__))
        return func(*args, **kwargs)


class _Function(TorchFunctionMode):
    def __init__(self, record) -> None:
        super().__init__()
        self.record = record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_METHODS or func in FROM_HOST or (func is torch.Tensor.to and _moves(args, kwargs)):
            self.record(func.__name__)
        return func(*args, **kwargs)


def _moves(args, kwargs) -> bool:
    """Tensor.to with a device (not just a dtype), called from our code: on CUDA a copy between host and device
    (blocking unless the source is pinned and non_blocking=True). torch's own calls (clip_grad_norm_ moving
    norms to the device they are already on) are not counted: which device a tensor is on cannot be told apart
    on a CPU-only run, so only calls written in this repository are."""
    if "device" not in kwargs and not any(isinstance(a, torch.device | str) for a in args[1:]):
        return False
    caller = sys._getframe(2).f_code.co_filename
    return "/torch/" not in caller


class HostSyncCounter:
    """`with HostSyncCounter() as syncs: ...`; then `syncs.count` and `syncs.where` (op @ file:line -> calls)."""

    def __init__(self) -> None:
        self.where: Counter[str] = Counter()
        self._modes = (_Function(self._record), _Dispatch(self._record))

    def _record(self, op: str) -> None:
        self.where[f"{op} @ {_where()}"] += 1

    @property
    def count(self) -> int:
        return sum(self.where.values())

    def by_file(self) -> dict[str, int]:
        """Calls per (op, file), lines merged: what a test can state without pinning line numbers."""
        merged: Counter[str] = Counter()
        for where, n in self.where.items():
            merged[where.rsplit(":", 1)[0]] += n
        return dict(merged)

    def __enter__(self) -> HostSyncCounter:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
