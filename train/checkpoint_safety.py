"""What loading a checkpoint may do: read DCP's `.metadata` through an unpickler that builds only the exact classes
that metadata is made of, accept only tensor entries whose chunks tile the whole tensor, and fill every tensor of
the state dict being loaded. A checkpoint can therefore neither run code nor leave a parameter at its initial
value."""

from __future__ import annotations

import itertools
import math
import pickle
from pathlib import Path, PosixPath, PurePosixPath
from typing import IO, Any

import torch
from torch import Tensor
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    _MEM_FORMAT_ENCODING,
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.serialization import _get_layout

from model.errors import UserError


class CheckpointError(UserError):
    """A checkpoint that cannot be used. One line naming the file or field and what to do."""


# Every global a `.metadata` written by DCP (torch 2.11 to 2.13) refers to, under the exact (module, name) pickle
# records, read off the files our Checkpointer writes in every layout. Looked up in this table only: no import, no
# attribute walk, so a dotted name such as `os.system` inside an allowed module is refused like any other.
_DCP_CLASSES = (
    Metadata,
    TensorStorageMetadata,
    BytesStorageMetadata,  # refused after unpickling, with a message naming the entry
    ChunkStorageMetadata,
    TensorProperties,
    MetadataIndex,
    StorageMeta,
    _MEM_FORMAT_ENCODING,
    _StorageInfo,
)
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **{(cls.__module__, cls.__qualname__): cls for cls in _DCP_CLASSES},
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): _get_layout,  # torch.layout's reducer: a lookup among torch's layouts
    # StorageMeta.checkpoint_id is the directory the checkpoint was written to (pathlib.PosixPath, recorded as
    # pathlib._local.PosixPath by Python 3.13 and later).
    ("pathlib", "PosixPath"): PosixPath,
    ("pathlib", "PurePosixPath"): PurePosixPath,
    ("pathlib._local", "PosixPath"): PosixPath,
    ("pathlib._local", "PurePosixPath"): PurePosixPath,
}
_DTYPES: dict[str, torch.dtype] = {name: v for name, v in vars(torch).items() if isinstance(v, torch.dtype)}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from checkpoint metadata")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refusing a persistent id in checkpoint metadata")


def unpickle_metadata(f: IO[bytes]) -> Any:
    """The object pickled in a `.metadata` file, built from the allowed globals only; any failure is an
    UnpicklingError (a damaged or crafted file can make the constructors it may call fail in many ways)."""
    try:
        return _MetadataUnpickler(f).load()
    except pickle.UnpicklingError:
        raise
    except Exception as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise pickle.UnpicklingError(f"{type(e).__name__}: {first_line}") from e


def check_metadata(metadata: Any, path: Path) -> None:
    """`path`: the `.metadata` file. Refuse metadata that is not DCP's, has a byte entry (DCP unpickles those
    without restriction), a tensor whose chunks leave a gap, or a chunk stored outside the directory's own files."""
    where = str(path)
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise CheckpointError(f"{where} is not checkpoint metadata; the checkpoint is damaged, pick another step")
    storage = metadata.storage_data
    if not isinstance(storage, dict):
        raise CheckpointError(f"{where} has no storage table; the checkpoint is damaged, pick another step")
    stored: set[tuple[str, tuple[int, ...]]] = set()
    for index, info in storage.items():
        if not (isinstance(index, MetadataIndex) and isinstance(info, _StorageInfo) and _is_own_file(info)):
            raise CheckpointError(
                f"{where}: storage entry {getattr(index, 'fqn', index)!r} is malformed or points outside the "
                "checkpoint directory; the checkpoint is damaged, pick another step"
            )
        stored.add((index.fqn, tuple(index.offset or ())))
    for key, entry in metadata.state_dict_metadata.items():
        if isinstance(entry, BytesStorageMetadata):
            raise CheckpointError(
                f"{where}: {key!r} is stored as a pickled byte blob, not a tensor (loading it could run code); "
                "checkpoints hold tensors only, pick another step"
            )
        if not _is_tensor_entry(entry):
            raise CheckpointError(f"{where}: {key!r} is malformed; the checkpoint is damaged, pick another step")
        if not _chunks_tile(tuple(entry.size), entry.chunks):
            raise CheckpointError(
                f"{where}: the chunks of {key!r} do not cover its shape {list(entry.size)} exactly; the checkpoint "
                "is damaged, pick another step"
            )
        for chunk in entry.chunks:
            if (key, tuple(chunk.offsets)) not in stored:
                raise CheckpointError(
                    f"{where}: chunk {list(chunk.offsets)} of {key!r} has no storage entry; the checkpoint is "
                    "damaged, pick another step"
                )


def check_covers(metadata: Metadata, state_dict: dict[str, Any], path: Path) -> None:
    """Every tensor of `state_dict` (nested as DCP flattens it: "model.<name>", "optim.<name>.exp_avg") is a tensor
    entry of the same shape and dtype in the metadata, so the load fills all of it."""
    entries = metadata.state_dict_metadata
    for key, value in _flatten(state_dict):
        if not isinstance(value, Tensor):
            raise TypeError(f"training state {key!r} is a {type(value).__name__}; checkpoints hold tensors only")
        entry = entries.get(key)
        if entry is None:
            raise CheckpointError(
                f"{path}: {key!r} is not in the checkpoint; it was saved from another model or is damaged, "
                "pick another step"
            )
        if tuple(entry.size) != tuple(value.shape) or entry.properties.dtype != value.dtype:
            raise CheckpointError(
                f"{path}: {key!r} is {entry.properties.dtype} {list(entry.size)} in the checkpoint but "
                f"{value.dtype} {list(value.shape)} here; use the checkpoint's model shape or another checkpoint"
            )


class TensorsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's planner, except that a byte entry is refused instead of `torch.load(weights_only=False)`ed."""

    def load_bytes(self, read_item: Any, value: Any) -> None:
        raise CheckpointError(f"{read_item.dest_index.fqn!r} is stored as a pickled byte blob; refusing to load it")


def referenced_files(metadata: Metadata) -> set[str]:
    """The shard files (relative to the step directory) the metadata's tensors are stored in."""
    return {info.relative_path for info in metadata.storage_data.values()}


def _flatten(state: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for key, value in state.items():
        if isinstance(value, dict):
            items += _flatten(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def _is_own_file(info: _StorageInfo) -> bool:
    name = info.relative_path
    return (
        isinstance(name, str)
        and Path(name).name == name
        and name not in ("", ".", "..")
        and all(isinstance(n, int) and n >= 0 for n in (info.offset, info.length))
    )


def _is_tensor_entry(entry: Any) -> bool:
    return (
        isinstance(entry, TensorStorageMetadata)
        and isinstance(entry.properties, TensorProperties)
        and isinstance(entry.properties.dtype, torch.dtype)
        and _is_shape(entry.size)
        and isinstance(entry.chunks, list)
        and all(
            isinstance(c, ChunkStorageMetadata) and _is_shape(c.offsets) and _is_shape(c.sizes) for c in entry.chunks
        )
    )


def _is_shape(value: Any) -> bool:
    return isinstance(value, tuple) and all(isinstance(n, int) and n >= 0 for n in value)


def _chunks_tile(size: tuple[int, ...], chunks: list[ChunkStorageMetadata]) -> bool:
    """The chunks lie inside `size`, do not overlap and add up to all of it."""
    for c in chunks:
        if len(c.offsets) != len(size) or len(c.sizes) != len(size):
            return False
        if any(o + n > s for o, n, s in zip(c.offsets, c.sizes, size, strict=True)):
            return False
    if sum(math.prod(c.sizes) for c in chunks) != math.prod(size):
        return False
    for a, b in itertools.combinations(chunks, 2):
        if all(
            ao < bo + bn and bo < ao + an and an > 0 and bn > 0
            for ao, an, bo, bn in zip(a.offsets, a.sizes, b.offsets, b.sizes, strict=True)
        ):
            return False
    return True
