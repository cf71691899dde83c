"""Sharded safetensors files with `model.safetensors.index.json`, written one shard at a time (a 7B export never
holds a second copy of the whole model), and read lazily, one tensor at a time."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor

from tools.hf.checkpoint_io import ConversionError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * dtype.itemsize


def plan_shards(shapes: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype, max_shard_bytes: int) -> list[list[str]]:
    """Consecutive keys packed greedily into shards of at most max_shard_bytes (a bigger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, shape in shapes:
        n = _nbytes(shape, dtype)
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += n
    return shards


def write_sharded(
    out_dir: Path,
    shapes: list[tuple[str, tuple[int, ...]]],
    make: Callable[[str], Tensor],
    dtype: torch.dtype,
    max_shard_bytes: int,
) -> list[str]:
    """Write `make(key)` for every key into model-0000i-of-0000n.safetensors plus the index; returns file names."""
    from safetensors.torch import save_file  # optional dependency of the HF tools only

    shards = plan_shards(shapes, dtype, max_shard_bytes)
    weight_map, total, names = {}, 0, []
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: make(k).to(dtype).contiguous() for k in keys}
        save_file(tensors, str(out_dir / name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(keys, name))
        names.append(name)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [*names, INDEX_FILE]


class ShardedReader(Mapping[str, Tensor]):
    """{key: tensor} over a folder's safetensors files (index + shards, or a single model.safetensors)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            listed = _weight_map(index)
        elif (self.folder / SINGLE_FILE).is_file():
            listed = dict.fromkeys(self._keys_of(SINGLE_FILE), SINGLE_FILE)
        else:
            raise FileNotFoundError(
                f"{self.folder}: no {INDEX_FILE} or {SINGLE_FILE}; only safetensors weights can be imported"
            )
        # Keys come from the shards' own headers, so a tensor the index forgot is still seen (and refused later).
        self._files: dict[str, str] = {}
        for name in sorted(set(listed.values())):
            if not (self.folder / name).is_file():
                raise FileNotFoundError(f"{self.folder / name}: shard named in {INDEX_FILE} is missing")
            self._files.update(dict.fromkeys(self._keys_of(name), name))
        absent = sorted(k for k, name in listed.items() if self._files.get(k) != name)
        if absent:
            raise FileNotFoundError(
                f"{self.folder}: {absent[0]} is listed in {INDEX_FILE} but not in {listed[absent[0]]}"
            )

    def _keys_of(self, name: str) -> list[str]:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(self.folder / name), framework="pt") as f:
                return list(f.keys())
        except SafetensorError as e:
            raise _corrupt(self.folder / name, e) from e

    def __getitem__(self, key: str) -> Tensor:
        from safetensors import SafetensorError, safe_open

        path = self.folder / self._files[key]
        try:
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(key)
        except SafetensorError as e:
            raise _corrupt(path, e) from e

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ConversionError(
            f"{index}: not a safetensors index ({type(e).__name__}: {e}); re-download or re-export the folder"
        ) from e
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ConversionError(
            f"{index}: weight_map is not an object of file names; re-download or re-export the folder"
        )
    return weight_map


def _corrupt(path: Path, err: Exception) -> ConversionError:
    return ConversionError(f"{path}: not a readable safetensors file ({err}); re-download or re-export the folder")
