"""Shard checksums: the size and CRC-32 of every file DCP writes into a step directory, recorded in meta.json at
save and compared on load, so a zeroed, truncated or altered shard is refused with its name instead of resuming
with wrong weights.

A file's CRC-32 is taken over the CRC-32s (4 bytes each, big-endian) of its consecutive 64 MiB pieces, so the
pieces of one large shard hash on all cores at once (zlib releases the GIL while it hashes)."""

from __future__ import annotations

import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch.distributed as dist

from parallel.mesh import ParallelContext
from train.checkpoint_safety import CheckpointError

CHECKSUMS_FIELD = "checksums"
PIECE_BYTES = 64 * 2**20
_NOT_HASHED = {"meta.json"}  # holds the checksums itself; written after them


def shard_checksums(path: Path) -> dict[str, dict[str, Any]]:
    """{file name: {"bytes": size, "crc32": 8 hex digits}} for every file of the step directory but meta.json."""
    files = sorted(f.name for f in Path(path).iterdir() if f.is_file() and f.name not in _NOT_HASHED)
    return _checksums(Path(path), files)


def verify_checksums(path: Path, meta: dict[str, Any], ctx: ParallelContext) -> None:
    """Compare every file meta.json records with the file on disk; refuse a checkpoint without checksums or without
    one for `.metadata`. In a distributed load each rank hashes a share of the files and all learn the outcome."""
    path = Path(path)
    recorded = meta.get(CHECKSUMS_FIELD)
    meta_file = path / "meta.json"
    if CHECKSUMS_FIELD not in meta:
        raise CheckpointError(
            f"{meta_file}: field {CHECKSUMS_FIELD!r} is missing; the checkpoint is damaged, pick another step"
        )
    if recorded is None:
        raise CheckpointError(
            f"{meta_file}: no shard checksums recorded (saved with checkpoint.verify=false); load it unverified "
            "(checkpoint.verify=false; convert_to_hf --no-verify) or pick another step"
        )
    if not _well_formed(recorded) or ".metadata" not in recorded:
        raise CheckpointError(
            f"{meta_file}: field {CHECKSUMS_FIELD!r} is malformed or lacks .metadata; the checkpoint is damaged, "
            "pick another step"
        )
    names = sorted(recorded)
    world = ctx.dims.world_size if ctx.distributed else 1
    mine = names[ctx.rank % world :: world] if world > 1 else names
    problem = _first_mismatch(path, recorded, mine)
    if world > 1:  # every rank must refuse together, or the others would wait in dcp.load's collectives
        problems: list[str | None] = [None] * world
        dist.all_gather_object(problems, problem)
        problem = next((p for p in problems if p is not None), None)
    if problem is not None:
        raise CheckpointError(problem)


def require_checksums_for(path: Path, meta: dict[str, Any], files: set[str]) -> None:
    """Each shard file the DCP metadata reads from has a recorded checksum (so none was swapped in unverified)."""
    unrecorded = sorted(files - set(meta[CHECKSUMS_FIELD]))
    if unrecorded:
        raise CheckpointError(
            f"{Path(path) / unrecorded[0]}: no checksum recorded in meta.json for this shard; the checkpoint is "
            "incomplete or altered, pick another step"
        )


def _well_formed(recorded: Any) -> bool:
    return isinstance(recorded, dict) and all(
        isinstance(name, str)
        and Path(name).name == name
        and isinstance(entry, dict)
        and isinstance(entry.get("bytes"), int)
        and isinstance(entry.get("crc32"), str)
        for name, entry in recorded.items()
    )


def _first_mismatch(path: Path, recorded: dict[str, dict[str, Any]], names: list[str]) -> str | None:
    missing = [n for n in names if not (path / n).is_file()]
    if missing:
        return f"{path / missing[0]}: missing shard; the checkpoint is incomplete, pick another step"
    for name in names:
        size, want = (path / name).stat().st_size, recorded[name]["bytes"]
        if size != want:
            what = "truncated" if size < want else "longer than written"
            return (
                f"{path / name}: {what} ({size} bytes, meta.json records {want}); the shard is damaged, pick another "
                "step"
            )
    actual = _checksums(path, names)
    for name in names:
        if actual[name]["crc32"] != recorded[name]["crc32"]:
            return (
                f"{path / name}: CRC-32 {actual[name]['crc32']} but meta.json records {recorded[name]['crc32']}; the "
                "shard is damaged or altered, pick another step"
            )
    return None


def _checksums(path: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    sizes = {name: (path / name).stat().st_size for name in names}
    pieces = [(name, start) for name in names for start in range(0, max(sizes[name], 1), PIECE_BYTES)]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        crcs = list(pool.map(lambda piece: _piece_crc(path / piece[0], piece[1]), pieces))
    by_file: dict[str, bytearray] = {name: bytearray() for name in names}
    for (name, _), crc in zip(pieces, crcs, strict=True):
        by_file[name] += crc.to_bytes(4, "big")
    return {name: {"bytes": sizes[name], "crc32": f"{zlib.crc32(by_file[name]):08x}"} for name in names}


def _piece_crc(file: Path, start: int) -> int:
    with file.open("rb") as f:
        f.seek(start)
        return zlib.crc32(f.read(PIECE_BYTES))
