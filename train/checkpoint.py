"""Single-process checkpoints: written to a temporary directory, renamed into place, then `latest` updated.

A kill at any moment leaves either the previous checkpoint or the new one complete, never a half one under a final
name. Loading uses `weights_only=True`, so a checkpoint can never execute code.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

STEP_PREFIX = "step_"


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def save_checkpoint(ckpt_dir: Path, step: int, state: dict[str, Any], meta: dict[str, Any], keep_last: int) -> Path:
    """state: tensors-only dicts (model, optimizer); meta: JSON-serialisable (step, config, data position)."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / step_dir_name(step)
    tmp = ckpt_dir / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    torch.save(state, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=1))
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it only once the new one is whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_atomic(ckpt_dir / "latest", final.name + "\n")
    _prune(ckpt_dir, keep_last)
    return final


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    pointer = ckpt_dir / "latest"
    if not pointer.is_file():
        return None
    path = ckpt_dir / pointer.read_text().strip()
    return path if path.is_dir() else None


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
    state_file, meta_file = path / "state.pt", path / "meta.json"
    for f in (state_file, meta_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing; the checkpoint directory is incomplete, pick another step")
    try:
        state = torch.load(state_file, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated or corrupted file: say which one
        raise ValueError(
            f"{state_file}: cannot be read ({type(e).__name__}); the file is damaged, resume from an earlier step"
        ) from None
    return state, json.loads(meta_file.read_text())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        with f.open("rb") as fh:
            os.fsync(fh.fileno())


def _prune(ckpt_dir: Path, keep_last: int) -> None:
    steps = sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX))
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
